"""Walking models: which weights to analyse and what their update dW is (LoRA / MiLoRA / PiSSA adapters or a
full finetune). Which kind of checkpoint a directory holds, and loading it, is milora_vlm.model.load's."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn


_PEFT_PREFIX = "base_model.model."
_LAYER_RE = re.compile(r"^(?P<component>.*?)\.?layers\.(?P<layer>\d+)\.(?P<module>.+)$")


def module_location(name: str) -> tuple[str, int | None, str]:
    """(component, layer, module) of a module path, e.g. "model.language_model.layers.3.self_attn.q_proj" ->
    ("model.language_model", 3, "self_attn.q_proj"); a module outside any `layers.N` block gets layer None."""
    m = _LAYER_RE.match(name)
    if m:
        return m["component"], int(m["layer"]), m["module"]
    parent, _, leaf = name.rpartition(".")
    return parent, None, leaf


@dataclass
class ModuleDelta:
    """One weight to analyse: its path in the base model, the ORIGINAL weight W and the learned update dW."""

    name: str
    weight: torch.Tensor  # (out, in)
    delta: torch.Tensor  # (out, in): finetuned effective weight minus the original W
    rank: int | None  # the adapter's rank for this module; None for full finetuning


def _lora_factor_delta(layer, adapter: str) -> torch.Tensor:
    """s * B @ A in float64, (out, in) (PEFT's get_delta_weight without its round trip through the weight's
    dtype, and without its transpose to Conv1D's (in, out) storage)."""
    A = layer.lora_A[adapter].weight.detach().double()
    B = layer.lora_B[adapter].weight.detach().double()
    return layer.scaling[adapter] * (B @ A)


def iter_lora_deltas(
    peft_model: nn.Module,
    adapter: str | None = None,
    base_weights: Mapping[str, torch.Tensor] | None = None,
    include: Callable[[str], bool] | None = None,
    skipped: list[str] | None = None,
) -> Iterator[ModuleDelta]:
    """The update of every LoRA Linear layer of `peft_model` to its ORIGINAL weight, one module at a time.

    dW = s (B A - B0 A0) where the layer holds initial factors (MiLoRA / PiSSA, either residual mode; see
    `init_offset`), else s B A (plain LoRA: B0 A0 = 0); float64, CPU, (out, in) layout. The original W is
    `base_weights[name]` when given (a state dict of the untouched base, keys "<module>.weight"), else the
    layer's base weight with any subtracted initial part added back. Layers that are not LoRA Linear (embedding, conv) are reported
    in `skipped` (if a list is passed) rather than silently dropped.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    subtract_factors = getattr(peft_model, "milora_subtract_factors", None)
    config = getattr(peft_model, "milora_config", None)  # a MiLoRAConfig on models from apply/load_milora
    expects_factors = config is not None and config.init != "lora"
    for full_name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        name = full_name[len(_PEFT_PREFIX):] if full_name.startswith(_PEFT_PREFIX) else full_name
        if include is not None and not include(name):
            continue
        active = adapter or (layer.active_adapters[0] if layer.active_adapters else None)
        if active is None or active not in layer.lora_A:
            if skipped is not None:
                skipped.append(f"{name}: no LoRA adapter {active!r} on this layer")
            continue
        if not isinstance(layer, LoraLinear):
            if skipped is not None:
                skipped.append(f"{name}: {type(layer).__name__} is not a LoRA Linear layer; only Linear weights are analysed")
            continue
        if layer.use_dora.get(active, False):
            raise ValueError(f"{name}: DoRA layers rescale W's columns; their update is not s B A and is not analysed here")
        if getattr(layer, "merged", False):
            raise ValueError(f"{name}: adapter is merged into the base weight; analyse the unmerged PeftModel")
        delta = _lora_factor_delta(layer, active).cpu()
        offset, subtracted = init_offset(layer, active, name, subtract_factors)
        if offset is None and expects_factors:
            raise ValueError(
                f"{name}: the adapter was initialised from SVD factors (init={config.init!r}, residual="
                f"{config.residual!r}) but this layer carries none; its update cannot be told apart from W"
            )
        if offset is not None:
            delta = delta - offset
        if base_weights is not None:
            key = f"{name}.weight"
            if key not in base_weights:
                raise KeyError(f"{name}: the base model has no weight {key!r}; is it the adapter's base?")
            weight = base_weights[key].detach().double().cpu()
            if getattr(layer, "fan_in_fan_out", False):
                weight = weight.mT
        else:
            weight = layer.get_base_layer().weight.detach().double().cpu()
            if getattr(layer, "fan_in_fan_out", False):
                weight = weight.mT
            if subtracted and offset is not None:
                weight = weight + offset  # "subtract" residual: the layer stores W_res = W - s B0 A0
        yield ModuleDelta(name, weight, delta, int(layer.r[active]))


def init_offset(
    layer, adapter: str, name: str, subtract_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> tuple[torch.Tensor | None, bool]:
    """(s * B0 @ A0 in float64, (out, in) layout; whether it was subtracted from the stored base weight), or
    (None, False) for a layer without initial factors (plain LoRA).

    Where milora_vlm.milora keeps B0, A0: the "offset" residual registers them as buffers on the layer
    (milora.offset.frozen_factors); the "subtract" residual folds them into W and keeps them on the PeftModel
    as `milora_subtract_factors` {name: (A0, B0)}, passed here as `subtract_factors`.
    """
    from milora_vlm.milora.offset import frozen_factors, has_offset

    if has_offset(layer, adapter):
        A0, B0 = frozen_factors(layer, adapter)
        subtracted = False
    elif subtract_factors is not None and name in subtract_factors:
        A0, B0 = subtract_factors[name]
        subtracted = True
    else:
        return None, False
    offset = layer.scaling[adapter] * (B0.detach().double().to(A0.device) @ A0.detach().double())
    return offset.cpu(), subtracted


def iter_full_deltas(
    finetuned: nn.Module,
    base: nn.Module | Mapping[str, torch.Tensor],
    include: Callable[[str], bool],
    rank: int,
) -> Iterator[ModuleDelta]:
    """dW = W_finetuned - W_base for every nn.Linear of `finetuned` whose name `include` accepts (full
    finetuning as the reference; analysed with dW's top-`rank` directions)."""
    base_sd = base if isinstance(base, Mapping) else base.state_dict()
    found = False
    for name, module in finetuned.named_modules():
        if not isinstance(module, nn.Linear) or not include(name):
            continue
        key = f"{name}.weight"
        if key not in base_sd:
            raise KeyError(f"{name}: the base model has no weight {key!r}; is it the finetuned model's base?")
        found = True
        W = base_sd[key].detach().double()
        yield ModuleDelta(name, W, module.weight.detach().double() - W, rank)
    if not found:
        raise ValueError("no nn.Linear module of the finetuned model matched the module filter")


def name_filter(targets: str | Sequence[str] | None, layers: Sequence[int] | None = None) -> Callable[[str], bool]:
    """A module-name predicate: `targets` a regex (full match) or a list of name suffixes (PEFT's rule, through
    milora.targets.matches_target), `layers` a list of layer indices; None accepts everything."""
    from milora_vlm.milora.targets import matches_target  # peft is imported only when a filter is built

    def accept(name: str) -> bool:
        if targets is not None and not matches_target(targets, name):
            return False
        if layers is not None:
            return module_location(name)[1] in set(layers)
        return True

    return accept


# The language model's block projections (Llama naming; LLaVA or plain causal LM): what a full finetune is
# compared on when no targets are given. The vision tower is left out.
DEFAULT_FULL_TARGETS = r"(model\.language_model|model)\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
