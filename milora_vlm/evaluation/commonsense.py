"""Commonsense reasoning, the LLM-Adapters protocol (commonsense_evaluate.py) the MiLoRA paper follows.

Each data set's instructions end with an answer format; the prediction is the *first* match of that format's
regex in the generation (case-sensitive, as the reference), and it is right when it equals the gold `answer`:
  boolq: true|false    piqa: solution1|solution2    hellaswag: ending1..ending4    winogrande: option1|option2
  social_i_qa, ARC-Easy, ARC-Challenge, openbookqa: answer1..answer5
The format is read off each gold label, so one file may mix data sets; names come from a record's `dataset`
field or --dataset. The headline is the mean accuracy over the data sets present (the paper's "avg").
"""

from __future__ import annotations

import re
from collections import defaultdict

from .inputs import EvalInputError, Result, align, coverage_warnings, load_numbered_records, load_predictions, pct, record_id, require

FAMILY_PATTERNS = {
    "true/false": r"true|false",
    "solution": r"solution1|solution2",
    "answer": r"answer1|answer2|answer3|answer4|answer5",
    "ending": r"ending1|ending2|ending3|ending4",
    "option": r"option1|option2",
}
DATASET_FAMILY = {
    "boolq": "true/false",
    "piqa": "solution",
    "social_i_qa": "answer",
    "ARC-Easy": "answer",
    "ARC-Challenge": "answer",
    "openbookqa": "answer",
    "hellaswag": "ending",
    "winogrande": "option",
}
ALIASES = {"siqa": "social_i_qa", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "obqa": "openbookqa",
           "arc-e": "ARC-Easy", "arc-c": "ARC-Challenge"}
PAPER_ORDER = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]


def canonical_dataset(name: str) -> str:
    name = ALIASES.get(name.lower(), ALIASES.get(name, name))
    for known in DATASET_FAMILY:
        if known.lower() == name.lower():
            return known
    return name


def family_of_label(label: str) -> str | None:
    for family, pattern in FAMILY_PATTERNS.items():
        if re.fullmatch(pattern, label):
            return family
    return None


def extract_answer(family: str, text: str) -> str:
    """First match of the family's regex in the stripped generation; "" when there is none."""
    found = re.findall(FAMILY_PATTERNS[family], text.strip())
    return found[0] if found else ""


def score_commonsense(predictions: str, questions: str, dataset: str | None = None, allow_unknown: bool = False) -> Result:
    gold: dict[str, tuple[str, str, str]] = {}  # id -> (dataset, family, label)
    for index, (line_no, rec) in enumerate(load_numbered_records(questions)):
        qid = record_id(rec, line_no, index, questions, allow_index=True)
        if qid in gold:
            raise EvalInputError(f"{questions}:{line_no}: duplicate question_id {qid!r}")
        label = require(rec, "answer", questions, line_no)
        family = family_of_label(label)
        if family is None:
            raise EvalInputError(f"{questions}:{line_no}: answer {label!r} is in none of the LLM-Adapters answer formats")
        name = canonical_dataset(rec.get("dataset") or dataset or family)
        expected = DATASET_FAMILY.get(name)
        if expected is not None and expected != family:
            raise EvalInputError(f"{questions}:{line_no}: answer {label!r} does not fit data set {name!r} ({expected} answers)")
        gold[qid] = (name, family, label)
    preds = load_predictions(predictions)
    aligned, counts = align(list(gold), preds, allow_unknown)
    hits: dict[str, list[bool]] = defaultdict(list)
    for qid, text in aligned.items():
        name, family, label = gold[qid]
        pred = extract_answer(family, text) if text is not None else ""
        if text is not None and pred == "":
            counts.unparsable += 1
        hits[name].append(pred == label)
    order = [d for d in PAPER_ORDER if d in hits] + sorted(d for d in hits if d not in PAPER_ORDER)
    per_dataset = {d: pct(sum(hits[d]), len(hits[d])) for d in order}
    average = sum(per_dataset.values()) / len(per_dataset)
    metrics = {"per_dataset": per_dataset, "average": average, "num_per_dataset": {d: len(hits[d]) for d in order}}
    return Result("commonsense", average, metrics, counts, "LLM-Adapters: first answer-format match, exact",
                  coverage_warnings(counts))
