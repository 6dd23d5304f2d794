"""The target matrices of a PEFT LoRA model and access to their full (out x in) weights, ZeRO-3 included."""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator, Optional

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

VISION_TOWER = "vision_tower"  # LLaVA's (llava-hf) name for the CLIP encoder


def matches_target(target_modules: str | list[str] | tuple[str, ...], name: str) -> bool:
    """Whether PEFT would wrap the module `name` for `target_modules`, by PEFT's own rule
    (`check_target_module_exists`): a regex string must match the whole path; a list entry matches the path or
    its last dotted components. The project's one target matcher (recipe checks, vision-tower exclusion,
    analysis filters)."""
    config = SimpleNamespace(target_modules=target_modules, exclude_modules=None, modules_to_save=None,
                             target_parameters=None, layers_to_transform=None, layers_pattern=None)
    return bool(check_target_module_exists(config, name))


@dataclass
class Target:
    """One LoRA-wrapped matrix. `name` is the module's name in the base model (no PEFT prefix)."""

    name: str
    layer: LoraLayer

    @property
    def weight(self) -> nn.Parameter:
        return self.layer.get_base_layer().weight

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in), known even while ZeRO-3 holds only a shard of the weight."""
        return int(self.layer.out_features), int(self.layer.in_features)

    @property
    def cost(self) -> int:
        """Decomposition cost model ~ m n min(m, n) (Gram product and SVD alike), for balancing ranks."""
        m, n = self.shape
        return m * n * min(m, n)


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (its .data is a shard or empty until gathered)."""
    return hasattr(param, "ds_id")


def find_targets(peft_model: nn.Module, adapter: str = "default") -> list[Target]:
    """The LoRA layers carrying `adapter`, in module order (identical on every rank), checked to be decomposable."""
    base = peft_model.base_model.model
    targets = []
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.r:  # r: set for every LoRA layer type
            continue
        base_layer = module.get_base_layer()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise TypeError(
                f"MiLoRA decomposes nn.Linear and transformers Conv1D weights; target module '{name}' is a "
                f"{type(base_layer).__name__}: remove it from target_modules (or use init='lora' for it)"
            )
        targets.append(Target(name, module))
    if not targets:
        raise ValueError(f"no LoRA layer carries adapter '{adapter}': check target_modules")
    return targets


@contextlib.contextmanager
def full_weight(target: Target) -> Iterator[torch.Tensor]:
    """Yield the target's whole weight as (out x in), read-only.

    Under ZeRO-3 this gathers the partitioned parameter (a collective call: every rank must enter it, in the same
    order) and frees it again on exit. Conv1D (GPT-2) stores (in x out), so it is transposed (a view).
    """
    param = target.weight
    if is_partitioned(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield _as_out_in(target, param.data)
    else:
        yield _as_out_in(target, param.data)


def _as_out_in(target: Target, w: torch.Tensor) -> torch.Tensor:
    return w.T if target.layer.fan_in_fan_out else w


def vision_tower_exclusion(model: nn.Module, target_modules) -> Optional[str]:
    """PEFT exclude_modules regex keeping name-list target_modules out of a LLaVA vision tower, or None.

    Names such as q_proj / k_proj / v_proj also match the CLIP tower's attention; MiLoRA adapts the language model
    (the paper, and the recipes' own rule), so names given as a list are not matched inside the vision tower. A
    regex string is taken as written: that is how to adapt the tower on purpose.
    """
    if isinstance(target_modules, str):
        return None
    hit = [
        name for name, _ in model.named_modules()
        if VISION_TOWER in name.split(".") and matches_target(target_modules, name)
    ]  # fmt: skip
    if not hit:
        return None
    logger.info(
        "MiLoRA: target_modules %s also name %d modules of the vision tower (e.g. %s); adapting the language model "
        "only (give target_modules as a regex to adapt the vision tower)", target_modules, len(hit), hit[0],
    )
    return rf"(?:.*\.)?{re.escape(VISION_TOWER)}(?:\..*)?"
