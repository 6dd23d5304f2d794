"""Score predictions exactly as a published benchmark does; print one JSON object (and write it with --output).

  python eval/score.py --task vqav2 --predictions answers.jsonl --annotations v2_mscoco_val2014_annotations.json
  python eval/score.py --task exact --predictions answers.jsonl --questions questions.jsonl --output score.json

`--predictions` takes eval/generate.py's answers JSONL (question_id, prompt, text, model_id) for every task, or
the benchmark's official result format. Warnings (missing / unparsable predictions, all scored as wrong) go to
stderr; bad inputs stop the run with a message naming file, line and field (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from milora_vlm.evaluation.inputs import EvalInputError
from milora_vlm.evaluation.math_equivalence import PROTOCOLS
from milora_vlm.evaluation.tasks import TASKS, run_task
from milora_vlm.evaluation.vqa import ANSWER_PROCESSING


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS),
                   help="; ".join(f"{k}: {t.summary}" for k, t in sorted(TASKS.items())))
    p.add_argument("--predictions", help="answers JSONL from eval/generate.py, or the official result file")
    p.add_argument("--annotations", help="vqav2/vizwiz/textvqa: the official annotation file")
    p.add_argument("--questions", help="question/gold file (official or this project's question JSONL)")
    p.add_argument("--annotation-dir", help="pope: folder with coco_pope_<split>.json label files")
    p.add_argument("--problems", help="scienceqa: problems.json")
    p.add_argument("--split", help="scienceqa: split to score (default test)")
    p.add_argument("--split-file", help="scienceqa: pid_splits.json (else the problems' own 'split' field)")
    p.add_argument("--mme-root", help="mme: the MME_Benchmark_release_version folder (gold answers)")
    p.add_argument("--dataset", help="commonsense: data set name for records without a 'dataset' field")
    p.add_argument("--time-limit", type=float,
                   help="math: seconds per symbolic comparison (default 5; 0 = strict: off, milora: no limit)")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="math/gsm8k: 'strict' (default) or 'milora', the grader of the MiLoRA paper's tables")
    p.add_argument("--answer-processing", choices=ANSWER_PROCESSING,
                   help="vqav2/vizwiz: 'auto' (default) applies LLaVA's EvalAI processing to raw generations only")
    p.add_argument("--allow-unknown", action="store_true",
                   help="ignore (and count) predictions whose ids are not in the gold file instead of failing")
    p.add_argument("--output", help="also write the JSON result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    inputs = {k: v for k, v in vars(args).items() if k not in ("task", "output")}
    try:
        result = run_task(args.task, **inputs).to_dict()
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in result.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
