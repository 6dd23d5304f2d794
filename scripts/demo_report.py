#!/usr/bin/env python
"""The demo's bookkeeping (scripts/demo.sh): question subsets, and the results table and JSON.

    python scripts/demo_report.py subset --input test_old.jsonl --limit 1000 --output questions_old.jsonl
    python scripts/demo_report.py report --output demo_out

`report` reads what the earlier steps wrote under OUTPUT (eval/score_<model>_<family>.json from eval/score.py,
base/demo_base.json, the MiLoRA run's trainer_state.json and the timing.* stage marks) and writes
OUTPUT/results.json, OUTPUT/results.md and OUTPUT/accuracy.png, and prints the table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time

from milora_vlm.data.subset import seeded_subset

MODELS = {"base": "base model (stage 0)", "milora": "after MiLoRA on the new task"}
FAMILIES = {"old": "old task: colour questions", "new": "new task: shape questions"}
STAGES = ("data", "base", "train", "eval")
# The targets the demo is built to meet (issue 6): new-task accuracy, and how far the old task may drop.
NEW_TASK_TARGET = 95.0
OLD_TASK_MAX_DROP = 2.0


def subset(input_path: str, limit: int, output: str, seed: int = 0) -> int:
    """A seeded subset of at most `limit` lines of a JSONL file, in file order (the same for every model)."""
    with open(input_path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    if not lines:
        raise SystemExit(f"{input_path}: no questions")
    lines = seeded_subset(lines, limit, seed)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return len(lines)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: missing; the step that writes it did not finish (see scripts/demo.sh)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _stage_seconds(out: str) -> dict[str, float]:
    """Seconds per stage from the timing.<stage> files demo.sh writes at each stage's end."""
    marks = {}
    for path in glob.glob(os.path.join(out, "timing.*")):
        with open(path, encoding="utf-8") as f:
            marks[path.rsplit(".", 1)[1]] = int(f.read().strip())
    seconds, prev = {}, marks.get("start")
    for stage in STAGES:
        if stage in marks and prev is not None:
            seconds[stage] = marks[stage] - prev
            prev = marks[stage]
    return seconds


def _training_summary(run_dir: str) -> dict:
    """Steps, runtime and first/last logged loss of the MiLoRA run (the Trainer's own trainer_state.json)."""
    state_files = sorted(glob.glob(os.path.join(run_dir, "**", "trainer_state.json"), recursive=True))
    if not state_files:
        return {}
    state = _read_json(state_files[-1])
    losses = [h["loss"] for h in state.get("log_history", []) if "loss" in h]
    end = next((h for h in reversed(state.get("log_history", [])) if "train_runtime" in h), {})
    return {"steps": state.get("global_step"), "train_runtime_s": end.get("train_runtime"),
            "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None}


def collect(out: str) -> dict:
    scores = {(m, fam): _read_json(os.path.join(out, "eval", f"score_{m}_{fam}.json")) for m in MODELS for fam in FAMILIES}
    for (m, fam), s in scores.items():
        c = s.get("counts", {})
        if c.get("missing"):
            raise SystemExit(f"{out}/eval/score_{m}_{fam}.json: {c['missing']} of {c.get('gold')} questions have no "
                             f"answer; re-run scripts/demo.sh")
    base_info = _read_json(os.path.join(out, "base", "demo_base.json"))
    results = {
        "base_old_task_accuracy": scores["base", "old"]["score"],
        "base_new_task_accuracy": scores["base", "new"]["score"],
        "old_task_accuracy": scores["milora", "old"]["score"],
        "new_task_accuracy": scores["milora", "new"]["score"],
    }
    results["old_task_drop"] = round(results["base_old_task_accuracy"] - results["old_task_accuracy"], 2)
    results["targets"] = {
        f"new_task_accuracy >= {NEW_TASK_TARGET}": results["new_task_accuracy"] >= NEW_TASK_TARGET,
        f"old_task_drop <= {OLD_TASK_MAX_DROP}": results["old_task_drop"] <= OLD_TASK_MAX_DROP,
    }
    results["per_category"] = {f"{m}/{fam}": scores[m, fam]["metrics"]["per_category"] for m in MODELS for fam in FAMILIES}
    results["questions"] = {fam: scores["base", fam]["counts"]["gold"] for fam in FAMILIES}
    results["stage_seconds"] = _stage_seconds(out)
    # start to the end of the last stage (the report itself takes a second), so a re-run report says the same
    results["wall_seconds"] = sum(results["stage_seconds"].values())
    results["base_model"] = {k: base_info.get(k) for k in ("vision", "align", "knowledge", "seconds")}
    results["training"] = _training_summary(os.path.join(out, "milora"))
    results["machine"] = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(),
                          "cpus": os.cpu_count(), "device": _device()}
    return results


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def markdown(r: dict) -> str:
    q = r["questions"]
    rows = [
        "| model | old task (colour) % | new task (shape) % |",
        "|---|---|---|",
        f"| {MODELS['base']} | {r['base_old_task_accuracy']:.2f} | {r['base_new_task_accuracy']:.2f} |",
        f"| {MODELS['milora']} | {r['old_task_accuracy']:.2f} | {r['new_task_accuracy']:.2f} |",
    ]
    ok = ", ".join(f"{name}: {'met' if met else 'MISSED'}" for name, met in r["targets"].items())
    stages = ", ".join(f"{k} {v} s" for k, v in r["stage_seconds"].items())
    return "\n".join([
        "# easy-VQA demo: MiLoRA learns a new task and keeps the old one",
        "",
        f"Exact-match accuracy on {q['old']} old-task and {q['new']} new-task test questions (greedy answers, "
        "eval/generate.py + eval/score.py --task exact).",
        "",
        *rows,
        "",
        f"Old-task drop: {r['old_task_drop']:.2f} points. Targets: {ok}.",
        f"Wall time {r['wall_seconds']} s ({stages}) on {r['machine']['device']}, {r['machine']['cpus']} CPUs, "
        f"{r['machine']['date']}.",
        "",
        "Per category (%): " + "; ".join(f"{k}: " + ", ".join(f"{c} {v:.1f}" for c, v in cats.items())
                                       for k, cats in r["per_category"].items()),
        "",
    ])


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(len(FAMILIES))
    for i, (m, label) in enumerate(MODELS.items()):
        vals = [r[f"base_{fam}_task_accuracy"] if m == "base" else r[f"{fam}_task_accuracy"] for fam in FAMILIES]
        bars = ax.bar([x + (i - 0.5) * 0.38 for x in xs], vals, width=0.38, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(xs), [FAMILIES[f] for f in FAMILIES], fontsize=8)
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 125)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("subset", help="seeded subset of a question file")
    s.add_argument("--input", required=True)
    s.add_argument("--limit", type=int, required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--seed", type=int, default=0)
    rep = sub.add_parser("report", help="results table and JSON of a finished demo run")
    rep.add_argument("--output", required=True, help="the demo's OUTPUT_DIR")
    args = ap.parse_args(argv)
    if args.command == "subset":
        if args.limit < 1:
            raise SystemExit(f"--limit must be >= 1, got {args.limit}")
        n = subset(args.input, args.limit, args.output, args.seed)
        print(f"{args.output}: {n} questions")
        return 0
    results = collect(args.output)
    with open(os.path.join(args.output, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    text = markdown(results)
    with open(os.path.join(args.output, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plot(results, os.path.join(args.output, "accuracy.png"))
    print(text)
    print(f"written: {args.output}/results.json, results.md, accuracy.png; loss curve: {args.output}/milora/loss_curve.png; "
          f"TensorBoard: tensorboard --logdir {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
