"""Commonsense170K (LLM-Adapters) to text-only conversations for the `alpaca` template.

    python data_prep/commonsense170k.py --input commonsense_170k.json --output commonsense.jsonl [--strict]
    python data_prep/commonsense170k.py --input OWNER/NAME [--split train] --output commonsense.jsonl

--input is a local .json/.jsonl file in LLM-Adapters' format (records with `instruction`, `input`, `output`,
`answer`; commonsense_170k.json from the LLM-Adapters repository) or a Hugging Face hub data set with those
columns, read through `datasets`. The target is `output` (e.g. "the correct answer is true"), what LLM-Adapters
trains on; `answer` is the label its evaluation compares with and is not used here.

A non-empty `input` is folded into the prompt as LLM-Adapters (Alpaca) does: the system sentence becomes the
"paired with an input" one and the human turn is "<instruction>\\n\\n### Input:\\n<input>", so the `alpaca`
template renders exactly Alpaca's with-input prompt. Records with a missing or empty instruction or output, or a
non-string input, are dropped and listed in OUT.report.json with their line (or index) and field.
"""

from __future__ import annotations

import sys

from milora_vlm.cli.text_prep import run_text_converter
from milora_vlm.data.validation import text_field

# Alpaca's system sentence for prompts with an input (the no-input one is the `alpaca` template's default).
ALPACA_INPUT_SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def to_conversation(position: int, row: dict) -> dict:
    instruction, output = text_field(row, "instruction"), text_field(row, "output")
    extra = text_field(row, "input", optional=True)
    turns = []
    if extra.strip():
        turns.append({"from": "system", "value": ALPACA_INPUT_SYSTEM})
        instruction = f"{instruction}\n\n### Input:\n{extra}"
    turns += [{"from": "human", "value": instruction}, {"from": "gpt", "value": output}]
    return {"id": f"commonsense170k-{position}", "conversations": turns}


def main(argv: list[str] | None = None) -> int:
    return run_text_converter(__doc__, "data_prep/commonsense170k.py", to_conversation, argv)


if __name__ == "__main__":
    sys.exit(main())
