"""Official VQA-style data set files to LLaVA conversations, with LLaVA-1.5's response-format prompts.

    python data_prep/vqa_to_conversations.py --format vqav2 --questions v2_OpenEnded_mscoco_train2014_questions.json
        --annotations v2_mscoco_train2014_annotations.json --image-folder coco/train2014 --output vqav2.jsonl
    python data_prep/vqa_to_conversations.py --format gqa --questions train_balanced_questions.json
        --image-folder gqa/images --output gqa.jsonl [--group-by-image]
    python data_prep/vqa_to_conversations.py --format textvqa --questions TextVQA_0.5.1_train.json ...
    python data_prep/vqa_to_conversations.py --format vizwiz --questions train.json ...
    python data_prep/vqa_to_conversations.py --format scienceqa --questions problems.json --split train
        [--images-only] ...

Input files, as their data sets publish them:
  vqav2      questions: {"data_subtype": "train2014", "questions": [{"question_id", "image_id", "question"}]};
             annotations (--annotations): {"annotations": [{"question_id", "answers": [{"answer"}, ...x10]}]}
  gqa        {"<question id>": {"imageId", "question", "answer", ...}}
  textvqa    {"data": [{"question_id", "image_id", "question", "answers": [str x10], "set_name"}]}
  vizwiz     [{"image", "question", "answers": [{"answer", "answer_confidence"}, ...x10]}]
  scienceqa  problems.json: {"<pid>": {"question", "choices", "answer" (index), "hint", "image" (or null), "split"}}
Targets: VQAv2, TextVQA, VizWiz: the answer given by most annotators, ties going to the one an annotator gave
first (stable, so reruns agree); GQA: its `answer`; ScienceQA: the option letter.
Prompts (LLaVA-1.5): "<question>\\nAnswer the question using a single word or phrase."; VizWiz puts "When the
provided information is insufficient, respond with 'Unanswerable'." before that line; ScienceQA:
"Context: <hint>\\n" (when there is a hint) "<question>\\nA. <choice>\\nB. <choice>...\\nAnswer with the option's
letter from the given choices directly." --suffix replaces the last line(s).
Image paths: --image-template, a Python format string over the fields listed per format in --help (defaults:
vqav2 "COCO_{data_subtype}_{image_id:012d}.jpg", gqa/textvqa "{image_id}.jpg", vizwiz "{image}",
scienceqa "{split}/{pid}/{image}"); LLaVA-665K's layout is e.g. --image-template "coco/train2017/{image_id:012d}.jpg".
With --image-folder, a question whose image file is missing is dropped (run llava_instruct.py on the output
to decode every image). Everything dropped is listed in OUT.report.json with its question id and position.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

from tqdm import tqdm

from milora_vlm import jsontext
from milora_vlm.data.records import RecordFileError, RecordWriter, output_path
from milora_vlm.data.skips import SkipSample
from milora_vlm.data.templates import IMAGE_PLACEHOLDER
from milora_vlm.data.validation import Report, finish, report_path_for, text_field

SHORT_ANSWER = "Answer the question using a single word or phrase."
VIZWIZ_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


class UsageError(ValueError):
    """A bad argument found while converting (e.g. an --image-template field the format lacks)."""


@dataclass
class Question:
    """One question in a format-independent shape."""

    id: str
    text: str  # what the human asks, without <image> and without the suffix
    answer: str
    image_fields: dict | None  # substituted into --image-template; None: no image (ScienceQA text-only)


def most_common_answer(answers: list) -> str | None:
    """The answer most annotators gave; ties go to the one given first (Counter keeps first-seen order)."""
    counts = Counter(a.strip() for a in answers if isinstance(a, str) and a.strip())
    return counts.most_common(1)[0][0] if counts else None


def _int_field(item: dict, name: str) -> int:
    value = item.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        what = "missing" if value is None else f"{value!r}, not an integer"
        raise SkipSample(f"bad_{name}", f"field {name!r} is {what}")
    return value


def _annotator_answers(answers) -> list:
    """The `answer` strings of VQAv2 / VizWiz annotations ([{"answer": ..., ...}, ...])."""
    return [a.get("answer") for a in answers if isinstance(a, dict)] if isinstance(answers, list) else []


def _object(item) -> dict:
    if not isinstance(item, dict):
        raise SkipSample("not_an_object", f"entry is a {type(item).__name__}, not an object")
    return item


def _load(path: str, what: str):
    try:
        return jsontext.read_file(path, f"{what} file")
    except jsontext.InputFileError as e:  # one document: a bad byte or a bad record cannot be skipped as one record
        raise RecordFileError(str(e)) from None


def _key(entry) -> int | str | None:
    """An entry's question_id when it can be a dict key (the converter judges its type and counts a bad one)."""
    qid = entry.get("question_id") if isinstance(entry, dict) else None
    return qid if isinstance(qid, (int, str)) else None


def _require(doc, key: str | None, kind: type, path: str):
    value = doc if key is None else doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, kind):
        where = "the file" if key is None else f"field {key!r}"
        raise RecordFileError(f"{path}: expected {where} to be a JSON {kind.__name__}, as the official files have")
    return value


# -- one reader per format: yields (position, raw item); one converter per format: raw item -> Question ----------

def read_vqav2(args) -> Iterator[tuple[int, object]]:
    doc = _load(args.questions, "questions")
    questions = _require(doc, "questions", list, args.questions)
    anns = _require(_load(args.annotations, "annotations"), "annotations", list, args.annotations)
    by_qid = {_key(a): a for a in anns if _key(a) is not None}
    for i, q in enumerate(questions, start=1):
        yield i, (q, by_qid.get(_key(q)), doc.get("data_subtype"))


def convert_vqav2(item) -> Question:
    q, ann, subtype = item
    q = _object(q)
    qid, image_id, text = _int_field(q, "question_id"), _int_field(q, "image_id"), text_field(q, "question")
    if ann is None:
        raise SkipSample("no_annotation", f"question {qid} has no entry in the annotations file")
    answer = most_common_answer(_annotator_answers(ann.get("answers")))
    if answer is None:
        raise SkipSample("no_answer", f"question {qid}: no non-empty answer among its annotations")
    return Question(str(qid), text, answer, {"image_id": image_id, "data_subtype": subtype})


def read_gqa(args):
    doc = _require(_load(args.questions, "questions"), None, dict, args.questions)
    for i, (qid, q) in enumerate(doc.items(), start=1):
        yield i, (qid, q)


def convert_gqa(item) -> Question:
    qid, q = item
    q = _object(q)
    text, answer, image_id = text_field(q, "question"), text_field(q, "answer").strip(), text_field(q, "imageId")
    return Question(qid, text, answer, {"image_id": image_id})


def read_textvqa(args):
    data = _require(_load(args.questions, "questions"), "data", list, args.questions)
    yield from enumerate(data, start=1)


def convert_textvqa(q) -> Question:
    q = _object(q)
    qid, image_id, text = _int_field(q, "question_id"), text_field(q, "image_id"), text_field(q, "question")
    answers = q.get("answers")
    answer = most_common_answer(answers if isinstance(answers, list) else [])
    if answer is None:
        raise SkipSample("no_answer", f"question {qid}: no non-empty answer")
    return Question(str(qid), text, answer, {"image_id": image_id, "set_name": q.get("set_name")})


def read_vizwiz(args):
    data = _require(_load(args.questions, "questions"), None, list, args.questions)
    yield from enumerate(data, start=1)


def convert_vizwiz(q) -> Question:
    q = _object(q)
    image, text = text_field(q, "image"), text_field(q, "question")
    answer = most_common_answer(_annotator_answers(q.get("answers")))
    if answer is None:
        raise SkipSample("no_answer", f"{image}: no non-empty answer")
    return Question(os.path.splitext(image)[0], text, answer, {"image": image})


def read_scienceqa(args):
    doc = _require(_load(args.questions, "problems"), None, dict, args.questions)
    splits = Counter(str(p.get("split")) for p in doc.values() if isinstance(p, dict))
    if args.split != "all" and args.split not in splits:  # a misspelt split would convert nothing, quietly
        present = ", ".join(f"{k} ({n})" for k, n in sorted(splits.items())) or "none"
        raise RecordFileError(f"{args.questions}: no problem has split {args.split!r}; its splits: {present}")
    for i, (pid, p) in enumerate(doc.items(), start=1):
        if isinstance(p, dict) and args.split != "all" and p.get("split") != args.split:
            args.not_selected["other_split"] += 1
        elif isinstance(p, dict) and args.images_only and not p.get("image"):
            args.not_selected["no_image"] += 1
        else:
            yield i, (pid, p)


def convert_scienceqa(item) -> Question:
    pid, p = item
    p = _object(p)
    question, hint = text_field(p, "question"), text_field(p, "hint", optional=True)
    choices, answer = p.get("choices"), p.get("answer")
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
        raise SkipSample("bad_choices", f"problem {pid}: 'choices' is {choices!r}, not a list of 2 to 26 strings")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise SkipSample("bad_answer", f"problem {pid}: 'answer' {answer!r} is not one of its {len(choices)} indices")
    image = p.get("image")
    if image is not None and not (isinstance(image, str) and image.strip()):
        raise SkipSample("bad_image", f"problem {pid}: 'image' is {image!r}")
    options = "\n".join(f"{chr(ord('A') + k)}. {c}" for k, c in enumerate(choices))
    text = (f"Context: {hint}\n" if hint.strip() else "") + f"{question}\n{options}"
    fields = {"pid": pid, "split": p.get("split"), "image": image} if image else None
    return Question(pid, text, chr(ord("A") + answer), fields)


@dataclass(frozen=True)
class Format:
    read: Callable
    convert: Callable[[object], Question]
    image_template: str
    template_fields: str
    suffix: str
    annotations: bool = False  # answers in a separate --annotations file


FORMATS = {
    "vqav2": Format(read_vqav2, convert_vqav2, "COCO_{data_subtype}_{image_id:012d}.jpg",
                    "image_id (int), data_subtype", SHORT_ANSWER, annotations=True),
    "gqa": Format(read_gqa, convert_gqa, "{image_id}.jpg", "image_id (= imageId)", SHORT_ANSWER),
    "textvqa": Format(read_textvqa, convert_textvqa, "{image_id}.jpg", "image_id, set_name", SHORT_ANSWER),
    "vizwiz": Format(read_vizwiz, convert_vizwiz, "{image}", "image", VIZWIZ_SUFFIX),
    "scienceqa": Format(read_scienceqa, convert_scienceqa, "{split}/{pid}/{image}", "pid, split, image", OPTION_LETTER),
}


class Converter:
    """Question -> conversation record: image path from the template, prompt suffix, optional existence check."""

    def __init__(self, fmt: Format, args):
        self.fmt, self.image_template = fmt, args.image_template or fmt.image_template
        self.suffix = fmt.suffix if args.suffix is None else args.suffix
        self.image_folder = args.image_folder
        self._exists: dict[str, bool] = {}

    def image_path(self, fields: dict) -> str:
        try:
            return self.image_template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(f"--image-template {self.image_template!r} does not fit this format's fields "
                             f"({self.fmt.template_fields}) with values {fields}: {type(e).__name__}: {e}") from None

    def __call__(self, raw) -> tuple[Question, str | None, str]:
        """(question, image path or None, human turn text)."""
        q = self.fmt.convert(raw)
        image = None if q.image_fields is None else self.image_path(q.image_fields)
        if image is not None and self.image_folder is not None:
            path = os.path.join(self.image_folder, image)
            if path not in self._exists:
                self._exists[path] = os.path.isfile(path)
            if not self._exists[path]:
                raise SkipSample("missing_image", f"question {q.id}: image file not found: {path}")
        human = f"{q.text}\n{self.suffix}" if self.suffix else q.text
        return q, image, human


def _record(record_id: str, image: str | None, pairs: list[tuple[str, str]]) -> dict:
    rec: dict = {"id": record_id}
    turns = []
    for k, (human, answer) in enumerate(pairs):
        lead = f"{IMAGE_PLACEHOLDER}\n" if k == 0 and image is not None else ""
        turns += [{"from": "human", "value": lead + human}, {"from": "gpt", "value": answer}]
    if image is not None:
        rec["image"] = image
    rec["conversations"] = turns
    return rec


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", required=True, choices=sorted(FORMATS))
    ap.add_argument("--questions", required=True, help="the official questions file (problems.json for scienceqa)")
    ap.add_argument("--annotations", default=None, help="the official annotations file (vqav2 only)")
    ap.add_argument("--image-folder", default=None,
                    help="folder the image paths are relative to; given, each image file must exist")
    ap.add_argument("--image-template", default=None,
                    help="image path format string; fields per format: " +
                         "; ".join(f"{n}: {f.template_fields}" for n, f in sorted(FORMATS.items())))
    ap.add_argument("--suffix", default=None,
                    help="replace the format's LLaVA-1.5 response-format prompt ('' for none)")
    ap.add_argument("--split", default=None, help="scienceqa: the `split` to convert (train, val, test) or all")
    ap.add_argument("--images-only", action="store_true", help="scienceqa: only problems with an image (SQA-IMG)")
    ap.add_argument("--group-by-image", action="store_true",
                    help="one multi-turn conversation per image (questions in input order), as LLaVA-1.5's mix does")
    ap.add_argument("--output", required=True, type=output_path, help="conversations: .jsonl, or .json for an array")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any question was dropped")
    args = ap.parse_args(argv)
    fmt = FORMATS[args.format]
    if fmt.annotations != (args.annotations is not None):
        ap.error(f"--annotations is {'required' if fmt.annotations else 'not used'} for --format {args.format}")
    if (args.format == "scienceqa") != (args.split is not None):
        ap.error("--split is required for scienceqa (train, val, test or all) and only used there")
    if args.images_only and args.format != "scienceqa":
        ap.error("--images-only is for scienceqa")
    if args.group_by_image and args.format == "scienceqa":
        ap.error("--group-by-image does not apply to scienceqa (one problem per image)")
    args.not_selected = Counter()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fmt = FORMATS[args.format]
    convert = Converter(fmt, args)
    report = Report(f"data_prep/vqa_to_conversations.py --format {args.format}", "index",
                    questions=os.path.abspath(args.questions),
                    annotations=args.annotations and os.path.abspath(args.annotations),
                    output=os.path.abspath(args.output), image_template=convert.image_template,
                    image_folder=args.image_folder and os.path.abspath(args.image_folder),
                    images_checked="exist" if args.image_folder else "no (no --image-folder)",
                    suffix=convert.suffix, group_by_image=args.group_by_image)
    groups: dict[str, tuple[str, list]] = {}  # image -> (record id, [(human, answer)]), in first-seen order
    try:
        with RecordWriter(args.output) as writer:
            for position, raw in tqdm(fmt.read(args), desc=f"converting {args.format}", unit="q", mininterval=1.0):
                try:
                    q, image, human = convert(raw)
                except SkipSample as e:
                    report.drop(e.reason, e.detail, _raw_id(raw), position)
                    continue
                report.keep(q.id, position)
                if args.group_by_image:  # (every question of these formats has an image)
                    record_id = os.path.splitext(os.path.basename(image))[0]
                    groups.setdefault(image, (record_id, []))[1].append((human, q.answer))
                else:
                    writer.write(_record(q.id, image, [(human, q.answer)]))
            for image, (record_id, pairs) in groups.items():
                writer.write(_record(record_id, image, pairs))
            report.written = writer.count
    except (RecordFileError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.not_selected:
        report.extra["not_selected"] = dict(args.not_selected)
    return finish(report, report_path_for(args.output), args.strict)


def _raw_id(raw) -> str | None:
    """The question id of an item that could not be converted, for the report (best effort)."""
    if isinstance(raw, tuple) and isinstance(raw[0], str):  # gqa, scienceqa: (key, item)
        return raw[0]
    q = raw[0] if isinstance(raw, tuple) else raw  # vqav2: (question, annotation, subtype)
    if isinstance(q, dict):
        for key in ("question_id", "image"):
            if q.get(key) is not None:
                return str(q[key])
    return None


if __name__ == "__main__":
    sys.exit(main())
