"""GSM8K: MetaMath's eval_gsm8k.py (strict default), or the MiLoRA paper's grader (`--protocol milora`).

The prediction is the first number (regex `[-+]?\\d*[.,/]?\\d+`) after the last "The answer is: " in the
generation, with MetaMath's quirks kept: a fraction a/b becomes round(a / b), any other number is rounded to an
integer with Python's round(), and one comma is allowed inside the number ("1,234" -> 1234, while "1,234,567"
reads as 1234). Gold is the integer after "#### " in the reference answer (commas removed). Right when the
two are numerically equal (strict). The MiLoRA repository's gsm8k_inference.py extracts the same number and
also accepts `grader.math_equal(prediction, gold)`: within relative 1e-4 of gold, gold / 100 or gold * 100
(see milora_grader.py), so "1800" is right for 18 there.
"""

from __future__ import annotations

import math
import re
import unicodedata
from fractions import Fraction

from .inputs import EvalInputError, Result, align, coverage_warnings, load_numbered_records, load_predictions, pct, record_id
from .math_equivalence import check_protocol
from .milora_grader import gsm8k_equal

ANSWER_MARK = "The answer is: "
_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(s)
        return True
    except (TypeError, ValueError):
        return False


def extract_gsm8k_number(completion: str) -> int | None:
    """The reference's number after "The answer is: "; None where the reference finds none, and also where it
    would crash (a number too large for a float, more digits than int() converts): unparsable, not an abort."""
    try:
        return _extract(completion)
    except (OverflowError, ValueError):
        return None


def _extract(completion: str) -> int | None:
    parts = completion.split(ANSWER_MARK)
    if len(parts) < 2:
        return None
    match = _NUMBER.search(parts[-1].strip())
    if match is None:
        return None
    number = match.group()
    if "/" in number:
        numerator, denominator = number.split("/")
        if not (_is_number(numerator) and _is_number(denominator)):
            return None
        if denominator == "0":
            return round(float(numerator.replace(",", "")))
        if int(denominator) == 0:  # "5/00": the reference stops the whole run; here it is unparsable
            return None
        return round(float(Fraction(number.replace(",", ""))))
    value = float(number.replace(",", ""))
    return None if value == float("inf") else round(value)


def gsm8k_gold(answer: str) -> float:
    """The number after "#### " (or the whole text when there is no "#### "), commas removed."""
    text = answer.split("#### ")[1] if "#### " in answer else answer
    value = float(text.strip().replace(",", ""))
    if not math.isfinite(value):
        raise ValueError(f"gold {text.strip()[:40]!r} is not a finite number")
    return value


def score_gsm8k(predictions: str, questions: str, allow_unknown: bool = False, protocol: str = "strict") -> Result:
    """`questions`: GSM8K's test.jsonl ("question", "answer"), MetaMath's GSM8K_test.jsonl ("query", "response"),
    or this project's question JSONL with `answer`; records without `question_id` are numbered from 0."""
    check_protocol(protocol)
    gold: dict[str, float] = {}
    for index, (line_no, rec) in enumerate(load_numbered_records(questions)):
        qid = record_id(rec, line_no, index, questions, allow_index=True)
        if qid in gold:
            raise EvalInputError(f"{questions}:{line_no}: duplicate question_id {qid!r}")
        field = "answer" if "answer" in rec else "response"
        raw = rec.get(field)
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise EvalInputError(f"{questions}:{line_no}: missing gold field 'answer' (or 'response')")
        try:
            gold[qid] = gsm8k_gold(str(raw))
        except (ValueError, IndexError):
            raise EvalInputError(f"{questions}:{line_no}: field {field!r} has no number after '#### '") from None
    preds = load_predictions(predictions)
    aligned, counts = align(list(gold), preds, allow_unknown)
    correct = 0
    for qid, text in aligned.items():
        pred = extract_gsm8k_number(text) if text is not None else None
        if text is not None and pred is None:
            counts.unparsable += 1
        if pred is not None:
            correct += float(pred) == gold[qid] if protocol == "strict" else gsm8k_equal(pred, gold[qid])
    accuracy = pct(correct, len(aligned))
    description = ("milora: MiLoRA repo gsm8k_inference.py, equal or grader.math_equal" if protocol == "milora" else
                   "strict: MetaMath eval_gsm8k.py, number after the last 'The answer is: ', equal")
    return Result("gsm8k", accuracy, {"accuracy": accuracy, "protocol": protocol}, counts, description,
                  coverage_warnings(counts))
