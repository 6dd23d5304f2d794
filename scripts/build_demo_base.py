#!/usr/bin/env python
"""Build the demo's base model (stage 0): a tiny LLaVA trained from scratch on easy-VQA's "pretrained knowledge".

    python scripts/build_demo_base.py --data DATA_DIR --output DIR [--force] [--logging-dir DIR]

DATA_DIR is data_prep/easy_vqa.py's output. DIR receives a llava-hf model + processor and demo_base.json (how it
was made, accuracies, seconds); an existing finished DIR is reused unless --force. See milora_vlm/demo/base_model.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from milora_vlm.demo.spec import INFO_FILE, BaseModelSpec, is_built


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder written by data_prep/easy_vqa.py")
    p.add_argument("--output", required=True, help="where to save the base model")
    p.add_argument("--force", action="store_true", help="rebuild even if --output holds a finished base model")
    p.add_argument("--logging-dir", help="TensorBoard folder for the stage-0 losses")
    for f in dataclasses.fields(BaseModelSpec):  # every size / schedule setting, e.g. --vision-epochs 4
        flag = f"--{f.name.replace('_', '-')}"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f"default {f.default}")
            continue
        kind = int if f.type in ("int", "int | None") else float if f.type == "float" else str
        p.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if is_built(args.output) and not args.force:
        print(f"base model already built: {args.output} (see {INFO_FILE}; --force rebuilds)")
        return 0
    from milora_vlm.demo.base_model import build_base_model  # torch and transformers: only to build

    spec = BaseModelSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BaseModelSpec)})
    info = build_base_model(args.data, args.output, spec, log_dir=args.logging_dir)
    print(json.dumps({k: info[k] for k in ("vision", "align", "knowledge", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
