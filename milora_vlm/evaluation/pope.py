"""POPE (object hallucination): accuracy, precision, recall, F1 (positive = "yes") and yes-ratio per split.

A generation becomes yes/no as LLaVA's eval_pope.py decides: keep the text before the first '.', delete commas,
split on spaces; "No", "no" or "not" among the words means no, anything else yes. The headline is the F1
averaged over the splits (random, popular, adversarial), the number LLaVA-1.5 and the MiLoRA paper report.

Gold labels come either from the question file itself (rows with `category` and `label`), or, for LLaVA's
llava_pope_test.jsonl, from POPE's label files coco_pope_<split>.json in --annotation-dir. LLaVA pairs answers and
labels by position; here they are paired by (split, image, question text), so order and gaps cannot shift them.
A missing answer counts as the wrong label. An empty answer reads "yes", as in LLaVA; since it means the model
produced nothing, their number is reported (`empty_answers`, per split and in total).
"""

from __future__ import annotations

import os
from collections import defaultdict

from .inputs import EvalInputError, Result, align, coverage_warnings, load_numbered_records, load_predictions, pct, record_id, require


def pope_answer(text: str) -> str:
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _label(value, path: str, line_no: int) -> str:
    if value not in ("yes", "no"):
        raise EvalInputError(f"{path}:{line_no}: field 'label' must be 'yes' or 'no', got {value!r}")
    return value


def _first_line(text: str) -> str:
    return text.split("\n")[0].strip()


def load_pope_gold(questions: str, annotation_dir: str | None) -> dict[str, tuple[str, str]]:
    """{question_id: (split, label)}."""
    rows = load_numbered_records(questions)
    gold: dict[str, tuple[str, str]] = {}
    labels_by_key: dict[tuple[str, str, str], str] = {}
    if annotation_dir is not None:
        files = sorted(f for f in os.listdir(annotation_dir) if f.startswith("coco_pope_") and f.endswith(".json"))
        if not files:
            raise EvalInputError(f"{annotation_dir}: no coco_pope_<split>.json label files")
        for name in files:
            split = name[len("coco_pope_"):-len(".json")]
            path = os.path.join(annotation_dir, name)
            for line_no, rec in load_numbered_records(path):
                key = (split, require(rec, "image", path, line_no), _first_line(require(rec, "text", path, line_no)))
                if key in labels_by_key:
                    raise EvalInputError(f"{path}:{line_no}: the same image and question appear twice in split {split!r}")
                labels_by_key[key] = _label(rec.get("label"), path, line_no)
    for index, (line_no, rec) in enumerate(rows):
        qid = record_id(rec, line_no, index, questions)
        if qid in gold:
            raise EvalInputError(f"{questions}:{line_no}: duplicate question_id {qid!r}")
        split = require(rec, "category", questions, line_no)
        if "label" in rec:
            gold[qid] = (split, _label(rec["label"], questions, line_no))
            continue
        if annotation_dir is None:
            raise EvalInputError(f"{questions}:{line_no}: no 'label' field; pass --annotation-dir with POPE's label files")
        key = (split, require(rec, "image", questions, line_no), _first_line(require(rec, "text", questions, line_no)))
        if key not in labels_by_key:
            raise EvalInputError(f"{questions}:{line_no}: no label for this image and question in coco_pope_{split}.json")
        gold[qid] = (split, labels_by_key[key])
    return gold


def binary_metrics(pairs: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """(prediction, label) pairs of "yes"/"no" -> accuracy, precision, recall, F1, yes-ratio in 0-100."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    warnings = []
    if tp + fp == 0:
        warnings.append("no 'yes' predictions: precision (and F1) set to 0")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": pct(tp + tn, len(pairs)),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": pct(tp + fp, len(pairs)),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }, warnings


def score_pope(predictions: str, questions: str, annotation_dir: str | None = None, allow_unknown: bool = False) -> Result:
    gold = load_pope_gold(questions, annotation_dir)
    preds = load_predictions(predictions)
    aligned, counts = align(list(gold), preds, allow_unknown)
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    empty: dict[str, int] = defaultdict(int)
    for qid, text in aligned.items():
        split, label = gold[qid]
        if text is not None and not text.strip():
            empty[split] += 1
        pred = pope_answer(text) if text is not None else ("no" if label == "yes" else "yes")
        pairs[split].append((pred, label))
    per_split, warnings = {}, []
    for split in sorted(pairs):
        per_split[split], w = binary_metrics(pairs[split])
        per_split[split]["empty_answers"] = empty[split]
        warnings += [f"split {split!r}: {m}" for m in w]
    mean = {k: sum(m[k] for m in per_split.values()) / len(per_split) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    metrics = {"per_split": per_split, "mean": mean, "empty_answers": sum(empty.values())}
    if metrics["empty_answers"]:
        warnings.append(f"{metrics['empty_answers']} answers are empty (the model produced nothing): scored 'yes', "
                        "as LLaVA's eval_pope does")
    return Result("pope", mean["f1"], metrics, counts, "LLaVA eval_pope.py yes/no parsing; score = mean F1 over splits",
                  warnings + coverage_warnings(counts))
