"""Generating answers to a question file, resumably, with the prompt code training uses.

Questions: LLaVA's eval JSONL (`question_id`, `image`, `text`), LLaVA's conversation-style question files
(ScienceQA's llava_test_CQM-A.json: `id`, `image`, `conversations`, whose first turn is the question with
`<image>` removed, as LLaVA's model_vqa_science reads it), or a text-task file (`question_id`, `text`; the
LLM-Adapters / MetaMath test files' `instruction` / `query` / `question` / `problem` also work, and records
without `question_id` are numbered from 0, as the scorers number them). A question text takes at most one
`<image>`, and only with an image: anything else is an error naming file and line before the model loads.
An image that cannot be decoded, or declares more pixels than PIL's decompression-bomb limit, is skipped,
counted and named in the report. Answers: JSONL records
{question_id, prompt, text, model_id} in LLaVA's answer format (`prompt` is the question text as given).

Resuming: answers already in the output file are skipped, each batch is appended and flushed, and a last line
cut off by a kill is detected and dropped, so a killed run loses at most one batch and never duplicates. A
question is identified by (question_id, text): LLaVA's TextVQA file reuses one id for several questions.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from milora_vlm import jsontext
from milora_vlm.data.images import image_token_count, load_image, process_images, resolve_image_path
from milora_vlm.data.records import RecordWriter, write_records
from milora_vlm.data.skips import SkipSample
from milora_vlm.data.templates import IMAGE_PLACEHOLDER, Template, encode_conversation

from .inputs import EvalInputError, decode_utf8, first_key, load_numbered_records

TEXT_KEYS = ("text", "instruction", "query", "question", "problem")


@dataclass(frozen=True)
class Question:
    qid: Any  # as in the file (int or str); written back unchanged
    text: str
    image: str | None
    line_no: int

    @property
    def key(self) -> str:
        return answer_key(self.qid, self.text)


def answer_key(qid: Any, prompt: str) -> str:
    return f"{qid}\x1f{prompt}"


# LLaVA's model_vqa_science --single-pred-prompt (its ScienceQA evaluation) appends this line to each question.
SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def _question_text(rec: dict, path: str, line_no: int) -> str:
    key = first_key(rec, TEXT_KEYS)
    if key is None and "conversations" in rec:  # LLaVA's conversation-style file: the first turn, <image> removed
        turns = rec["conversations"]
        if not (isinstance(turns, list) and turns and isinstance(turns[0], dict) and isinstance(turns[0].get("value"), str)):
            raise EvalInputError(f"{path}:{line_no}: field 'conversations' must start with a turn that has a string 'value'")
        return turns[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
    if key is None or not isinstance(rec[key], str):
        raise EvalInputError(f"{path}:{line_no}: missing question text (a string field, one of {list(TEXT_KEYS)}, "
                             "or LLaVA's 'conversations')")
    return rec[key]


class QuestionList(list):
    """Questions in file order; `repeated` names the lines dropped as repeats of an earlier one."""

    def __init__(self):
        super().__init__()
        self.repeated: list[str] = []


def read_questions(path: str, suffix: str = "") -> QuestionList:
    """The questions of `path`; `suffix` (e.g. "\\n" + SINGLE_PRED_PROMPT) is appended to every text.

    A line with the same question_id, text and image as an earlier one (LLaVA's TextVQA file has images that
    ask the same question twice) is answered once: it is dropped and listed in `.repeated`."""
    questions = QuestionList()
    seen: dict[str, Question] = {}
    for index, (line_no, rec) in enumerate(load_numbered_records(path)):
        # LLaVA's conversation-style files name the question "id" (ScienceQA's problem id, which its scorer uses)
        qid = rec.get("question_id", rec.get("id", index) if "conversations" in rec else index)
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise EvalInputError(f"{path}:{line_no}: field 'question_id' must be a string or an integer")
        text = _question_text(rec, path, line_no) + suffix
        if rec.get("input"):
            raise EvalInputError(f"{path}:{line_no}: a non-empty 'input' field is not supported; fold it into the text")
        image = rec.get("image")
        if image is not None and not isinstance(image, str):
            raise EvalInputError(f"{path}:{line_no}: field 'image' must be a file name")
        placeholders = text.count(IMAGE_PLACEHOLDER)
        if placeholders > 1:
            raise EvalInputError(f"{path}:{line_no}: the question has {placeholders} {IMAGE_PLACEHOLDER} placeholders; "
                                 "a question takes one image")
        if placeholders and not image:
            raise EvalInputError(f"{path}:{line_no}: the question has {IMAGE_PLACEHOLDER} but no 'image' field")
        q = Question(qid, text, image or None, line_no)
        first = seen.get(q.key)
        if first is not None and first.image != q.image:
            raise EvalInputError(f"{path}:{line_no}: the same question_id and text as line {first.line_no}, "
                                 "with another image")
        if first is not None:
            questions.repeated.append(f"{path}:{line_no} (as line {first.line_no})")
            continue
        seen[q.key] = q
        questions.append(q)
    return questions


def select_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """Contiguous chunk `chunk_idx` of `num_chunks` (LLaVA's split: ceil(n / num_chunks) items each)."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk index {chunk_idx} is not in [0, {num_chunks})")
    size = math.ceil(len(items) / num_chunks)
    return list(items[chunk_idx * size : (chunk_idx + 1) * size])


def read_answers(path: str, model_id: str | None = None, repair: bool = True) -> dict[str, dict]:
    """{key: record} of an answers file. A last line without its newline is a write cut off by a kill: it is
    cut from the file (repair=True) and its question generated again. A bad line elsewhere is an error, and so
    is an answer by another model (unless model_id is None)."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    done: dict[str, dict] = {}
    complete_end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    decode_utf8(data[:complete_end], path)  # non-UTF-8 bytes: an error naming the line
    for line_no, raw in enumerate(data[:complete_end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            rec = jsontext.parse(raw.decode("utf-8-sig"))
            key = answer_key(rec["question_id"], rec["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvalInputError(f"{path}:{line_no}: not an answer record (question_id, prompt, text); "
                                 "the file is damaged or not an answers file") from None
        if model_id is not None and rec.get("model_id") != model_id:
            raise EvalInputError(f"{path}:{line_no}: answer by model {rec.get('model_id')!r}, not {model_id!r}: "
                                 "write to another --answers-file")
        done[key] = rec
    if complete_end < len(data) and repair:
        print(f"{path}: dropping a cut-off last line ({len(data) - complete_end} bytes) left by a killed run",
              file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(complete_end)
    return done


@dataclass
class GenerationSettings:
    template: Template
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    batch_size: int = 8
    image_folder: str | None = None
    allow_images_outside_folder: bool = False  # as training's data.allow_images_outside_folder
    image_aspect_ratio: str = "pad"
    answer_prefix: str = ""  # appended to the prompt, e.g. MetaMath's " Let's think step by step."
    extra_stop_strings: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class GenerationReport:
    written: int = 0
    already_done: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"


def stop_strings(template: Template, eos_token: str, extra: Sequence[str] = ()) -> list[str]:
    """What ends an answer: the text the template puts after an assistant turn (eos, "<|im_end|>", "\\n"),
    the template's declared stop strings, and the caller's."""
    after = template.assistant.split("{content}", 1)[1].format(eos=eos_token)
    out = [s for s in (after.strip(" ") or after, *template.stop_strings, *extra) if s]
    return list(dict.fromkeys(out))


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut].strip()


class AnswerGenerator:
    """Builds prompts exactly as training does (encode_conversation) and decodes batches with left padding."""

    def __init__(self, loaded, settings: GenerationSettings):
        from transformers import GenerationConfig

        self.loaded, self.settings = loaded, settings
        tok = loaded.tokenizer
        self.tokenizer = tok
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.stops = stop_strings(settings.template, tok.eos_token or "", settings.extra_stop_strings)
        single = [tok.convert_tokens_to_ids(s) for s in self.stops if s in tok.get_vocab()]
        eos_ids = list(dict.fromkeys([i for i in [tok.eos_token_id, *single] if i is not None]))
        multi = [s for s in self.stops if s not in tok.get_vocab()]
        sampling = settings.temperature > 0
        self.generation_config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None,
            eos_token_id=eos_ids,
            pad_token_id=self.pad_id,
            stop_strings=multi or None,
        )
        config = loaded.model.config  # image_token_index is the older transformers name of image_token_id
        token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
        self.image_token_id = token_id if loaded.is_llava else None

    def prompt_ids(self, q: Question, num_image_tokens: int) -> list[int]:
        text = q.text
        if q.image is not None and IMAGE_PLACEHOLDER not in text:
            text = IMAGE_PLACEHOLDER + "\n" + text  # LLaVA's model_vqa: the image goes first
        enc = encode_conversation(
            self.tokenizer,
            self.settings.template,
            [{"from": "human", "value": text}],
            image_token_id=self.image_token_id if q.image is not None else None,
            num_image_tokens=num_image_tokens if q.image is not None else 0,
            add_generation_prompt=True,
            answer_prefix=self.settings.answer_prefix,  # one tokenizer call with the prompt: no stray "▁"
        )
        return enc.input_ids

    @torch.no_grad()
    def generate(self, batch: list[Question], images: dict[str, Any]) -> list[str]:
        """Answers for `batch`; `images` maps a question key to its PIL image (questions with an image only)."""
        with_image = [q for q in batch if q.image is not None]
        pixel_values, n_img = None, 0
        if with_image:
            pixel_values = process_images([images[q.key] for q in with_image], self.loaded.processor.image_processor,
                                          self.settings.image_aspect_ratio)
            n_img = image_token_count(self.loaded.processor, pixel_values)
        prompts = [self.prompt_ids(q, n_img) for q in batch]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        model = self.loaded.model
        kwargs = {}
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values.to(self.loaded.device, dtype=model.dtype)
        if self.generation_config.stop_strings:
            kwargs["tokenizer"] = self.tokenizer
        out = model.generate(
            input_ids=input_ids.to(self.loaded.device),
            attention_mask=attention_mask.to(self.loaded.device),
            generation_config=self.generation_config,
            **kwargs,
        )
        eos_ids = set(self.generation_config.eos_token_id)
        answers = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
            answers.append(cut_at_stops(self.tokenizer.decode(row[:end], skip_special_tokens=True), self.stops))
        return answers


def _load_question_image(path: str) -> Image.Image:
    """load_image, with PIL's decompression-bomb checks as a SkipSample too: an image over twice
    Image.MAX_IMAGE_PIXELS raises DecompressionBombError, one over the limit only warns, and both are taken
    as 'too large' here (the question is skipped), never as a crash or a huge allocation."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return load_image(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("image_too_large", f"{path}: {e}") from None


def _image_path(q: Question, settings: GenerationSettings) -> str:
    """The file question q's image names; one that resolves outside --image-folder is a SkipSample."""
    return resolve_image_path(q.image, settings.image_folder, confine=not settings.allow_images_outside_folder)


def _load_batch_images(batch: list[Question], settings: GenerationSettings, source: str, report: GenerationReport):
    """PIL images of the batch's questions; questions whose image cannot be decoded are dropped and reported."""
    images, kept = {}, []
    for q in batch:
        if q.image is not None:
            try:
                images[q.key] = _load_question_image(_image_path(q, settings))
            except SkipSample as e:
                report.skipped.append(f"{source}:{q.line_no}: {e.reason}: {e.detail}")
                continue
        kept.append(q)
    return kept, images


def check_images_exist(questions: Sequence[Question], settings: GenerationSettings, source: str) -> None:
    """Stop before loading the model when image files are missing (a wrong --image-folder, most likely); paths
    outside the folder are left to _load_batch_images, which skips and reports each."""
    missing = []
    for q in questions:
        if q.image is not None:
            try:
                path = _image_path(q, settings)
            except SkipSample:
                continue
            if not os.path.isfile(path):
                missing.append((q, path))
    if missing:
        examples = "; ".join(f"line {q.line_no}: {path}" for q, path in missing[:3])
        raise EvalInputError(f"{source}: {len(missing)} image files not found ({examples}); check --image-folder")


def generate_answers(
    loaded,
    questions: Sequence[Question],
    output: str,
    settings: GenerationSettings,
    source: str = "questions",
    show_progress: bool = True,
) -> GenerationReport:
    """Answer every question of `questions` not yet in `output`, appending batch by batch."""
    report = GenerationReport()
    if any(q.image is not None for q in questions) and not loaded.is_llava:
        first = next(q for q in questions if q.image is not None)
        raise EvalInputError(f"{source}:{first.line_no}: question has an image but the model is a text-only causal LM")
    done = read_answers(output, loaded.model_id)
    todo = [q for q in questions if q.key not in done]
    report.already_done = len(questions) - len(todo)
    check_images_exist(todo, settings, source)
    if settings.temperature > 0:
        torch.manual_seed(settings.seed)
    generator = AnswerGenerator(loaded, settings)
    with RecordWriter(output, append=True) as writer, tqdm(total=len(todo), desc="generate", unit="q",
                                                           disable=not show_progress) as bar:
        for start in range(0, len(todo), settings.batch_size):
            batch, images = _load_batch_images(todo[start : start + settings.batch_size], settings, source, report)
            if batch:
                answers = generator.generate(batch, images)
                for q, a in zip(batch, answers):
                    writer.write({"question_id": q.qid, "prompt": q.text, "text": a, "model_id": loaded.model_id})
                writer.sync()
                report.written += len(batch)
            bar.update(min(settings.batch_size, len(todo) - start))
    return report


def merge_answer_files(parts: Sequence[str], output: str) -> int:
    """Append the answers of `parts` that `output` lacks (by question key), then delete the parts.
    Writes to a temporary file and renames it, so a kill leaves either the old or the new output."""
    merged = read_answers(output)
    added = 0
    for part in parts:
        for key, rec in read_answers(part).items():
            if key not in merged:
                merged[key] = rec
                added += 1
    write_records(output, merged.values(), lines=True)
    for part in parts:
        if os.path.exists(part):
            os.remove(part)
    return added
