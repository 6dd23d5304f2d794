"""GQA accuracy as GQA's own eval.py computes it on testdev-balanced (the number LLaVA reports).

Gold: the official questions file, a JSON object {questionId: {"answer", "question", "types": {"structural",
"semantic"}, "isBalanced", ...}}. A prediction is right when it equals the gold answer exactly. LLaVA's
conversion step (convert_gqa_for_eval.py) turns a raw generation into a prediction with `rstrip('.').lower()`;
official prediction files ({"questionId", "prediction"}) are compared as they are. Only balanced questions
count; "open" questions are those of structural type "query", the rest are "binary".
"""

from __future__ import annotations

from collections import defaultdict

from .inputs import EvalInputError, Result, align, coverage_warnings, load_json_any, load_predictions, pct


def llava_gqa_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def score_gqa(predictions: str, questions: str, allow_unknown: bool = False) -> Result:
    data = load_json_any(questions)
    if not isinstance(data, dict):
        raise EvalInputError(f"{questions}: expected GQA's questions object {{questionId: question}}")
    gold: dict[str, dict] = {}
    for qid, q in data.items():
        if not isinstance(q, dict) or not isinstance(q.get("answer"), str):
            raise EvalInputError(f"{questions}: question {qid!r} has no string 'answer'")
        if q.get("isBalanced", True):
            gold[str(qid)] = q
    preds = load_predictions(predictions, id_keys=("questionId", "question_id"), answer_keys=("prediction",))
    # Predictions for unbalanced questions are legitimate (the full testdev file has them) and simply not scored.
    in_file = {pid for pid in preds.texts if str(pid) in data}
    for pid in in_file - set(gold):
        preds.texts.pop(pid)
    aligned, counts = align(list(gold), preds, allow_unknown)
    convert = llava_gqa_prediction if preds.raw_generations else (lambda s: s)
    scores: dict[str, float] = {}
    groups: dict[str, dict[str, list[float]]] = {"structural": defaultdict(list), "semantic": defaultdict(list),
                                                 "binary_open": defaultdict(list)}
    for qid, text in aligned.items():
        q = gold[qid]
        s = 1.0 if text is not None and convert(text) == q["answer"] else 0.0
        scores[qid] = s
        types = q.get("types") or {}
        if "structural" in types:
            groups["structural"][types["structural"]].append(s)
            groups["binary_open"]["open" if types["structural"] == "query" else "binary"].append(s)
        if "semantic" in types:
            groups["semantic"][types["semantic"]].append(s)
    metrics = {
        "accuracy": pct(sum(scores.values()), len(scores)),
        **{k: pct(sum(v), len(v)) for k, v in sorted(groups["binary_open"].items())},
        "per_structural_type": {k: pct(sum(v), len(v)) for k, v in sorted(groups["structural"].items())},
        "per_semantic_type": {k: pct(sum(v), len(v)) for k, v in sorted(groups["semantic"].items())},
        "prediction_processing": "rstrip('.').lower()" if preds.raw_generations else "none",
    }
    return Result("gqa", metrics["accuracy"], metrics, counts, "GQA eval.py accuracy on balanced questions",
                  coverage_warnings(counts))
