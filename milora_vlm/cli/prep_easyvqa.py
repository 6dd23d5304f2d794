"""Convert the easy-VQA package (PyPI `easy-vqa`) to LLaVA conversation JSONL and eval question files.

    python data_prep/easy_vqa.py --output data/easyvqa [--split-by open] [--seed 0] [--max-train N] [--max-eval N]

Writes, under --output: images/{train,test}/<id>.png, train_<family>.jsonl, test_<family>.jsonl,
image_labels.jsonl and summary.json (counts per family and category, skipped records). Families for
--split-by open (default): old = open colour questions, new = open shape questions; see milora_vlm/demo/easyvqa.py.
"""

from __future__ import annotations

import argparse
import os

from milora_vlm.cli import exit_status_zero
from milora_vlm.demo.easyvqa import DEFAULT_REPLAY, SPLITS, convert, format_summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--split-by", default="open", choices=sorted(SPLITS),
                    help="task families: open (old=open colour questions, new=open shape questions; the demo's), "
                         "attribute (old=colour, new=shape), question-type (old=open, new=yes/no), none")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --max-train / --max-eval subsets")
    ap.add_argument("--max-train", type=int, default=None, help="at most this many training questions per family")
    ap.add_argument("--max-eval", type=int, default=None, help="at most this many test questions per family")
    ap.add_argument("--no-balance", action="store_true",
                    help="keep the package's yes/no answer mix in the training files (default: balanced, see "
                         "milora_vlm/demo/easyvqa.py balance_yes_no)")
    ap.add_argument("--replay", type=float, default=DEFAULT_REPLAY,
                    help="also write train_new_replay.jsonl: the new family's training questions plus this fraction "
                         "(of their number) of old-family ones (default %(default)s; 0 = not written)")
    ap.add_argument("--no-copy-images", action="store_true", help="do not copy the images (they are already there)")
    args = ap.parse_args(argv)
    if not 0 <= args.replay <= 1:
        ap.error(f"--replay must be a fraction in [0, 1], got {args.replay}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        ap.error(f"--output {args.output} is a file; give a folder")
    summary = convert(args.output, args.split_by, args.seed, args.max_train, args.max_eval,
                      copy_images=not args.no_copy_images, balance=not args.no_balance,
                      replay=args.replay)
    print(format_summary(summary))
    return summary


entry = exit_status_zero(main)  # the console script


if __name__ == "__main__":
    main()
