"""Subspace analysis of finetuned checkpoints against their base (LoRA paper 7.3, as the MiLoRA paper uses it).

    python scripts/analyze_subspace.py --base BASE --adapter DIR [--adapter DIR2 ...] --output OUTDIR
        [--label NAME ...] [--rank R] [--modules q_proj v_proj | --modules-regex REGEX] [--layers 15 16]
        [--device cuda] [--svd-dtype float64] [--grid-module NAME ...]

Each --adapter is a MiLoRA adapter (save_milora), a plain PEFT LoRA adapter, or a fully finetuned model
(then --rank is required). Writes OUTDIR/<label>/{subspace.json, subspace.md, heatmap_*.png,
similarity_*.png} per checkpoint, and OUTDIR/comparison.{md,png} (figures averaged over modules).
For 7B models pick a few layers (--layers) or --device cuda: every module costs a full SVD of W.
"""

from __future__ import annotations

import argparse
import os

import torch
from peft import NoMatchingPeftModuleError

from milora_vlm.cli import exit_status_zero
from milora_vlm import analysis as an

# (figure of SubspaceReport.flat(), column title) compared across checkpoints
COMPARISON_FIGURES = [
    ("mean/delta_norm", "‖ΔW‖"),
    ("mean/delta_proj_norm", "‖UᵀWV‖"),
    ("mean/weight_top_norm", "W top-r"),
    ("mean/random_proj_norm", "random"),
    ("mean/amplification", "amplification"),
    ("mean/sim_left_top", "φ_U top"),
    ("mean/sim_left_bottom", "φ_U bottom"),
    ("mean/sim_right_top", "φ_V top"),
    ("mean/sim_right_bottom", "φ_V bottom"),
]


def unique_labels(paths: list[str], labels: list[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(paths):
            raise SystemExit(f"--label given {len(labels)} times for {len(paths)} --adapter paths")
        names = list(labels)
    else:
        names = [os.path.basename(os.path.normpath(p)) or "checkpoint" for p in paths]
    seen: dict[str, int] = {}
    out = []
    for n in names:  # two checkpoints called "final" from different runs must not overwrite each other's files
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def main(argv: list[str] | None = None) -> dict[str, an.SubspaceReport]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the base model directory the checkpoints were trained from")
    ap.add_argument("--adapter", required=True, action="append", help="adapter or finetuned model directory (repeatable)")
    ap.add_argument("--output", required=True, help="output directory")
    ap.add_argument("--label", action="append", help="a name per --adapter for tables and folders (default: folder names)")
    ap.add_argument("--rank", type=int, help="r: dW's top-r directions (default: the adapter's rank; required for full finetunes)")
    sel = ap.add_mutually_exclusive_group()
    sel.add_argument("--modules", nargs="+", help="module name suffixes to analyse, e.g. q_proj v_proj (default: all adapted)")
    sel.add_argument("--modules-regex", help="regex that full module names must match")
    ap.add_argument("--layers", type=int, nargs="+", help="only these layer indices")
    ap.add_argument("--grid-module", action="append",
                    help="modules whose phi(i, j) grids are plotted (default: the middle layer's q_proj)")
    ap.add_argument("--device", default=None, help="device for the SVDs, e.g. cuda (default: cpu)")
    ap.add_argument("--svd-dtype", default="float64", choices=["float64", "float32"])
    args = ap.parse_args(argv)

    if args.rank is not None and args.rank < 1:
        raise SystemExit(f"--rank must be >= 1, got {args.rank}")
    for p in [args.base, *args.adapter]:
        if not os.path.isdir(p):
            raise SystemExit(f"{p}: no such directory")
    targets = args.modules_regex or args.modules
    labels = unique_labels(args.adapter, args.label)
    dtype = getattr(torch, args.svd_dtype)
    reports = {}
    for path, label in zip(args.adapter, labels):
        try:
            report = an.analyze_checkpoint(args.base, path, label=label, rank=args.rank, targets=targets,
                                           layers=args.layers, grid_modules=args.grid_module or "default",
                                           device=args.device, dtype=dtype)
        except NoMatchingPeftModuleError as e:
            raise SystemExit(f"error: {path}: its adapter's modules are not in --base {args.base} (is that the model "
                             f"it was trained on?): {e}") from None
        except (ValueError, OSError) as e:  # each names the checkpoint and the option to fix
            raise SystemExit(f"error: {path}: {e}") from None
        paths = an.write_report(report, os.path.join(args.output, an.safe_name(label)))
        reports[label] = report
        print(f"{label}: {len(report.modules)} modules analysed, {len(report.skipped)} skipped -> {os.path.dirname(paths['json'])}")
        if report.skipped:
            print("  skipped: " + "; ".join(report.skipped[:10]))

    summaries = {label: an.summarize_over_seeds([r]) for label, r in reports.items()}
    os.makedirs(args.output, exist_ok=True)
    table = an.comparison_table(summaries, COMPARISON_FIGURES)
    with open(os.path.join(args.output, "comparison.md"), "w", encoding="utf-8") as f:
        f.write("## Subspace analysis, mean over analysed modules\n\n" + table + "\n" + an.TABLE_LEGEND + "\n")
    an.plot_comparison(summaries, COMPARISON_FIGURES[1:2] + COMPARISON_FIGURES[4:], os.path.join(args.output, "comparison.png"))
    print(table)
    return reports


entry = exit_status_zero(main)  # the console script


if __name__ == "__main__":
    main()
