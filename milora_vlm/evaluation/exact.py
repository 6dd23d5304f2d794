"""Exact match for this project's own evaluation files (the easy-VQA demo's "new task" and "old knowledge").

Gold: a question JSONL with `question_id`, `answer` and optionally `category`. Prediction and gold are both
normalised the same way (first line, lower-cased, surrounding whitespace and trailing '.' removed) and must
then be equal. Accuracy overall and per category.
"""

from __future__ import annotations

from collections import defaultdict

from .inputs import EvalInputError, Result, align, coverage_warnings, load_numbered_records, load_predictions, pct, record_id, require


def normalize_exact(text: str) -> str:
    lines = text.strip().split("\n")
    return lines[0].strip().lower().rstrip(".").strip()


def score_exact(predictions: str, questions: str, allow_unknown: bool = False) -> Result:
    gold: dict[str, tuple[str, str | None]] = {}
    for index, (line_no, rec) in enumerate(load_numbered_records(questions)):
        qid = record_id(rec, line_no, index, questions)
        if qid in gold:
            raise EvalInputError(f"{questions}:{line_no}: duplicate question_id {qid!r}")
        category = rec.get("category")
        gold[qid] = (require(rec, "answer", questions, line_no), None if category is None else str(category))
    preds = load_predictions(predictions)
    aligned, counts = align(list(gold), preds, allow_unknown)
    hits: list[bool] = []
    per_category: dict[str, list[bool]] = defaultdict(list)
    for qid, text in aligned.items():
        answer, category = gold[qid]
        ok = text is not None and normalize_exact(text) == normalize_exact(answer)
        hits.append(ok)
        if category is not None:
            per_category[category].append(ok)
    accuracy = pct(sum(hits), len(hits))
    metrics = {"accuracy": accuracy,
               "per_category": {c: pct(sum(v), len(v)) for c, v in sorted(per_category.items())},
               "num_per_category": {c: len(v) for c, v in sorted(per_category.items())}}
    return Result("exact", accuracy, metrics, counts, "normalised exact match (first line, lower, strip, trailing '.')",
                  coverage_warnings(counts))
