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

import argparse
import os
import sys
from collections import Counter

from tqdm import tqdm

from milora_vlm.data.records import RecordFileError, RecordWriter, iter_source, position_kind
from milora_vlm.data.validation import Report, convert_records, finish, report_path_for, text_field


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="local .json/.jsonl file, or a hub data set name (owner/name)")
    ap.add_argument("--split", default="train", help="split of a hub data set (default train)")
    ap.add_argument("--output", required=True, help="conversations: .jsonl, or .json for an array")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any record was dropped")
    args = ap.parse_args(argv)
    local = os.path.exists(args.input)
    report = Report("data_prep/metamathqa.py", position_kind(args.input) if local else "index",
                    input=os.path.abspath(args.input) if local else args.input, split=None if local else args.split,
                    output=os.path.abspath(args.output), template="alpaca")
    types: Counter = Counter()

    def to_conversation(position: int, row: dict) -> dict:
        query, response = text_field(row, "query"), text_field(row, "response")
        types[str(row.get("type"))] += 1
        return {"id": f"metamathqa-{position}",
                "conversations": [{"from": "human", "value": query}, {"from": "gpt", "value": response}]}

    try:
        with RecordWriter(args.output) as writer:
            rows = tqdm(iter_source(args.input, args.split), desc="converting", unit="rec", mininterval=1.0)
            convert_records(rows, to_conversation, writer, report)
    except RecordFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.extra["kept_by_type"] = dict(sorted(types.items()))
    return finish(report, report_path_for(args.output), args.strict)


if __name__ == "__main__":
    sys.exit(main())
