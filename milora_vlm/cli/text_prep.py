"""What the text-only converters (prep_commonsense, prep_metamath) share: a local .json/.jsonl file or a hub data
set in, `alpaca` conversations out, every dropped record listed in OUT.report.json."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from tqdm import tqdm

from milora_vlm.data.records import RecordFileError, RecordWriter, iter_source, output_path, position_kind
from milora_vlm.data.validation import Report, convert_records, finish, report_path_for


def run_text_converter(
    doc: str,
    tool: str,
    to_conversation: Callable[[int, dict], dict],
    argv: list[str] | None = None,
    extra: Callable[[], dict] | None = None,
) -> int:
    """The converter's command line (--input, --split, --output, --strict; help from the tool's docstring `doc`):
    each record through to_conversation(position, row), then the report, with extra() added to its fields.
    Exit status: 0 done, 1 --strict and something was dropped, 2 the input cannot be read."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="local .json/.jsonl file, or a hub data set name (owner/name)")
    ap.add_argument("--split", default="train", help="split of a hub data set (default train)")
    ap.add_argument("--output", required=True, type=output_path, help="conversations: .jsonl, or .json for an array")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any record was dropped")
    args = ap.parse_args(argv)
    local = os.path.exists(args.input)
    report = Report(tool, position_kind(args.input) if local else "index",
                    input=os.path.abspath(args.input) if local else args.input, split=None if local else args.split,
                    output=os.path.abspath(args.output), template="alpaca")
    try:
        with RecordWriter(args.output) as writer:
            rows = tqdm(iter_source(args.input, args.split), desc="converting", unit="rec", mininterval=1.0)
            convert_records(rows, to_conversation, writer, report)
    except RecordFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if extra is not None:
        report.extra.update(extra())
    return finish(report, report_path_for(args.output), args.strict)
