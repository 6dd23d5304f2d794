"""Loading a saved model or adapter directory by what it holds: the one place training, inference, export and the
analysis load models from.

What a directory is (`checkpoint_kind`):
  "milora"     save_milora's adapter dir: adapter_config.json (task_type MILORA_ADAPTER, which plain PEFT refuses on
               purpose), milora_config.json, milora_init.safetensors (B0, A0); loads with milora.load_milora.
  "peft"       a plain PEFT LoRA adapter (adapter_config.json, no milora_config.json): PeftModel.from_pretrained.
  "llava"      a llava-hf full model (config.json, model_type "llava"): LlavaForConditionalGeneration.
  "causal_lm"  any other full model (config.json): AutoModelForCausalLM.
A merged export (milora_vlm.export) is a full model of its base's class, so it is "llava" or "causal_lm".
An adapter names its base in adapter_config.json (base_model_name_or_path, `adapter_base`) unless one is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image

from milora_vlm import jsontext
from milora_vlm.data.templates import IMAGE_PLACEHOLDER

MILORA, PEFT, LLAVA, CAUSAL_LM = "milora", "peft", "llava", "causal_lm"
ADAPTER_KINDS = (MILORA, PEFT)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# what a directory is

def checkpoint_kind(path: str | os.PathLike) -> str:
    """"milora", "peft", "llava" or "causal_lm" (see the module docstring)."""
    from milora_vlm.config.checks import looks_like_hub_id
    from milora_vlm.milora.persist import META_FILE, PEFT_CONFIG_FILE

    if not os.path.exists(path) and not looks_like_hub_id(os.fspath(path)):  # else transformers tries the hub
        raise FileNotFoundError(f"{path}: no such directory (nor a hub name of the form owner/name)")
    if os.path.exists(os.path.join(path, META_FILE)):
        return MILORA
    if os.path.exists(os.path.join(path, PEFT_CONFIG_FILE)):
        return PEFT
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path}: neither a MiLoRA / PEFT adapter (adapter_config.json) nor a saved model (config.json)"
        )
    from transformers import AutoConfig  # a local model directory, or a hub name an adapter config may give

    return LLAVA if AutoConfig.from_pretrained(path).model_type == "llava" else CAUSAL_LM


def is_adapter_dir(path: str | os.PathLike) -> bool:
    from milora_vlm.milora.persist import PEFT_CONFIG_FILE

    return os.path.isfile(os.path.join(path, PEFT_CONFIG_FILE))


def adapter_base(adapter_dir: str | os.PathLike) -> str:
    """The base checkpoint an adapter names in adapter_config.json (base_model_name_or_path)."""
    from milora_vlm.milora.persist import PEFT_CONFIG_FILE

    path = os.path.join(adapter_dir, PEFT_CONFIG_FILE)
    try:
        base = jsontext.read_object(path, "adapter config").get("base_model_name_or_path")
    except jsontext.InputFileError as e:
        raise ValueError(f"cannot read the base model from it ({e}); pass --base") from None
    if not base or not isinstance(base, str):
        raise ValueError(f"{path} names no base_model_name_or_path; pass --base (the checkpoint it was trained on)")
    return base


def has_processor_files(path: str | os.PathLike) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("processor_config.json", "preprocessor_config.json"))


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, "tokenizer_config.json"))


def recipe_template(path: str | os.PathLike) -> str | None:
    """data.template of the milora_recipe.yaml saved next to the model, if there is one."""
    from milora_vlm.config import RECIPE_FILENAME, read_yaml

    recipe = os.path.join(path, RECIPE_FILENAME)
    if not os.path.isfile(recipe):
        return None
    data = read_yaml(recipe, "saved recipe") or {}
    template = (data.get("data") or {}).get("template") if isinstance(data, dict) else None
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{recipe}: data.template must be a template name, got {template!r}")
    return template


# ----------------------------------------------------------------------------------------------------------------
# loading weights

def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """'auto' = bfloat16 on a GPU that supports it (`device`'s, or this machine's when none is given), else
    float32 (CPU runs are fp32)."""
    if name == "auto":
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_base(path: str | os.PathLike, dtype: torch.dtype | str, kind: str | None = None,
              attn_implementation: str | None = None) -> torch.nn.Module:
    """A full model in the class its config calls for: LlavaForConditionalGeneration for llava-hf, else
    AutoModelForCausalLM. `kind` ("llava" / "causal_lm") skips the detection; dtype "auto" keeps the stored one.
    Plain from_pretrained, so ZeRO-3's partitioned loading applies when its TrainingArguments exist."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    kind = kind or checkpoint_kind(path)
    if kind in ADAPTER_KINDS:
        raise ValueError(f"{path} is an adapter directory, not a full model; load its base and then load_adapter")
    kw = {"dtype": dtype}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    cls = LlavaForConditionalGeneration if kind == LLAVA else AutoModelForCausalLM
    return cls.from_pretrained(path, **kw)


def load_adapter(model: torch.nn.Module, adapter_dir: str | os.PathLike, residual: str | None = None):
    """Load an adapter directory onto its (original) base model: load_milora for MiLoRA's own directories (the
    exact trained function; `residual` as load_milora's), PeftModel.from_pretrained for a plain PEFT LoRA."""
    kind = checkpoint_kind(adapter_dir)
    if kind == MILORA:
        from milora_vlm.milora.persist import load_milora

        return load_milora(model, adapter_dir, residual=residual)
    if kind != PEFT:
        raise ValueError(f"{adapter_dir} is a full model ({kind}), not an adapter directory")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, os.fspath(adapter_dir))


# ----------------------------------------------------------------------------------------------------------------
# model + tokenizer / processor

@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    processor: object | None = None  # LlavaProcessor for LLaVA models, None for causal LMs
    image_token_id: int | None = None  # set by load_for_training (inference reads it from model.config)
    num_image_tokens: int = 0
    template: str | None = None  # from the recipe saved with the model, if any
    model_id: str = ""
    device: torch.device | None = None  # where load_for_inference put the model

    @property
    def is_llava(self) -> bool:
        return self.processor is not None

    @property
    def processing_class(self):
        """What the Trainer saves with checkpoints: the processor for LLaVA, the tokenizer for a causal LM."""
        return self.processor if self.processor is not None else self.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor if self.processor is not None else None


def ensure_pad_token(tokenizer) -> None:
    """LLaVA's rule: pad with <unk> when the tokenizer has no pad token (LLaMA, Vicuna), else with eos.

    Labels of padding are set by position in the collator, never by token id, so eos as pad is safe.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad, unk or eos token to pad with; add a pad token to it")


def count_image_tokens(processor, image_token_id: int) -> int:
    """How many image tokens one image expands to, measured with the processor's own rule on a blank image."""
    size = getattr(processor.image_processor, "crop_size", None) or getattr(processor.image_processor, "size", None)
    h = (size or {}).get("height") or (size or {}).get("shortest_edge") or 224
    w = (size or {}).get("width") or h
    enc = processor(text=IMAGE_PLACEHOLDER, images=[Image.new("RGB", (w, h))], return_tensors="pt")
    return int((enc["input_ids"] == image_token_id).sum())


def check_llava_processor(processor, path: str) -> None:
    """Refuse a LlavaProcessor that cannot expand `<image>`: llava-hf checkpoints saved before processor_config.json
    existed (transformers < 4.47) load with patch_size None and fail later with a raw TypeError."""
    if getattr(processor, "image_processor", None) is None:
        return
    if getattr(processor, "patch_size", None) is not None and getattr(processor, "vision_feature_select_strategy", None):
        return
    from transformers import AutoConfig

    from milora_vlm.config import ConfigError
    from milora_vlm.model.build import VISION_TOWERS

    fix = ""
    try:
        cfg = AutoConfig.from_pretrained(path)
        extra = VISION_TOWERS.get(cfg.vision_config.model_type, (None, 1))[1]
        fix = (f' {{"patch_size": {cfg.vision_config.patch_size}, "vision_feature_select_strategy": '
               f'"{cfg.vision_feature_select_strategy}", "num_additional_image_tokens": {extra}}}'
               " (the values of its config.json)")
    except (OSError, ValueError, AttributeError):
        pass
    raise ConfigError(
        f"{path}: the processor has no patch_size / vision_feature_select_strategy (processor_config.json is missing, "
        f"as in llava-hf checkpoints saved before transformers 4.47), so it cannot tell how many tokens an image "
        f"becomes. Add {os.path.join(path, 'processor_config.json')} with{fix or ' those keys'}, "
        "or re-save the processor with save_pretrained"
    )


def load_for_training(model_cfg, dtype: torch.dtype) -> LoadedModel:
    """The recipe's model (partitioned under ZeRO-3 when TrainingArguments with a ZeRO-3 config exist before this
    call) with its processor or tokenizer, pad token set and the processor's image expansion checked."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    if model_cfg.kind == CAUSAL_LM:
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.path)
        ensure_pad_token(tokenizer)
        model = load_base(model_cfg.path, dtype, CAUSAL_LM, model_cfg.attn_implementation)
        model.config.use_cache = False
        return LoadedModel(model, tokenizer)
    cfg = AutoConfig.from_pretrained(model_cfg.path)
    if cfg.model_type != "llava":
        raise ValueError(
            f"model.path {model_cfg.path!r} is a {cfg.model_type!r} checkpoint, not llava-hf; compose one with "
            "scripts/build_llava.py (or model.language_model + model.vision_tower), or use model.kind: causal_lm"
        )
    processor = AutoProcessor.from_pretrained(model_cfg.path)
    check_llava_processor(processor, model_cfg.path)
    tokenizer = processor.tokenizer
    ensure_pad_token(tokenizer)
    model = load_base(model_cfg.path, dtype, LLAVA, model_cfg.attn_implementation)
    model.config.use_cache = False
    image_token_id = model.config.image_token_id
    n = count_image_tokens(processor, image_token_id)
    expected = getattr(model.config, "image_seq_length", None)
    if expected is not None and n != expected:
        raise ValueError(
            f"{model_cfg.path}: the processor expands one image to {n} tokens but the model config says "
            f"image_seq_length {expected}; the processor and model were saved from different settings"
        )
    return LoadedModel(model, tokenizer, processor, image_token_id, n)


def load_for_inference(
    path: str,
    base: str | None = None,
    dtype: str = "auto",
    device: torch.device | None = None,
    model_id: str | None = None,
) -> LoadedModel:
    """A trained output ready to generate: a full (merged) model directory, or an adapter directory on its base
    (`base`, else the one adapter_config.json names). Tokenizer / processor files in the adapter dir win over the
    base's; the template comes from a milora_recipe.yaml saved with the model (or its base)."""
    from transformers import AutoProcessor, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a model or adapter directory")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    adapter = is_adapter_dir(path)
    if adapter:
        base = base or adapter_base(path)
    elif base is not None:
        raise ValueError(f"{path} is a full model directory (no adapter_config.json): --base does not apply")
    weights_dir = base if adapter else path
    kind = checkpoint_kind(weights_dir)
    is_llava = kind == LLAVA
    model = load_base(weights_dir, torch_dtype, kind)
    if adapter:
        model = load_adapter(model, path)
    model.to(device).eval()
    files_dir = path if (has_processor_files(path) if is_llava else has_tokenizer_files(path)) else weights_dir
    processor = AutoProcessor.from_pretrained(files_dir) if is_llava else None
    tokenizer = processor.tokenizer if is_llava else AutoTokenizer.from_pretrained(files_dir)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        template=recipe_template(path) or (recipe_template(base) if adapter else None),
        model_id=model_id or os.path.basename(os.path.normpath(path)),
        device=device,
    )
