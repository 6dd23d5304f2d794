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

import argparse
import os
import sys

from tqdm import tqdm

from milora_vlm.data.records import RecordFileError, RecordWriter, iter_source, position_kind
from milora_vlm.data.validation import Report, convert_records, finish, report_path_for, text_field

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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="local .json/.jsonl file, or a hub data set name (owner/name)")
    ap.add_argument("--split", default="train", help="split of a hub data set (default train)")
    ap.add_argument("--output", required=True, help="conversations: .jsonl, or .json for an array")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any record was dropped")
    args = ap.parse_args(argv)
    local = os.path.exists(args.input)
    report = Report("data_prep/commonsense170k.py", position_kind(args.input) if local else "index",
                    input=os.path.abspath(args.input) if local else args.input, split=None if local else args.split,
                    output=os.path.abspath(args.output), template="alpaca")
    try:
        with RecordWriter(args.output) as writer:
            rows = tqdm(iter_source(args.input, args.split), desc="converting", unit="rec", mininterval=1.0)
            convert_records(rows, to_conversation, writer, report)
    except RecordFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return finish(report, report_path_for(args.output), args.strict)


if __name__ == "__main__":
    sys.exit(main())
