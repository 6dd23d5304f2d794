"""Export a trained MiLoRA adapter (a save_milora directory) as a merged checkpoint or a plain rank-2r LoRA.

    python scripts/export_adapter.py --adapter runs/x/adapter [--base path/to/base] --to merged --output out/merged
    python scripts/export_adapter.py --adapter runs/x/adapter --to lora --output out/lora_2r

(also installed as the console script `milora-export`)
"""

from __future__ import annotations

import argparse
import logging

from milora_vlm.cli import exit_status_zero
from milora_vlm.export import FORMATS, export_adapter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="directory written by save_milora (or a checkpoint-N of it)")
    parser.add_argument("--base", help="the original base checkpoint for --to merged (default: the one the adapter's "
                        "adapter_config.json names)")
    parser.add_argument("--to", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="a new or empty directory")
    parser.add_argument("--overwrite", action="store_true", help="replace what is in --output (an earlier export)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export_adapter(args.adapter, args.base, args.to, args.output, overwrite=args.overwrite)
    except (ValueError, OSError, KeyError) as e:  # each names the file and what is wrong with it
        parser.error(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
    print(f"exported {args.adapter} as {args.to} to {out}")


entry = exit_status_zero(main)  # the console script

if __name__ == "__main__":
    main()
