"""Stage 0 of the demo: a tiny LLaVA trained from scratch on the "pretrained knowledge" family of easy-VQA.

This is a toy base-model builder, not the product pipeline (scripts/train_vlm.py is): nothing can be downloaded,
so the demo makes its own "pretrained" LLaVA, in three short stages that mirror how a real one is made:

1. vision:    the CLIP-style ViT is trained as a shape + colour classifier on the training images (labels read
              off the questions; a real LLaVA's tower comes CLIP-pretrained). Trained only through the
              language-model loss the tower does not learn at this scale (the model sits at the answer prior;
              design notes); trained directly it learns colour and shape in about 2 minutes on 2 cores.
              Shape is learnt too, so the features carry what the "new task" will need later.
2. alignment: projector + language model learn to caption each image ("a red circle"), LLaVA's stage 1 (the
              LM is trained too: unlike Vicuna it starts from random weights and must learn its words here).
3. knowledge: projector + language model are trained on the old family's conversations with the demo's
              conversation template plus the captions of stage 2 (LLaVA's stage 2, full finetuning), tower
              frozen. The base model can thus say what shape it sees, but has never been asked about it in a
              conversation: the "new task" is to answer shape questions.

Plain PyTorch loops keep this compact and fast on a CPU: with the tower frozen after stage 1 its features are
computed once per image and written into the image-token slots of the input embeddings (the same row-major fill
as HF LLaVA's masked_scatter), which halves each step's cost. Conversations are encoded by the project's one
masking routine (milora_vlm.data.templates) and images preprocessed by milora_vlm.data.images, exactly as the
training pipeline and eval/generate.py do, so the saved model sees at evaluation what it saw here.
The result is a plain llava-hf directory (model + processor) plus demo_base.json describing how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from tqdm import tqdm

from milora_vlm.data.images import process_images
from milora_vlm.data.images import load_image
from milora_vlm.data.subset import seeded_subset as _subset
from milora_vlm.data.templates import IGNORE_INDEX, encode_conversation, get_template
from milora_vlm.model.tiny import build_tiny_llava, train_tiny_tokenizer

from .easyvqa import COLORS, SHAPES
from .spec import INFO_FILE, BaseModelSpec

# ---------------------------------------------------------------------------------------------------------------
# data


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; run data_prep/easy_vqa.py --output {os.path.dirname(path)} first")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenizer_corpus(data_dir: str) -> list[str]:
    """The distinct texts of every training conversation (both families: the tokenizer plays a real LLM's, which
    already knows the new task's words) and the answer words."""
    texts = set()
    for name in sorted(os.listdir(data_dir)):
        if name.startswith("train_") and name.endswith(".jsonl"):
            for rec in _read_jsonl(os.path.join(data_dir, name)):
                texts.update(t["value"].replace("<image>", "").strip() for t in rec["conversations"])
    return sorted(texts) + [" ".join(COLORS + SHAPES)]


def load_pixels(data_dir: str, images: list[str], image_processor) -> torch.Tensor:
    """pixel_values [N, 3, H, W] of `images` (paths relative to data_dir/images), preprocessed as in training."""
    out = []
    for start in tqdm(range(0, len(images), 256), desc="load images", unit="batch", leave=False):
        pil = [load_image(os.path.join(data_dir, "images", p)) for p in images[start : start + 256]]
        out.append(process_images(pil, image_processor, "pad"))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# stage 1: the vision tower as a classifier


def patch_features(tower, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """The features HF LLaVA hands its projector (strategy "default": the CLS token dropped)."""
    return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[feature_layer][:, 1:]


def train_vision(model, pixels: torch.Tensor, labels: list[dict], test_pixels: torch.Tensor, test_labels: list[dict],
                 spec: BaseModelSpec, writer=None) -> dict:
    """Train the tower with two linear heads (colour, shape) on its mean-pooled patch features; returns test accuracy.

    Labels may lack an attribute (-100 there: not every image has a question that pins both down). Horizontal flips
    are the only augmentation: easy-VQA's triangles always point up.
    """
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    hidden = tower.config.hidden_size
    heads = torch.nn.ModuleDict({"color": torch.nn.Linear(hidden, len(COLORS)), "shape": torch.nn.Linear(hidden, len(SHAPES))})

    def targets(rows):
        return {a: torch.tensor([vocab.index(r[a]) if a in r else -100 for r in rows])
                for a, vocab in (("color", COLORS), ("shape", SHAPES))}

    y, y_test = targets(labels), targets(test_labels)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=spec.vision_lr, weight_decay=0.01)
    steps_per_epoch = max(1, len(pixels) // spec.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec.vision_lr, total_steps=spec.vision_epochs * steps_per_epoch,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    tower.train()
    step = 0
    bar = tqdm(total=spec.vision_epochs * steps_per_epoch, desc="stage 0.1 vision", unit="step")
    for _ in range(spec.vision_epochs):
        perm = torch.randperm(len(pixels), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * spec.batch_size : (i + 1) * spec.batch_size]
            x = pixels[idx]
            flip = torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5
            x = torch.where(flip, x.flip(3), x)
            pooled = patch_features(tower, x, layer).mean(1)
            loss = sum(F.cross_entropy(heads[a](pooled), y[a][idx], ignore_index=-100) for a in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if writer is not None:
                writer.add_scalar("stage0/vision_loss", loss.item(), step)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    tower.eval()
    with torch.no_grad():
        pooled = torch.cat([patch_features(tower, test_pixels[i : i + 256], layer).mean(1)
                            for i in range(0, len(test_pixels), 256)])
    acc = {}
    for a in heads:
        known = y_test[a] >= 0
        acc[f"test_{a}_accuracy"] = round(100 * (heads[a](pooled).argmax(-1) == y_test[a])[known].float().mean().item(), 2)
    return acc


# ---------------------------------------------------------------------------------------------------------------
# stages 2 and 3: projector + language model on frozen image features


def caption_records(labels: list[dict], prompt: str | None = None) -> list[dict]:
    """One caption conversation ("a red circle") per image whose colour and shape are both known. Without a prompt the
    human turn is the bare image (stage 2, plain template); with one it is a question about the image (stage 3)."""
    question = "<image>" if not prompt else f"<image>\n{prompt}"
    return [{"image": r["image"], "conversations": [{"from": "human", "value": question},
                                                    {"from": "gpt", "value": f"a {r['color']} {r['shape']}"}]}
            for r in labels if "color" in r and "shape" in r]


def knowledge_mix(records: list[dict], labels: list[dict], spec: BaseModelSpec) -> list[tuple[list[dict], str]]:
    """Stage 3's conversations, in groups with the template each is encoded with: the family's questions, then
    (spec.knowledge_with_captions) the captions, asked with spec.caption_prompt or in stage 2's plain format."""
    mix = [(records, spec.template)]
    if spec.knowledge_with_captions:
        mix.append((caption_records(labels, spec.caption_prompt), spec.template if spec.caption_prompt else "plain"))
    return mix


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    image: int  # row of the feature table


def encode_samples(records: list[dict], image_rows: dict[str, int], tokenizer, template: str, image_token_id: int,
                   num_image_tokens: int) -> list[EncodedSample]:
    """LLaVA conversation records -> token ids and labels (the project's masking routine), memoised on the text:
    easy-VQA has a few hundred distinct question/answer pairs."""

    @lru_cache(maxsize=None)
    def encode(question: str, answer: str):
        convs = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        enc = encode_conversation(tokenizer, template, convs, image_token_id, num_image_tokens)
        return enc.input_ids, enc.labels

    out = []
    for rec in records:
        human, gpt = rec["conversations"]
        ids, labels = encode(human["value"], gpt["value"])
        out.append(EncodedSample(ids, labels, image_rows[rec["image"]]))
    return out


def _batch(samples: list[EncodedSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), IGNORE_INDEX)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s.input_ids)
        ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(s.input_ids), torch.tensor(s.labels), 1
    return ids, labels, mask, torch.tensor([s.image for s in samples])


def embed_with_images(model, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the projected image features written into the <image> slots, row-major: what HF LLaVA's
    forward does with pixel_values (done by hand here because the frozen tower's features are precomputed)."""
    embeds = model.get_input_embeddings()(input_ids)
    slots = input_ids == model.config.image_token_id
    projected = model.model.multi_modal_projector(image_features).to(embeds.dtype)
    return embeds.masked_scatter(slots.unsqueeze(-1), projected.reshape(-1, embeds.shape[-1]))


def train_language(model, features: torch.Tensor, samples: list[EncodedSample], epochs: int, spec: BaseModelSpec,
                   stage: str, pad_id: int, writer=None, step0: int = 0) -> tuple[float, int]:
    """Train projector + language model (tower frozen) on `samples`; returns (last logged loss, steps taken)."""
    model.model.vision_tower.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    opt = torch.optim.AdamW(params, lr=spec.lm_lr, weight_decay=0.0)
    steps_per_epoch = max(1, math.ceil(len(samples) / spec.batch_size))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec.lm_lr, total_steps=total, pct_start=0.05)
    rng = random.Random(f"{spec.seed}-{stage}")
    model.train()
    ema, step = None, 0
    bar = tqdm(total=total, desc=f"stage 0.{stage}", unit="step")
    for _ in range(epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        for i in range(steps_per_epoch):
            chunk = [samples[j] for j in order[i * spec.batch_size : (i + 1) * spec.batch_size]]
            ids, labels, mask, rows = _batch(chunk, pad_id)
            embeds = embed_with_images(model, ids, features[rows])
            loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            if writer is not None:
                writer.add_scalar(f"stage0/{stage}_loss", loss.item(), step0 + step)
            bar.set_postfix(loss=f"{ema:.3f}")
            bar.update()
    bar.close()
    model.eval()
    return ema, step


@torch.no_grad()
def answer_accuracy(model, features: torch.Tensor, samples: list[EncodedSample], pad_id: int) -> float:
    """Teacher-forced check: % of samples whose every answer token is the model's argmax (a quick stand-in for
    greedy generation, which eval/generate.py does on the saved model)."""
    model.eval()
    right = 0
    for start in range(0, len(samples), 256):
        ids, labels, mask, rows = _batch(samples[start : start + 256], pad_id)
        logits = model(inputs_embeds=embed_with_images(model, ids, features[rows]), attention_mask=mask).logits
        pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
        ok = (pred == gold) | (gold == IGNORE_INDEX)
        right += int(ok.all(dim=1).sum())
    return round(100 * right / max(len(samples), 1), 2)


# ---------------------------------------------------------------------------------------------------------------
# the whole builder


def build_base_model(data_dir: str, output: str, spec: BaseModelSpec | None = None, log_dir: str | None = None) -> dict:
    """Build the demo's base model from the converted easy-VQA data in `data_dir` and save it to `output`.

    Returns (and writes to output/demo_base.json) the spec, per-stage losses, accuracies and seconds.
    """
    spec = spec or BaseModelSpec()
    get_template(spec.template)  # fail early on a bad name
    t_start = time.time()
    torch.manual_seed(spec.seed)
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir)
    info: dict = {"spec": dataclasses.asdict(spec), "data_dir": os.path.abspath(data_dir), "seconds": {}}

    tokenizer = train_tiny_tokenizer(tokenizer_corpus(data_dir), vocab_size=spec.vocab_size,
                                     add_prefix_space=spec.tokenizer_prefix_space)
    model, processor = build_tiny_llava(
        tokenizer, image_size=spec.image_size, patch_size=spec.patch_size, text_hidden=spec.text_hidden,
        text_layers=spec.text_layers, vision_hidden=spec.vision_hidden, vision_layers=spec.vision_layers,
        projector="mlp2x_gelu", vision_feature_layer=-1, seed=spec.seed,
    )
    # The last layer's features go to the projector: the classifier heads trained in stage 1 read those too.
    num_image_tokens = (spec.image_size // spec.patch_size) ** 2
    image_token_id = model.config.image_token_id

    labels = _read_jsonl(os.path.join(data_dir, "image_labels.jsonl"))
    train_labels = _subset([r for r in labels if r["split"] == "train"], spec.max_images, f"{spec.seed}-img")
    test_labels = _subset([r for r in labels if r["split"] == "test"], spec.max_images, f"{spec.seed}-img-test")
    records = _subset(_read_jsonl(os.path.join(data_dir, f"train_{spec.train_family}.jsonl")), spec.max_questions,
                      f"{spec.seed}-q")
    checks = _subset(_read_jsonl(os.path.join(data_dir, f"test_{spec.train_family}.jsonl")), spec.check_questions,
                     f"{spec.seed}-check")
    # Every image any stage needs, one feature row each.
    images = sorted({r["image"] for r in train_labels + test_labels + records + checks})
    rows = {p: i for i, p in enumerate(images)}
    pixels = load_pixels(data_dir, images, processor.image_processor)
    test_pixels = pixels[torch.tensor([rows[r["image"]] for r in test_labels])] if test_labels else pixels[:0]
    info["seconds"]["prepare"] = round(time.time() - t_start, 1)

    t = time.time()
    train_pixels = pixels[torch.tensor([rows[r["image"]] for r in train_labels])]
    info["vision"] = train_vision(model, train_pixels, train_labels, test_pixels, test_labels, spec, writer)
    info["seconds"]["vision"] = round(time.time() - t, 1)
    print(f"stage 0.1 vision tower: {info['vision']} ({info['seconds']['vision']} s)")

    with torch.no_grad():  # the tower is frozen from here on: its features, once per image
        tower, layer = model.model.vision_tower, model.config.vision_feature_layer
        features = torch.cat([patch_features(tower, pixels[i : i + 256], layer) for i in range(0, len(pixels), 256)])

    t = time.time()
    caption_samples = encode_samples(caption_records(train_labels), rows, tokenizer, "plain", image_token_id,
                                     num_image_tokens)
    loss, steps = train_language(model, features, caption_samples, spec.align_epochs, spec, "2-align",
                                 tokenizer.pad_token_id, writer)
    info["align"] = {"samples": len(caption_samples), "steps": steps, "final_loss": round(loss, 4)}
    info["seconds"]["align"] = round(time.time() - t, 1)
    print(f"stage 0.2 alignment (captions): {info['align']} ({info['seconds']['align']} s)")

    t = time.time()
    mix = knowledge_mix(records, train_labels, spec)
    samples = [s for group, template in mix
               for s in encode_samples(group, rows, tokenizer, template, image_token_id, num_image_tokens)]
    loss, steps = train_language(model, features, samples, spec.knowledge_epochs, spec, "3-knowledge",
                                 tokenizer.pad_token_id, writer, step0=steps)
    check_samples = encode_samples(
        [{"image": c["image"], "conversations": [{"from": "human", "value": f"<image>\n{c['text']}"},
                                                 {"from": "gpt", "value": c["answer"]}]} for c in checks],
        rows, tokenizer, spec.template, image_token_id, num_image_tokens)
    info["knowledge"] = {"family": spec.train_family, "samples": len(samples),
                         "captions_mixed_in": sum(len(group) for group, _ in mix[1:]),
                         "caption_prompt": spec.caption_prompt or None, "steps": steps,
                         "final_loss": round(loss, 4),
                         "test_answer_accuracy": answer_accuracy(model, features, check_samples, tokenizer.pad_token_id),
                         "test_questions_checked": len(check_samples)}
    info["seconds"]["knowledge"] = round(time.time() - t, 1)
    print(f"stage 0.3 {spec.train_family} family: {info['knowledge']} ({info['seconds']['knowledge']} s)")

    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    info["seconds"]["total"] = round(time.time() - t_start, 1)
    with open(os.path.join(output, INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    if writer is not None:
        writer.close()
    return info
