"""Tiny-model helpers the MiLoRA, PEFT and export tests share: load a saved tiny model, a seeded batch, logits,
a MiLoRA config for a Llama or LLaVA model, one optimiser step."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

from milora_vlm.milora import MiLoRAConfig

LLAVA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def load_model(kind: str, path, dtype=torch.float32):
    cls = LlavaForConditionalGeneration if kind == "llava" else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype).eval()


def batch(kind: str, model, seed: int = 0) -> dict:
    """Two sequences of random text ids; for LLaVA with the image placeholder tokens and random pixels."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if kind != "llava":
        return {"input_ids": torch.randint(10, cfg.vocab_size, (2, 12), generator=g)}
    text = torch.randint(10, cfg.text_config.vocab_size, (2, 8), generator=g)
    image = torch.full((2, cfg.image_seq_length), cfg.image_token_index)
    size = cfg.vision_config.image_size
    return {
        "input_ids": torch.cat([text[:, :2], image, text[:, 2:]], dim=1),
        "pixel_values": torch.randn(2, 3, size, size, generator=g).to(model.dtype),
    }


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def milora_config(kind: str, **kw) -> MiLoRAConfig:
    defaults = {"r": 4, "lora_alpha": 8}
    if kind == "llava":
        defaults.update(target_modules=LLAVA_TARGETS, modules_to_save=["multi_modal_projector"])
    return MiLoRAConfig(**{**defaults, **kw})


def train_step(kind: str, model, inputs, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()
