"""Padded vs padding-free (packed) training batches on a generated mix with LLaVA-665K's shape.

The mix: image samples (576 image tokens + a question/answer text, like LLaVA-1.5's VQA and conversation data)
and text-only samples (ShareGPT-like, from a few dozen tokens to 2048), text-only being ~6% of the records
(40K of 665K in llava_v1_5_mix665k). One epoch of the same samples is trained three ways, batch by batch
interleaved so that load changes hit all three alike:
- padded: random order, each batch padded to its longest sample (ConversationCollator);
- grouped: LLaVA's modality-length grouped order (ModalityLengthGroupedSampler), padded;
- packed: random order, the batch packed into rows (ConversationCollator packing, the pipeline's row capacity),
  attention per sample (milora_vlm.model.packed_attention, as the pipeline uses under sdpa);
- packed+mask: the same packed batches with transformers' own sdpa, which confines attention by a row x row mask.
For each it reports useful tokens / processed tokens (real tokens over the batch tensors' size) and useful tokens
per second of forward + backward. The model is a LLaMA-shaped language model (sdpa attention) fed the collators'
batches; the vision tower is left out because it sees the same images in every layout.

    python bench/packing.py                       # defaults below; prints JSON lines, then a summary line
    python bench/packing.py --samples 32 --hidden 128
    python bench/packing.py --device cuda --dtype bf16 --samples 512 --batch 16 --hidden 2048 --layers 4   # a GPU
On a GPU the device is synchronised around each step (bench/gpu_checks.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import torch

from milora_vlm.data.collator import SKIPS_KEY, ConversationCollator, packed_row_tokens
from milora_vlm.data.templates import IGNORE_INDEX
from milora_vlm.model.load import resolve_dtype
from milora_vlm.model.packed_attention import PACKED_SDPA, use_packed_sdpa
from milora_vlm.model.tiny import tiny_llama_config
from milora_vlm.train.sampler import ModalityLengthGroupedSampler

IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px, LLaVA-1.5
PAD, IMAGE_ID = 0, 1


def llava665k_like(n: int, max_length: int, text_only: float, seed: int) -> list[dict]:
    """Samples with LLaVA-665K-like lengths: image ones 576 + lognormal text (median ~110), text-only lognormal
    (median ~450), all in [30, max_length]; the first ~half of the text (and the image) is prompt (IGNORE_INDEX)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        image = rng.random() >= text_only
        if image:
            text = int(min(max(rng.lognormvariate(4.7, 0.7), 20), max_length - IMAGE_TOKENS))
            ids = [IMAGE_ID] * IMAGE_TOKENS + [rng.randrange(2, 500) for _ in range(text)]
        else:
            ids = [rng.randrange(2, 500) for _ in range(int(min(max(rng.lognormvariate(6.1, 0.9), 30), max_length)))]
        ids = torch.tensor(ids)
        labels = ids.clone()
        image_part = IMAGE_TOKENS if image else 0
        labels[: image_part + (len(ids) - image_part) // 2] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels, "image": image})
    return out


def batches(samples: list[dict], order: list[int], batch: int):
    return [[samples[i] for i in order[s : s + batch]] for s in range(0, len(order) - batch + 1, batch)]


def step_time(model, batch: dict) -> float:
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != SKIPS_KEY}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--row-tokens", type=int, default=None, help="packed row capacity (default: the pipeline's)")
    ap.add_argument("--text-only", type=float, default=0.06)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="fp32, bf16, fp16 or auto (bf16 on a GPU, fp32 on the CPU)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    load0 = os.getloadavg()
    samples = llava665k_like(args.samples, args.max_length, args.text_only, args.seed)
    # the sampler's length estimate: > 0 image, < 0 text-only (here the exact token count)
    lengths = [len(s["input_ids"]) * (1 if s["image"] else -1) for s in samples]
    random_order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    grouped = ModalityLengthGroupedSampler(lengths, batch_size=args.batch, world_size=1, seed=args.seed)
    padded_c = ConversationCollator(pad_token_id=PAD)
    packed_c = ConversationCollator(pad_token_id=PAD, packing=True, row_tokens=args.row_tokens or packed_row_tokens(args.max_length))
    plan = {"padded": (padded_c, random_order), "padded+grouped": (padded_c, list(grouped)), "packed": (packed_c, random_order),
            "packed+mask": (packed_c, random_order)}
    attention = {"padded": "sdpa", "padded+grouped": "sdpa", "packed": PACKED_SDPA, "packed+mask": "sdpa"}
    useful, layouts = {}, {}
    for k, (collate, order) in plan.items():
        bs = batches(samples, order, args.batch)
        useful[k] = sum(int(s["input_ids"].shape[0]) for b in bs for s in b)
        layouts[k] = [collate(b) for b in bs]
    cfg = tiny_llama_config(512, hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64),
                            intermediate_size=int(args.hidden * 2.6875), max_position_embeddings=args.max_length)
    from transformers import LlamaForCausalLM

    cfg._attn_implementation = "sdpa"
    try:
        dtype = resolve_dtype(args.dtype, torch.device(args.device))
    except ValueError as e:
        ap.error(str(e))
    model = LlamaForCausalLM(cfg).to(args.device, dtype).train()
    use_packed_sdpa(model)
    for k in layouts:  # warm-up: one batch of each layout (a GPU also selects its kernels per attention path)
        model.config._attn_implementation = attention[k]
        step_time(model, layouts[k][0])
    seconds = {k: 0.0 for k in layouts}
    n_batches = len(layouts["padded"])
    names = list(layouts)
    for i in range(n_batches):  # interleaved, the order rotating each batch
        for k in names[i % len(names) :] + names[: i % len(names)]:
            model.config._attn_implementation = attention[k]  # read at each forward
            model.zero_grad(set_to_none=True)
            seconds[k] += step_time(model, layouts[k][i])
    rows = {}
    for k, bs in layouts.items():
        processed = sum(b["input_ids"].numel() for b in bs)
        rows[k] = {"bench": "packing", "layout": k, "attention": attention[k], "batches": len(bs), "useful_tokens": useful[k],
                   "processed_tokens": processed, "useful_fraction": round(useful[k] / processed, 4),
                   "seconds": round(seconds[k], 2), "useful_tokens_per_s": round(useful[k] / seconds[k], 1)}
        print(json.dumps(rows[k]), flush=True)
    print(json.dumps({
        "bench": "packing", "samples": args.samples, "batch": args.batch, "max_length": args.max_length,
        "row_tokens": packed_c.row_tokens,
        "text_only": args.text_only, "hidden": args.hidden, "layers": args.layers, "dtype": str(dtype),
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "packed_vs_padded_tokens_per_s": round(rows["packed"]["useful_tokens_per_s"] / rows["padded"]["useful_tokens_per_s"], 3),
        "packed_vs_grouped_tokens_per_s": round(rows["packed"]["useful_tokens_per_s"] / rows["padded+grouped"]["useful_tokens_per_s"], 3),
        "packed_mask_vs_padded_tokens_per_s": round(rows["packed+mask"]["useful_tokens_per_s"] / rows["padded"]["useful_tokens_per_s"], 3),
        "cpu": f"{platform.machine()} x{os.cpu_count()}", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }), flush=True)


if __name__ == "__main__":
    main()
