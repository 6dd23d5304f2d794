"""`bootstrap: tiny`: make a recipe runnable on a bare machine (CPU, no downloads).

When the recipe's model.path or data.train_file does not exist, build them: a small synthetic set (coloured
shapes drawn with PIL, asked about in conversations, with text-only arithmetic records mixed in; or, for a
causal LM, alpaca-style arithmetic instructions), then a tokenizer trained on that text and a tiny random LLaVA
or Llama (milora_vlm.model.tiny), saved like any checkpoint. Deterministic; written to a temporary sibling and
renamed, so a half-built directory is never taken for a finished one.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 32
NUM_IMAGES = 48
NUM_IMAGE_RECORDS = 96
NUM_TEXT_RECORDS = 32  # text-only records mixed into the LLaVA set
NUM_INSTRUCTIONS = 160  # causal-LM set
SEED = 0


def draw_shape(shape: str, colour: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} plus {b}?", f"{a + b}"


def shapes_records(image_dir: str, rng: random.Random, relative: bool = True) -> list[dict]:
    """Conversations about drawn shapes (one or two Q/A turns) plus text-only arithmetic, images saved to image_dir
    (records name them relative to it, or by absolute path)."""
    os.makedirs(image_dir, exist_ok=True)
    images = []
    for i in range(NUM_IMAGES):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        name = f"shape_{i:03d}.png"
        draw_shape(shape, colour, rng).save(os.path.join(image_dir, name))
        images.append((name if relative else os.path.abspath(os.path.join(image_dir, name)), shape, colour))
    records = []
    for i in range(NUM_IMAGE_RECORDS):
        name, shape, colour = images[i % NUM_IMAGES]
        qa = [("What shape is in the image?", shape), ("What color is the shape?", colour)]
        rng.shuffle(qa)
        turns = [{"from": "human", "value": f"<image>\n{qa[0][0]}"}, {"from": "gpt", "value": qa[0][1]}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": qa[1][0]}, {"from": "gpt", "value": qa[1][1]}]
        records.append({"id": f"shape-{i}", "image": name, "conversations": turns})
    for i in range(NUM_TEXT_RECORDS):
        q, a = _arithmetic(rng)
        records.append({"id": f"text-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    rng.shuffle(records)
    return records


def instruction_records(rng: random.Random) -> list[dict]:
    """Alpaca-style text instructions for a causal LM."""
    records = []
    for i in range(NUM_INSTRUCTIONS):
        if i % 2:
            q, a = _arithmetic(rng)
        else:
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 5)))
            q, a = f"Reverse the word {word}.", word[::-1]
        records.append({"id": f"inst-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    return records


def _atomic_dir(final: str):
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".tmp-", dir=parent)


def _read_texts(path: str) -> list[str]:
    from milora_vlm.data.records import iter_records

    return [t.get("value", "") for _, rec, _ in iter_records(path) if rec for t in rec.get("conversations", [])]


def bootstrap_tiny(recipe) -> None:
    """Create recipe.data.train_file (+ images) and recipe.model.path when missing. Call on one process."""
    from milora_vlm.data.records import write_records
    from milora_vlm.model.tiny import build_tiny_causal_lm, build_tiny_llava, train_tiny_tokenizer

    rng = random.Random(SEED)
    data = recipe.data
    if not os.path.exists(data.train_file):
        if recipe.model.kind == "llava":
            image_dir = data.image_folder or os.path.join(os.path.dirname(os.path.abspath(data.train_file)), "images")
            records = shapes_records(image_dir, rng, relative=data.image_folder is not None)
        else:
            records = instruction_records(rng)
        write_records(data.train_file, records)  # a .json array or .jsonl lines, by the file name
        logger.info("bootstrap: wrote %d synthetic records to %s", len(records), data.train_file)
    path = recipe.model.path
    if os.path.exists(path):
        return
    tokenizer = train_tiny_tokenizer(_read_texts(data.train_file) + list(COLOURS) + list(SHAPES), vocab_size=400)
    tmp = _atomic_dir(path)
    try:
        if recipe.model.kind == "llava":
            model, processor = build_tiny_llava(
                tokenizer,
                image_size=IMAGE_SIZE,
                projector=recipe.model.projector,
                vision_feature_layer=recipe.model.vision_feature_layer,
                vision_feature_select_strategy=recipe.model.vision_feature_select_strategy,
                seed=SEED,
            )
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        else:
            build_tiny_causal_lm(tokenizer, seed=SEED).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not os.path.isdir(path):  # only a concurrent bootstrap finishing first is fine
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("bootstrap: built a tiny %s at %s", recipe.model.kind, path)
