"""MME: per-subtask acc (per question) and acc+ (per image: all its questions right), score = 100 (acc + acc+);
perception = the sum over its 10 subtasks, cognition over its 4 (MME's calculation.py).

A generation becomes yes / no / other as calculation.py decides, after lower-casing: exactly "yes" or "no", else
"yes" if the first four characters contain "yes", else "no" if they contain "no", else "other" (wrong).
calculation.py pairs a subtask's lines two by two as the two questions of one image; here questions are grouped
by (subtask, image), so the order of the answers file does not matter.

Gold: either the question file itself (rows with `category`, `image` and `answer` Yes/No), or LLaVA's
llava_mme.jsonl plus the MME release folder (--mme-root), whose questions_answers_YN/*.txt hold the answers; the
question is matched the way LLaVA's convert_answer_to_mme.py matches it.
"""

from __future__ import annotations

import os
from collections import defaultdict

from .inputs import EvalInputError, Result, align, coverage_warnings, load_numbered_records, load_predictions, pct, record_id, require

PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
_LLAVA_SUFFIX = "Answer the question using a single word or phrase."
_YES_NO = "Please answer yes or no."


def mme_answer(text: str) -> str:
    text = text.lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def load_mme_release(root: str) -> dict[tuple[str, str, str], str]:
    """{(subtask, answer file name, question): "Yes"/"No"} from the MME release folder."""
    gt: dict[tuple[str, str, str], str] = {}
    for category in sorted(os.listdir(root)):
        cat_dir = os.path.join(root, category)
        if not os.path.isdir(cat_dir):
            continue
        qa_dir = os.path.join(cat_dir, "questions_answers_YN") if os.path.isdir(os.path.join(cat_dir, "images")) else cat_dir
        for name in sorted(os.listdir(qa_dir)):
            if not name.endswith(".txt"):
                continue
            path = os.path.join(qa_dir, name)
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise EvalInputError(f"{path}:{line_no}: expected 'question<TAB>answer'")
                    gt[(category, name, parts[0])] = parts[1]
    if not gt:
        raise EvalInputError(f"{root}: no MME question/answer files found")
    return gt


def _release_answer(gt: dict, category: str, image: str, prompt: str) -> str | None:
    """convert_answer_to_mme.py's lookup: drop LLaVA's suffix, make sure the yes/no instruction is there."""
    name = os.path.basename(image).split(".")[0] + ".txt"
    question = prompt.replace(_LLAVA_SUFFIX, "").strip() if _LLAVA_SUFFIX in prompt else prompt
    if _YES_NO not in question:
        question = question + " " + _YES_NO
        if (category, name, question) not in gt:
            question = question.replace(" " + _YES_NO, "  " + _YES_NO)
    return gt.get((category, name, question))


def question_key(qid: str, text: str) -> str:
    """LLaVA's llava_mme.jsonl gives both questions of an image the same question_id ("<subtask>/<image>"), so a
    question is (question_id, text); answers carry the text as `prompt`."""
    return f"{qid}\x1f{text}"


def load_mme_gold(questions: str, mme_root: str | None) -> dict[str, tuple[str, str, str]]:
    """{question key: (subtask, image, "yes"/"no")}."""
    release = load_mme_release(mme_root) if mme_root is not None else None
    gold: dict[str, tuple[str, str, str]] = {}
    for index, (line_no, rec) in enumerate(load_numbered_records(questions)):
        qid = record_id(rec, line_no, index, questions)
        text = require(rec, "text", questions, line_no)
        key = question_key(qid, text)
        if key in gold:
            raise EvalInputError(f"{questions}:{line_no}: the same question_id and text appear twice")
        category = rec.get("category") or qid.split("/")[0]
        image = require(rec, "image", questions, line_no)
        if "answer" in rec:
            answer = require(rec, "answer", questions, line_no)
        elif release is not None:
            answer = _release_answer(release, category, image, text)
            if answer is None:
                raise EvalInputError(f"{questions}:{line_no}: question not found in the MME release under {category!r}")
        else:
            raise EvalInputError(f"{questions}:{line_no}: no 'answer' field; pass --mme-root with the MME release")
        if answer.lower() not in ("yes", "no"):
            raise EvalInputError(f"{questions}:{line_no}: gold answer must be Yes or No, got {answer!r}")
        gold[key] = (category, image, answer.lower())
    return gold


def _prediction_key(rec: dict, qid: str) -> str:
    if not isinstance(rec.get("prompt"), str):
        raise ValueError("an MME answer needs its question text in 'prompt'")
    return question_key(qid, rec["prompt"])


def score_mme(predictions: str, questions: str, mme_root: str | None = None, allow_unknown: bool = False) -> Result:
    gold = load_mme_gold(questions, mme_root)
    preds = load_predictions(predictions, key_fn=_prediction_key)
    aligned, counts = align(list(gold), preds, allow_unknown)
    per_question: dict[str, list[bool]] = defaultdict(list)
    per_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for qid, text in aligned.items():
        category, image, label = gold[qid]
        pred = mme_answer(text) if text is not None else "other"
        if text is not None and pred == "other":
            counts.unparsable += 1
        per_question[category].append(pred == label)
        per_image[(category, image)].append(pred == label)
    warnings = []
    subtasks = {}
    for category in sorted(per_question):
        images = [ok for (c, _), ok in per_image.items() if c == category]
        odd = sum(len(v) != 2 for v in images)
        if odd:
            warnings.append(f"subtask {category!r}: {odd} images do not have exactly 2 questions")
        acc = pct(sum(per_question[category]), len(per_question[category]))
        acc_plus = pct(sum(all(v) for v in images), len(images))
        subtasks[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    totals = {}
    for name, members in (("perception", PERCEPTION), ("cognition", COGNITION)):
        present = [m for m in members if m in subtasks]
        totals[name] = sum(subtasks[m]["score"] for m in present)
        if present and len(present) < len(members):
            warnings.append(f"{name} total is over {len(present)} of its {len(members)} subtasks")
    others = sorted(set(subtasks) - set(PERCEPTION) - set(COGNITION))
    if others:
        warnings.append(f"subtasks outside MME's two groups, in no total: {others}")
    metrics = {"perception": totals["perception"], "cognition": totals["cognition"], "subtasks": subtasks}
    return Result("mme", totals["perception"], metrics, counts, "MME calculation.py; score = perception total",
                  warnings + coverage_warnings(counts))
