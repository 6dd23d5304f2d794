"""VQAv2, VizWiz and TextVQA: accuracy against ten human answers, as each benchmark's own evaluator computes it.

All three average, over the ten leave-one-annotator-out subsets of nine answers, min(1, matches / 3): a
prediction given by 0, 1, 2, 3, >=4 humans scores 0, 0.3, 0.6, 0.9, 1.0. They differ in what is normalised:
- VQAv2 (official evaluator, GT-Vision-Lab/VQA master): human answers and prediction are whitespace-cleaned; the
  punctuation / number / article / contraction rules are applied to *both* only when the human answers
  disagree. When all ten agree the prediction must equal their text exactly ("Yes" scores 0 against "yes").
- VizWiz (its official evaluator): the prediction is always normalised, the human answers never, and its
  contraction table differs from VQA's (typographic apostrophes: "isnt" -> "isn’t" matches no human "isn't").
- TextVQA (LLaVA's m4c_evaluator, from MMF): EvalAI's processor on the prediction and on every human answer.

Raw generations (this project's / LLaVA's answers JSONL) first go through the conversion step LLaVA runs before
submitting VQAv2 and VizWiz answers, EvalAI's answer processor (`--answer-processing auto`); official result
files are scored as they are.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from .answer_processing import clean_whitespace, evalai_normalize, vizwiz_normalize, vqa_normalize
from .inputs import (
    EvalInputError,
    Predictions,
    Result,
    align,
    coverage_warnings,
    iter_numbered,
    load_json_any,
    load_numbered_records,
    load_predictions,
    pct,
    record_id,
    require,
)

ANSWER_PROCESSING = ("auto", "evalai", "none")


def _leave_one_out(prediction: str, answers: list[str]) -> float:
    accs = []
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == prediction)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The official VQAv2 evaluator's per-question accuracy in [0, 1]."""
    answers = [clean_whitespace(a) for a in human_answers]
    pred = clean_whitespace(prediction)
    if len(set(answers)) > 1:
        answers = [vqa_normalize(a) for a in answers]
        pred = vqa_normalize(pred)
    return _leave_one_out(pred, answers)


def vizwiz_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The official VizWiz evaluator's per-question accuracy in [0, 1]."""
    return _leave_one_out(vizwiz_normalize(prediction), list(human_answers))


def textvqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """LLaVA's TextVQA accuracy (m4c_evaluator) in [0, 1]."""
    return _leave_one_out(evalai_normalize(prediction), [evalai_normalize(a) for a in human_answers])


def _processor(mode: str, preds: Predictions) -> tuple[Callable[[str], str], str]:
    if mode not in ANSWER_PROCESSING:
        raise EvalInputError(f"--answer-processing must be one of {ANSWER_PROCESSING}, got {mode!r}")
    if mode == "auto":
        mode = "evalai" if preds.raw_generations else "none"
    return (evalai_normalize if mode == "evalai" else (lambda s: s)), mode


@dataclass
class HumanAnswers:
    answers: list[str]
    answer_type: str
    question_type: str | None = None


def _human_answers(rec: dict, path: str, line_no: int) -> list[str]:
    answers = require(rec, "answers", path, line_no, list)
    if not answers:
        raise EvalInputError(f"{path}:{line_no}: field 'answers' is empty")
    out = []
    for k, a in enumerate(answers):
        text = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(text, str):
            raise EvalInputError(f"{path}:{line_no}: answers[{k}] has no string 'answer'")
        out.append(text)
    return out


def _records_under(path: str, key: str) -> list[tuple[int, dict]]:
    """Records of an official file that is either {key: [...]} or a bare list/JSONL."""
    data = load_json_any(path)
    if isinstance(data, dict):
        if key not in data:
            raise EvalInputError(f"{path}: expected a top-level {key!r} list")
        data = data[key]
    return list(iter_numbered(data, path))


def _per_type(scores: dict[str, float], types: dict[str, str | None]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for qid, s in scores.items():
        if types[qid] is not None:
            groups[types[qid]].append(s)
    return {t: pct(sum(v), len(v)) for t, v in sorted(groups.items())}


def _result(task, scores, gold, counts, protocol, warnings, mode, with_question_types=True) -> Result:
    metrics = {
        "accuracy": pct(sum(scores.values()), len(scores)),
        "per_answer_type": _per_type(scores, {q: g.answer_type for q, g in gold.items()}),
        "answer_processing": mode,
    }
    if with_question_types:
        metrics["per_question_type"] = _per_type(scores, {q: g.question_type for q, g in gold.items()})
    return Result(task, metrics["accuracy"], metrics, counts, protocol, warnings + coverage_warnings(counts))


def score_vqav2(
    predictions: str,
    annotations: str,
    questions: str | None = None,
    allow_unknown: bool = False,
    answer_processing: str = "auto",
) -> Result:
    """VQAv2 accuracy from the official annotation file (and, to check they belong together, its question file)."""
    gold: dict[str, HumanAnswers] = {}
    for index, (line_no, rec) in enumerate(_records_under(annotations, "annotations")):
        qid = record_id(rec, line_no, index, annotations)
        if qid in gold:
            raise EvalInputError(f"{annotations}:{line_no}: duplicate question_id {qid!r}")
        gold[qid] = HumanAnswers(
            _human_answers(rec, annotations, line_no),
            require(rec, "answer_type", annotations, line_no),
            rec.get("question_type"),
        )
    if questions is not None:
        qids = {record_id(r, n, i, questions) for i, (n, r) in enumerate(_records_under(questions, "questions"))}
        if qids != set(gold):
            raise EvalInputError(
                f"{questions} and {annotations} do not describe the same questions "
                f"({len(qids - set(gold))} only in the questions, {len(set(gold) - qids)} only in the annotations)"
            )
    preds = load_predictions(predictions)
    process, mode = _processor(answer_processing, preds)
    aligned, counts = align(list(gold), preds, allow_unknown)
    scores = {q: (vqa_accuracy(process(t), gold[q].answers) if t is not None else 0.0) for q, t in aligned.items()}
    return _result("vqav2", scores, gold, counts, "official VQA evaluator (conditional normalisation)", [], mode)


def score_vizwiz(
    predictions: str,
    annotations: str,
    questions: str | None = None,
    allow_unknown: bool = False,
    answer_processing: str = "auto",
) -> Result:
    """VizWiz accuracy from the official annotation file (a list of {image, question, answers, answer_type}).

    VizWiz questions are identified by image file name. Predictions either carry `image` (the official
    submission format) or a `question_id` that `questions` (a LLaVA question JSONL with `image`) maps to an
    image; without `questions`, question_id must be the image name itself.
    """
    gold: dict[str, HumanAnswers] = {}
    for line_no, rec in _records_under(annotations, "annotations"):
        image = require(rec, "image", annotations, line_no)
        if image in gold:
            raise EvalInputError(f"{annotations}:{line_no}: duplicate image {image!r}")
        gold[image] = HumanAnswers(_human_answers(rec, annotations, line_no), require(rec, "answer_type", annotations, line_no))
    qid_to_image: dict[str, str] = {}
    if questions is not None:
        for index, (line_no, rec) in enumerate(load_numbered_records(questions)):
            qid_to_image[record_id(rec, line_no, index, questions)] = require(rec, "image", questions, line_no)

    def key(rec: dict, qid: str) -> str:
        if "image" in rec or not qid_to_image:
            return qid
        if qid not in qid_to_image:
            raise ValueError(f"question_id {qid!r} is not in {questions}")
        return qid_to_image[qid]

    preds = load_predictions(predictions, id_keys=("image", "question_id"), key_fn=key)
    process, mode = _processor(answer_processing, preds)
    aligned, counts = align(list(gold), preds, allow_unknown, what="image")
    scores = {q: (vizwiz_accuracy(process(t), gold[q].answers) if t is not None else 0.0) for q, t in aligned.items()}
    return _result("vizwiz", scores, gold, counts, "official VizWiz evaluator", [], mode, with_question_types=False)


def llava_textvqa_question(prompt: str) -> str:
    """The question inside a LLaVA TextVQA prompt, lower-cased (LLaVA's eval_textvqa.prompt_processor)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise ValueError("an 'OCR tokens:' prompt without 'Question: ... Short answer:'")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"a prompt of {len(lines)} lines that is none of LLaVA's TextVQA prompt forms")
    return question.lower()


def score_textvqa(
    predictions: str,
    annotations: str,
    questions: str | None = None,
    allow_unknown: bool = False,
    answer_processing: str = "auto",
) -> Result:
    """TextVQA accuracy from the official annotation file ({"data": [{question_id, image_id, question, answers}]}).

    Predictions keyed by TextVQA question ids are matched directly. LLaVA's TextVQA question file uses the
    image id as question_id, so, as LLaVA's eval_textvqa does, such answers are matched on (image id, question
    read from the answer's `prompt`), or from the `text` of the same question in `questions` when given.
    `answer_processing` is unused: the TextVQA evaluator normalises everything itself.
    """
    del answer_processing
    gold: dict[str, HumanAnswers] = {}
    by_image_question: dict[str, list[str]] = defaultdict(list)  # (image, question) -> ids in file order
    asked: dict[str, str] = {}
    for index, (line_no, rec) in enumerate(_records_under(annotations, "data")):
        qid = record_id(rec, line_no, index, annotations)
        if qid in gold:
            raise EvalInputError(f"{annotations}:{line_no}: duplicate question_id {qid!r}")
        gold[qid] = HumanAnswers(_human_answers(rec, annotations, line_no), "all")
        image_id = require(rec, "image_id", annotations, line_no)
        question = require(rec, "question", annotations, line_no)
        by_image_question[f"{image_id}\x1f{question.lower()}"].append(qid)
        asked[qid] = question
    records = load_numbered_records(predictions)
    ids = [record_id(r, n, i, predictions) for i, (n, r) in enumerate(records)]
    question_texts: dict[str, list[str]] = defaultdict(list)
    if questions is not None:
        for index, (line_no, rec) in enumerate(load_numbered_records(questions)):
            question_texts[record_id(rec, line_no, index, questions)].append(require(rec, "text", questions, line_no))
    llava_keyed = bool(ids) and not all(q in gold for q in ids)
    warnings: list[str] = []
    repeated = {c: qids for c, qids in by_image_question.items() if len(qids) > 1}
    if llava_keyed and repeated:
        # LLaVA keys its annotations by (image, lower-cased question), so the last of a repeated pair wins, and
        # every answer to that question is scored against the last one's human answers.
        for qids in repeated.values():
            for qid in qids[:-1]:
                gold[qid] = gold[qids[-1]]
        warnings.append(f"{len(repeated)} images ask the same question twice (case-insensitive), e.g. question_ids "
                        f"{next(iter(repeated.values()))}: each answer to it is scored against the last one's human "
                        "answers, as LLaVA's eval_textvqa does")
    answered: dict[str, int] = defaultdict(int)

    def key(rec: dict, qid: str) -> str:
        if not llava_keyed:
            return qid
        prompt = rec.get("prompt")
        if not isinstance(prompt, str):
            candidates = set(question_texts.get(qid, []))  # one text, possibly asked twice
            if len(candidates) != 1:
                raise ValueError(
                    f"id {qid!r} is not a TextVQA question_id and the record has no 'prompt' to read the question "
                    "from (pass the LLaVA question file with --questions)"
                )
            prompt = candidates.pop()
        try:
            compound = f"{qid}\x1f{llava_textvqa_question(prompt)}"
        except ValueError as e:
            raise ValueError(f"cannot read the question from 'prompt': {e}") from None
        if compound not in by_image_question:
            if allow_unknown:
                return compound
            raise ValueError(
                f"no TextVQA annotation for image {qid!r} with that question "
                "(pass --allow-unknown to ignore such predictions)"
            )
        # the k-th answer to a repeated question takes the k-th of its ids (all scored alike, see above)
        k, answered[compound] = answered[compound], answered[compound] + 1
        if k >= len(by_image_question[compound]):
            raise ValueError(f"more answers for image {qid!r} and this question than the annotations ask "
                             f"({len(by_image_question[compound])})")
        return by_image_question[compound][k]

    preds = load_predictions(predictions, key_fn=key)
    if llava_keyed:
        # eval/generate.py answers a question asked twice in exactly the same words once (the prompts are the same);
        # LLaVA's run answers it twice, identically when greedy: that answer stands for both.
        reused = 0
        for qids in repeated.values():
            answered_ids = [q for q in qids if q in preds.texts]
            if answered_ids and len({asked[q] for q in qids}) == 1:
                for q in qids:
                    if q not in preds.texts:
                        preds.texts[q], reused = preds.texts[answered_ids[-1]], reused + 1
        if reused:
            warnings.append(f"{reused} answers to a question asked twice in the same words were used for both")
    aligned, counts = align(list(gold), preds, allow_unknown)
    scores = {q: (textvqa_accuracy(t, gold[q].answers) if t is not None else 0.0) for q, t in aligned.items()}
    result = _result("textvqa", scores, gold, counts, "LLaVA m4c TextVQA evaluator (EvalAI processing)", warnings,
                     "evalai", with_question_types=False)
    result.metrics.pop("per_answer_type")
    result.metrics["matched_by"] = "image_id+question" if llava_keyed else "question_id"
    return result
