"""MetaMathQA to text-only conversations for the `alpaca` template (MetaMath's own training prompt).

    python data_prep/metamathqa.py --input MetaMathQA-395K.json --output metamath.jsonl [--strict]
    python data_prep/metamathqa.py --input meta-math/MetaMathQA [--split train] --output metamath.jsonl

--input is a local .json/.jsonl file in MetaMathQA's format (records with `query`, `response`, `type`) or a
Hugging Face hub data set with those columns, read through `datasets`. The human turn is `query` and the
target is `response` (which ends "The answer is: ..."); the `alpaca` template renders MetaMath's prompt
("Below is an instruction ... ### Instruction:\\n{query}\\n\\n### Response:\\n"). `type` (GSM_Rephrased,
MATH_FOBAR, ...) is counted in the report. Records with a missing or empty query or response are dropped and
listed in OUT.report.json with their line (or index) and field.
"""

from __future__ import annotations

import sys
from collections import Counter

from milora_vlm.cli.text_prep import run_text_converter
from milora_vlm.data.validation import text_field


def main(argv: list[str] | None = None) -> int:
    types: Counter = Counter()

    def to_conversation(position: int, row: dict) -> dict:
        query, response = text_field(row, "query"), text_field(row, "response")
        types[str(row.get("type"))] += 1
        return {"id": f"metamathqa-{position}",
                "conversations": [{"from": "human", "value": query}, {"from": "gpt", "value": response}]}

    return run_text_converter(__doc__, "data_prep/metamathqa.py", to_conversation, argv,
                              extra=lambda: {"kept_by_type": dict(sorted(types.items()))})


if __name__ == "__main__":
    sys.exit(main())
