"""Validate and clean LLaVA-style conversation data (LLaVA-Instruct-665K and the like) for scripts/train_vlm.py.

    python data_prep/llava_instruct.py --input llava_v1_5_mix665k.json --image-folder data/ --output clean.jsonl
        [--tokenizer PATH --max-length 2048 --template vicuna_v1 [--image-tokens N]] [--strict] [--workers N]

Every record is kept as is, repaired or dropped by the policy in milora_vlm/data/validation.py; OUT.report.json
next to the output counts each reason and lists every record concerned with its id and line (JSONL) or index
(JSON array). Output order is input order; running the tool on its own output changes nothing.
Exit status: 0 done, 1 --strict and something was dropped or repaired, 2 the input cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from tqdm import tqdm

from milora_vlm.data.images import DEFAULT_MAX_IMAGE_PIXELS
from milora_vlm.data.records import RecordFileError, RecordWriter, iter_records, position_kind, output_path, record_line
from milora_vlm.data.templates import template_names
from milora_vlm.data.validation import (
    DROPPED,
    CheckConfig,
    DuplicateIds,
    Report,
    check_records,
    finish,
    image_tokens_from_processor,
    report_path_for,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="LLaVA conversation data: .json (array) or .jsonl")
    ap.add_argument("--image-folder", default=None,
                    help="folder the records' 'image' paths are relative to (default: the current directory)")
    ap.add_argument("--output", required=True, type=output_path, help="cleaned data: .jsonl, or .json for an array")
    ap.add_argument("--image-check", choices=["decode", "exists"], default="decode",
                    help="decode: open and decode every image fully (catches truncated files; default); "
                         "exists: only check that the file is there (fast)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer or llava-hf model directory: drop samples longer than --max-length tokens")
    ap.add_argument("--max-length", type=int, default=None, help="token limit of training (model_max_length)")
    ap.add_argument("--template", default="vicuna_v1", choices=template_names(),
                    help="conversation template training will use (default vicuna_v1, LLaVA-1.5's)")
    ap.add_argument("--image-tokens", type=int, default=None,
                    help="tokens one <image> becomes; default: read from the --tokenizer directory's llava processor")
    ap.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                    help="drop images declaring more pixels (image_too_large), before decoding them "
                         f"(default {DEFAULT_MAX_IMAGE_PIXELS})")
    ap.add_argument("--allow-images-outside-folder", action="store_true",
                    help="keep records whose image path resolves outside --image-folder (../x.png, absolute paths, "
                         "symlinks out); by default they are dropped as image_outside_folder")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any record was dropped or repaired")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes for image decoding and tokenisation (default: all cores; 0 or 1: none)")
    ap.add_argument("--chunk-size", type=int, default=1000, help="records per task sent to a worker")
    args = ap.parse_args(argv)
    if (args.tokenizer is None) != (args.max_length is None):
        ap.error("--tokenizer and --max-length go together")
    if args.image_tokens is not None and args.tokenizer is None:
        ap.error("--image-tokens only matters with --tokenizer")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    image_tokens = args.image_tokens
    if args.tokenizer is not None and image_tokens is None:
        try:
            image_tokens = image_tokens_from_processor(args.tokenizer)
        except ValueError as e:  # a processor that cannot count image tokens (no patch_size)
            print(f"error: {e}", file=sys.stderr)
            return 2
        if image_tokens is None:
            print(f"error: {args.tokenizer} has no llava image processor to count image tokens with; "
                  "give --image-tokens N (0 for text-only data)", file=sys.stderr)
            return 2
    config = CheckConfig(args.image_folder, args.image_check, args.template, args.tokenizer, args.max_length,
                         image_tokens or 0, args.max_image_pixels, args.allow_images_outside_folder)
    report = Report("data_prep/llava_instruct.py", position_kind(args.input), input=os.path.abspath(args.input),
                    output=os.path.abspath(args.output),
                    image_folder=None if args.image_folder is None else os.path.abspath(args.image_folder),
                    settings={"image_check": args.image_check, "tokenizer": args.tokenizer,
                              "max_length": args.max_length, "template": args.template, "image_tokens": image_tokens,
                              "max_image_pixels": args.max_image_pixels,
                              "allow_images_outside_folder": args.allow_images_outside_folder})
    duplicates = DuplicateIds()
    lengths: list[int] = []
    try:
        with RecordWriter(args.output) as writer:
            checked = check_records(iter_records(args.input), config, args.workers, args.chunk_size)
            for res in tqdm(checked, desc="validating", unit="rec", mininterval=1.0):
                issues, line = list(res.issues), res.line
                if line is not None:
                    new_id, issue = duplicates.check(res.record_id, line)
                    if issue is not None:
                        issues.append(issue)
                        if issue.action == DROPPED:
                            line = None
                        else:
                            rec = json.loads(line)
                            rec["id"] = new_id
                            line = record_line(rec)
                report.add(issues, res.source_id, res.position)
                if line is not None:
                    writer.write_line(line)
                    if res.token_length is not None:
                        lengths.append(res.token_length)
    except RecordFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if lengths:
        lengths.sort()
        report.extra["token_length"] = {
            "max": lengths[-1], "mean": round(statistics.fmean(lengths), 1),
            **{f"p{q}": lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in (50, 90, 99)},
        }
    return finish(report, report_path_for(args.output), args.strict)


if __name__ == "__main__":
    sys.exit(main())
