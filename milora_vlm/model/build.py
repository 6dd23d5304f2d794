"""Composing a llava-hf checkpoint from a causal LM + a vision tower.

Training always loads with a plain `from_pretrained` (model/load.py; so that ZeRO-3's partitioned loading works):
a LLaVA that does not exist yet is composed once by `compose_llava` and saved in llava-hf format (model +
processor), by scripts/build_llava.py or by the training script itself before loading.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipVisionModel,
)
# From its module: transformers 5.17 exports a placeholder at the top level that demands torchvision (not installed
# with the CPU torch); the class itself falls back to the PIL processor without it, as 5.24's top-level one does.
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from milora_vlm.data.templates import IMAGE_PLACEHOLDER

from .load import ensure_pad_token
from .projectors import PROJECTORS

logger = logging.getLogger(__name__)

# Vision towers we can compose with: model_type of their config -> (model class, extra tokens before the patches)
VISION_TOWERS = {
    "clip": (CLIPVisionModel, 1),  # CLS token
    "clip_vision_model": (CLIPVisionModel, 1),
    "siglip": (SiglipVisionModel, 0),
    "siglip_vision_model": (SiglipVisionModel, 0),
}


# ----------------------------------------------------------------------------------------------------------------
# composing

def _load_vision_tower(path: str, dtype):
    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type not in VISION_TOWERS:
        raise ValueError(
            f"model.vision_tower {path!r} is a {cfg.model_type!r} model; composing supports CLIP and SigLIP "
            f"vision towers ({sorted(VISION_TOWERS)})"
        )
    cls, extra_tokens = VISION_TOWERS[cfg.model_type]
    return cls.from_pretrained(path, dtype=dtype), extra_tokens


def _projector_state_dict(path: str, projector: str) -> dict[str, torch.Tensor]:
    """A stage-1 projector file in llava-hf names (linear_1 / linear_2).

    Accepts LLaVA's mm_projector.bin (`model.mm_projector.0.weight`, `.2.`; a single `mm_projector.weight` for
    LLaVA's linear projector, which becomes linear_1 with an identity linear_2), a llava-hf state dict
    (`...multi_modal_projector.linear_1.weight`) or this project's adapter files (modules_to_save copies).
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        raw = load_file(path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for key, value in raw.items():
        for marker in ("mm_projector.", "multi_modal_projector."):
            if marker in key:
                name = key.split(marker, 1)[1]
                break
        else:
            continue
        name = name.replace("modules_to_save.default.", "").replace("original_module.", "")
        name = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
                "2.bias": "linear_2.bias", "weight": "linear_1.weight", "bias": "linear_1.bias"}.get(name, name)
        out[name] = value
    if not out:
        raise ValueError(f"model.projector_weights: {path} holds no mm_projector / multi_modal_projector tensors")
    if "linear_2.weight" not in out and PROJECTORS[projector].single_linear:
        hidden = out["linear_1.weight"].shape[0]
        out["linear_2.weight"] = torch.eye(hidden, dtype=out["linear_1.weight"].dtype)
        out["linear_2.bias"] = torch.zeros(hidden, dtype=out["linear_1.weight"].dtype)
    return out


def compose_llava(
    language_model: str,
    vision_tower: str,
    output_dir: str,
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    projector_weights: str | None = None,
) -> str:
    """Build a LlavaForConditionalGeneration from a causal LM + a CLIP/SigLIP vision tower and save it (with its
    LlavaProcessor) to `output_dir` in llava-hf format. The modules are moved, not copied, and the LM keeps its
    stored dtype. Adds the `<image>` token (resizing the embeddings) when the tokenizer lacks it."""
    tokenizer = AutoTokenizer.from_pretrained(language_model)
    ensure_pad_token(tokenizer)
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    lm = AutoModelForCausalLM.from_pretrained(language_model, dtype="auto")
    dtype = lm.dtype
    vision, extra_tokens = _load_vision_tower(vision_tower, dtype)
    if extra_tokens == 0 and vision_feature_select_strategy == "default":
        raise ValueError(
            "model.vision_feature_select_strategy 'default' drops the first vision token (CLIP's CLS); "
            f"{vision_tower} has no CLS token: use 'full'"
        )
    vcfg = vision.config
    num_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    image_seq_length = num_patches + extra_tokens - (1 if vision_feature_select_strategy == "default" else 0)
    config = LlavaConfig(
        vision_config=vcfg.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        projector_hidden_act=PROJECTORS[projector].hidden_act,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_seq_length=image_seq_length,
        tie_word_embeddings=getattr(lm.config, "tie_word_embeddings", False),
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):  # skeleton only: the real modules are moved in below
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = lm.get_decoder()
    model.lm_head = lm.get_output_embeddings()
    model.model.vision_tower = vision
    proj = LlavaMultiModalProjector(config)
    if projector_weights is not None:
        try:
            proj.load_state_dict(_projector_state_dict(projector_weights, projector))
        except RuntimeError as e:
            raise ValueError(f"model.projector_weights: {projector_weights} does not fit this projector: {e}") from None
    model.model.multi_modal_projector = proj.to(dtype)
    if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if config.tie_word_embeddings:
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"composing left parameters unset: {leftover[:5]}")
    image_processor = AutoImageProcessor.from_pretrained(vision_tower)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=extra_tokens,
    )
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logger.info("composed LLaVA (%s + %s, %s projector) saved to %s", language_model, vision_tower, projector, output_dir)
    return output_dir
