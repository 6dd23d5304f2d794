"""easy-VQA (PyPI `easy-vqa`, MIT) as LLaVA conversations, evaluation questions and image labels.

The package ships 4,000 train / 1,000 test 64x64 PNGs (one coloured shape each) and 38,575 / 9,673
template questions with one-word answers. Every question asks about one *attribute* (the shape's colour or
its shape) in one *form* (open "what ...?" or yes/no), so each falls in one of four categories:
color_open, color_yesno, shape_open, shape_yesno.

For the learning-and-forgetting study the categories are grouped into two disjoint task families. The
default split, "open", makes the open colour questions the "pretrained knowledge" (old: "what color is the
shape?" -> "red") and the open shape questions the "new task" ("what is the blue shape?" -> "circle"): the base
model has never been asked about shapes (and never produced a shape word as an answer), both families share the
question form, and a model that forgets starts answering colour questions with shape words.
The yes/no questions are left out of the default because the demo's tiny base model does not learn them in the
time the demo has (README, "The main job": it answers the majority answer of each form). "attribute" (old = all
colour questions, new = all shape questions, training answers balanced), "question-type" (open vs yes/no) and
"none" (one family with everything) are there for larger models.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from milora_vlm.data.records import write_records as _write_jsonl
from milora_vlm.data.subset import seeded_subset as _subset

COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
CATEGORIES = ("color_open", "color_yesno", "shape_open", "shape_yesno")

# family name -> categories; the first family is the "pretrained knowledge", the second the "new task".
SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "open": {"old": ("color_open",), "new": ("shape_open",)},
    "attribute": {"old": ("color_open", "color_yesno"), "new": ("shape_open", "shape_yesno")},
    "question-type": {"old": ("color_open", "shape_open"), "new": ("color_yesno", "shape_yesno")},
    "none": {"all": CATEGORIES},
}


class QuestionError(ValueError):
    """A question whose category cannot be read off its text and answer."""


def classify_question(text: str, answer: str) -> str:
    """The category of one easy-VQA question, e.g. ("is there a red shape?", "no") -> "color_yesno".

    Open questions are classified by their answer (a colour or a shape word: "what is the blue shape?" asks
    for the shape); yes/no questions by the attribute word they name ("is there a red shape?" -> colour,
    "does the image contain a circle?" -> shape).
    """
    words = set(re.findall(r"[a-z]+", text.lower()))
    if answer in YES_NO:
        has_color, has_shape = bool(words & set(COLORS)), bool(words & set(SHAPES))
        if has_color == has_shape:
            raise QuestionError(f"yes/no question names {'both' if has_color else 'neither'} a colour and a shape: {text!r}")
        return "color_yesno" if has_color else "shape_yesno"
    if not text.lower().startswith("what"):
        raise QuestionError(f"answer {answer!r} is not yes/no but the question is not a 'what' question: {text!r}")
    if answer in COLORS:
        return "color_open"
    if answer in SHAPES:
        return "shape_open"
    raise QuestionError(f"unknown answer {answer!r} to {text!r}")


@dataclass(frozen=True)
class Question:
    split: str  # "train" | "test"
    index: int  # position in the package's questions.json: a stable id
    text: str
    answer: str
    image_id: int
    category: str

    @property
    def image(self) -> str:
        return f"{self.split}/{self.image_id}.png"

    @property
    def qid(self) -> str:
        return f"{self.split}-{self.index}"


def read_package(split: str) -> tuple[list[Question], dict[int, str], list[str]]:
    """The package's questions for `split`, its image paths by id, and skip messages for unusable questions."""
    import easy_vqa  # imported here: data_prep/easy_vqa.py must drop its own folder from sys.path first

    texts, answers, image_ids = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    questions, skips = [], []
    for i, (text, answer, image_id) in enumerate(zip(texts, answers, image_ids)):
        where = f"easy_vqa data/{split}/questions.json record {i}"
        if image_id not in paths:
            skips.append(f"{where}: field 'image_id' {image_id}: no such image in data/{split}/images")
            continue
        try:
            category = classify_question(text, answer)
        except QuestionError as e:
            skips.append(f"{where}: fields 'question'/'answer': {e}")
            continue
        questions.append(Question(split, i, text, answer, image_id, category))
    return questions, paths, skips


def image_labels(questions: list[Question]) -> tuple[dict[int, dict[str, str]], list[str]]:
    """Shape and colour of each image, read off its open questions and the yes/no questions that affirm one.

    A yes/no question affirms the attribute it names when it is answered "yes" or, negated ("is there not a
    red shape?", "is no circle present?"), answered "no"; otherwise it rules that value out, and an attribute
    with one value left is known too.

    Returns ({image_id: {"shape", "color"}}, conflict messages). An image whose questions disagree is dropped
    (and reported); one with an attribute that no question affirms keeps only what is known.
    """
    vocab = {"color": COLORS, "shape": SHAPES}
    labels: dict[int, dict[str, str]] = {}
    ruled_out: dict[tuple[int, str], set[str]] = {}
    conflicts: dict[int, str] = {}

    def affirm(q: Question, attr: str, value: str) -> None:
        known = labels.setdefault(q.image_id, {})
        if known.get(attr, value) != value:
            conflicts[q.image_id] = f"{q.split} image {q.image_id}: questions disagree on its {attr} ({known[attr]} vs {value}, {q.qid})"
        known[attr] = value

    for q in questions:
        attr = "color" if q.category.startswith("color") else "shape"
        if q.answer not in YES_NO:
            affirm(q, attr, q.answer)
            continue
        value = next(w for w in re.findall(r"[a-z]+", q.text) if w in vocab[attr])
        if (q.answer == "yes") != is_negated(q.text):
            affirm(q, attr, value)
        else:
            ruled_out.setdefault((q.image_id, attr), set()).add(value)
    # "not a circle" and "not a rectangle" leave a triangle: fill in attributes no question affirms.
    for (image_id, attr), out in ruled_out.items():
        left = set(vocab[attr]) - out
        if len(left) == 1 and attr not in labels.get(image_id, {}):
            labels.setdefault(image_id, {})[attr] = left.pop()
    for image_id in conflicts:
        labels.pop(image_id)
    return labels, sorted(conflicts.values())


def is_negated(text: str) -> bool:
    """'is there not a red shape?', 'is no circle present?': the answer means the opposite of the plain form's."""
    words = re.findall(r"[a-z]+", text.lower())
    return "not" in words or "no" in words


def balance_yes_no(questions: list[Question], rng: random.Random) -> tuple[list[Question], dict]:
    """Within each yes/no category and polarity, keep as many "yes" as "no" answers (a seeded subset of the larger
    side); other questions are kept. Returns (kept questions in their order, counts dropped per group).

    Why: easy-VQA asks "is there a red shape?" mostly about colours the image does not have (8 colours), so "no"
    is right 7 times in 8, and the reverse for the negated forms. Trained on the raw mix the demo's base model
    learns that prior and never the comparison (it gives the majority answer of every yes/no form). Balanced, the
    prior is worth nothing.
    """
    groups: dict[tuple[str, bool, str], list[int]] = {}
    for i, q in enumerate(questions):
        if q.answer in YES_NO:
            groups.setdefault((q.category, is_negated(q.text), q.answer), []).append(i)
    drop: set[int] = set()
    dropped = {}
    for (category, negated, answer), idx in sorted(groups.items()):
        other = groups.get((category, negated, "no" if answer == "yes" else "yes"), [])
        excess = len(idx) - len(other)
        if excess > 0:
            drop.update(rng.sample(idx, excess))
            dropped[f"{category}/{'negated' if negated else 'plain'}/{answer}"] = excess
    return [q for i, q in enumerate(questions) if i not in drop], dropped


def _conversation(q: Question) -> dict:
    return {
        "id": q.qid,
        "image": q.image,
        "conversations": [{"from": "human", "value": f"<image>\n{q.text}"}, {"from": "gpt", "value": q.answer}],
    }


def _eval_question(q: Question) -> dict:
    # LLaVA's model_vqa convention: `text` is the bare question; the generator adds the <image> placeholder.
    return {"question_id": q.qid, "image": q.image, "text": q.text, "answer": q.answer, "category": q.category}


# Old-family questions replayed in stage 2, as a fraction of the new family's: with 20% some seeds lost more than
# the 2-point target of the old task, with 40% none did (README, "Replay, and seeds").
DEFAULT_REPLAY = 0.4


def convert(
    output: str,
    split_by: str = "open",
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    copy_images: bool = True,
    balance: bool = True,
    replay: float = DEFAULT_REPLAY,
) -> dict:
    """Write the demo's data to `output` and return its summary (also written as summary.json).

    Files: images/{train,test}/<id>.png; train_<family>.jsonl (LLaVA conversations); test_<family>.jsonl
    (eval questions: question_id, image, text, answer, category); image_labels.jsonl (image, split, shape,
    color, for the vision stage); summary.json. Image paths are relative to `output/images`.
    `max_train` / `max_eval` cap each family's train / test questions with a seeded subset. `balance`: the
    training questions' yes/no answers are balanced first (balance_yes_no); the test questions keep the
    package's own distribution. `replay` (two-family splits): also write train_new_replay.jsonl, the new family's
    training questions plus a seeded sample of old-family training questions `replay` times as many, shuffled
    (rehearsal; the demo trains on it, see the README for what happens without it).
    Deterministic: the same arguments write the same bytes.
    """
    if split_by not in SPLITS:
        raise ValueError(f"unknown split {split_by!r}; known: {sorted(SPLITS)}")
    if not 0.0 <= replay <= 1.0:
        raise ValueError(f"replay must be a fraction in [0, 1], got {replay}")
    for name, n in (("max_train", max_train), ("max_eval", max_eval)):
        if n is not None and n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    families = SPLITS[split_by]
    os.makedirs(output, exist_ok=True)
    summary: dict = {"source": "easy-vqa (PyPI, MIT licence)", "split_by": split_by, "seed": seed, "balance": balance,
                     "max_train": max_train, "max_eval": max_eval, "families": {}, "skipped": {}}
    label_rows, train_rows = [], {}
    for split in ("train", "test"):
        questions, paths, skips = read_package(split)
        labels, conflicts = image_labels(questions)
        summary["skipped"][split] = {"questions": len(skips), "images_with_conflicting_labels": len(conflicts),
                                     "details": (skips + conflicts)[:50]}
        label_rows += [{"image": f"{split}/{i}.png", "split": split, **labels[i]} for i in sorted(labels)]
        if copy_images:
            dest = os.path.join(output, "images", split)
            os.makedirs(dest, exist_ok=True)
            for image_id in tqdm(sorted(paths), desc=f"copy {split} images", unit="img", leave=False):
                shutil.copyfile(paths[image_id], os.path.join(dest, f"{image_id}.png"))
        cap = max_train if split == "train" else max_eval
        for fam, cats in families.items():
            # One RNG per (split, family): a family's subset does not depend on which other families exist.
            rng = random.Random(f"{seed}-{split}-{fam}")
            chosen = [q for q in questions if q.category in cats]
            entry = summary["families"].setdefault(fam, {"categories": list(cats)})
            if balance and split == "train":
                chosen, entry["balance_dropped"] = balance_yes_no(chosen, rng)
            chosen = _subset(chosen, cap, rng)
            rows = [_conversation(q) if split == "train" else _eval_question(q) for q in chosen]
            _write_jsonl(os.path.join(output, f"{split}_{fam}.jsonl"), rows)
            if split == "train":
                train_rows[fam] = rows
            entry[split] = len(chosen)
            entry[f"{split}_per_category"] = dict(sorted(Counter(q.category for q in chosen).items()))
    if replay > 0 and set(families) == {"old", "new"}:
        summary["replay"] = write_replay(output, train_rows["new"], train_rows["old"], replay, seed)
    _write_jsonl(os.path.join(output, "image_labels.jsonl"), label_rows)
    summary["image_labels"] = dict(Counter(r["split"] for r in label_rows))
    with open(os.path.join(output, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def write_replay(output: str, new: list[dict], old: list[dict], fraction: float, seed: int) -> dict:
    """train_new_replay.jsonl: the new family's training records plus round(fraction * len) old-family ones,
    shuffled."""
    rng = random.Random(f"{seed}-replay")
    k = min(len(old), round(fraction * len(new)))
    mixed = new + rng.sample(old, k)
    rng.shuffle(mixed)
    _write_jsonl(os.path.join(output, "train_new_replay.jsonl"), mixed)
    return {"fraction": fraction, "new": len(new), "old_replayed": k, "file": "train_new_replay.jsonl"}


def format_summary(summary: dict) -> str:
    """A few lines of counts for the console."""
    lines = [f"easy-VQA split by {summary['split_by']} (seed {summary['seed']}):"]
    for fam, e in summary["families"].items():
        cats = ", ".join(f"{c} {e['train_per_category'].get(c, 0)}/{e['test_per_category'].get(c, 0)}" for c in e["categories"])
        lines.append(f"  {fam:4s} train {e['train']:6d}  test {e['test']:5d}   ({cats}; train/test)")
        if e.get("balance_dropped"):
            lines.append(f"       yes/no balance dropped from train: {e['balance_dropped']}")
    for split, s in summary["skipped"].items():
        if s["questions"] or s["images_with_conflicting_labels"]:
            lines.append(f"  skipped in {split}: {s['questions']} questions, {s['images_with_conflicting_labels']} images; "
                         f"first: {s['details'][:3]}")
    if summary.get("replay"):
        r = summary["replay"]
        lines.append(f"  {r['file']}: {r['new']} new + {r['old_replayed']} replayed old questions")
    lines.append(f"  image labels (shape, colour): {summary['image_labels']}")
    return "\n".join(lines)
