"""Loading a trained output for inference: a merged model directory or an adapter directory.

  merged dir   config.json (+ weights, tokenizer / processor): LLaVA when config's model_type is "llava", else
               AutoModelForCausalLM; plain from_pretrained.
  adapter dir  adapter_config.json + adapter_model.safetensors (PEFT), optionally milora_config.json +
               milora_init.safetensors (MiLoRA's frozen offset factors) and milora_recipe.yaml (the training
               recipe; its data.template names the conversation template). The base model comes from
               base_model_name_or_path in adapter_config.json unless `base` overrides it. MiLoRA adapters load
               with milora_vlm.milora.load_milora (the exact trained function); plain PEFT LoRA adapters with
               PeftModel.from_pretrained. Tokenizer / processor files in the adapter dir win over the base's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

RECIPE_FILE = "milora_recipe.yaml"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    processor: object | None  # LlavaProcessor for LLaVA models, None for causal LMs
    is_llava: bool
    template: str | None  # from the recipe saved with the model, if any
    model_id: str
    device: torch.device


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def recipe_template(path: str | os.PathLike) -> str | None:
    """data.template of the milora_recipe.yaml saved next to the model, if there is one."""
    recipe = os.path.join(path, RECIPE_FILE)
    if not os.path.isfile(recipe):
        return None
    import yaml

    with open(recipe, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    template = (data.get("data") or {}).get("template") if isinstance(data, dict) else None
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{recipe}: data.template must be a template name, got {template!r}")
    return template


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _has_tokenizer(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "tokenizer_config.json"))


def _has_processor(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("processor_config.json", "preprocessor_config.json"))


def load_for_inference(
    path: str,
    base: str | None = None,
    dtype: str = "auto",
    device: torch.device | None = None,
    model_id: str | None = None,
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a model or adapter directory")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    adapter = is_adapter_dir(path)
    if adapter:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            base = base or json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path: pass --base")
    elif base is not None:
        raise ValueError(f"{path} is a full model directory (no adapter_config.json): --base does not apply")
    weights_dir = base if adapter else path
    is_llava = AutoConfig.from_pretrained(weights_dir).model_type == "llava"
    model_cls = LlavaForConditionalGeneration if is_llava else AutoModelForCausalLM
    model = model_cls.from_pretrained(weights_dir, dtype=torch_dtype)
    if adapter:
        model = _attach_adapter(model, path)
    model.to(device).eval()
    files_dir = path if (_has_processor(path) if is_llava else _has_tokenizer(path)) else weights_dir
    processor = AutoProcessor.from_pretrained(files_dir) if is_llava else None
    tokenizer = processor.tokenizer if is_llava else AutoTokenizer.from_pretrained(files_dir)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        is_llava=is_llava,
        template=recipe_template(path) or (recipe_template(base) if adapter else None),
        model_id=model_id or os.path.basename(os.path.normpath(path)),
        device=device,
    )


def _attach_adapter(model, adapter_dir: str):
    from milora_vlm.milora.persist import META_FILE

    if os.path.isfile(os.path.join(adapter_dir, META_FILE)):
        from milora_vlm.milora import load_milora

        return load_milora(model, adapter_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir)
