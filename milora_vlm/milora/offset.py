"""The "offset" residual as a PEFT LoRA variant: y = W x + s (B A x - B0 A0 x), W untouched, B0 A0 frozen.

PEFT's LoRA layer calls `layer.lora_variant[adapter].forward(...)` in place of its vanilla `result + s B A x`;
this variant adds s * (B A x - B0 A0 x). At step 0 A == A0 and B == B0 bit for bit, so the two products are the
same floating-point numbers, their difference is exactly 0, and the layer's output is the base output unchanged in
any dtype (adding +s B0 A0 x to W x and then subtracting it again would round). The gradients of A and B are
LoRA's, and the frozen path gives x the gradient of -s B0 A0 x: the same function and gradients as the paper's
W_res = W - s B0 A0, without rounding W_res into the base dtype.

PEFT has no hook for a frozen offset (its PiSSA/MiLoRA-style inits rewrite W), hence this small variant.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from peft.utils.other import transpose
from torch import nn

# Attribute of the PEFT LoRA layer holding {adapter_name: _FrozenFactors}. The holder's buffers are not persistent:
# PEFT's adapter file stays a plain LoRA file and the factors travel in milora_init.safetensors (save_milora).
FROZEN_ATTR = "milora_frozen"


class _FrozenFactors(nn.Module):
    """B0 (out x r) and A0 (r x in) of one adapter: buffers, so never trained nor seen by the optimizer."""

    def __init__(self, A0: torch.Tensor, B0: torch.Tensor):
        super().__init__()
        self.register_buffer("A0", A0, persistent=False)
        self.register_buffer("B0", B0, persistent=False)


def frozen_factors(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    holder = getattr(layer, FROZEN_ATTR)[adapter]
    return holder.A0, holder.B0


def has_offset(layer: nn.Module, adapter: str) -> bool:
    return hasattr(layer, FROZEN_ATTR) and adapter in getattr(layer, FROZEN_ATTR)


class MiLoRAOffsetVariant(LoraVariant):
    """y = W x + s (B A dropout(x) - B0 A0 x).

    The frozen path sees the un-dropped x, as W_res x does in the paper's form W_res x + s B A dropout(x); in eval
    mode (no dropout) the output at step 0 is bit-identical to the base layer's.
    """

    def supports_lora_conversion(self) -> bool:
        return False  # PEFT's convert_to_lora does not know B0 A0; milora_vlm.export writes the rank-2r LoRA

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to do: install_offset sets the factors after the layer exists."""

    @staticmethod
    def delta_weight(module: nn.Module, adapter: str) -> torch.Tensor:
        """s (B A - B0 A0) in fp32, in the base weight's layout (transposed for Conv1D / fan_in_fan_out)."""
        A = module.lora_A[adapter].weight.float()
        B = module.lora_B[adapter].weight.float()
        A0, B0 = frozen_factors(module, adapter)
        delta = (B @ A - B0.float() @ A0.float()) * module.scaling[adapter]
        return transpose(delta, module.fan_in_fan_out)

    @staticmethod
    def merge_safe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = MiLoRAOffsetVariant.delta_weight(module, active_adapter).to(orig_weight.device)
        return (orig_weight.float() + delta).to(orig_weight.dtype)  # computed in fp32, cast once

    @staticmethod
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data.copy_(MiLoRAOffsetVariant.merge_safe(module, active_adapter, orig_weight.data))

    @staticmethod
    def unmerge(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = MiLoRAOffsetVariant.delta_weight(module, active_adapter).to(orig_weight.device)
        return (orig_weight.float() - delta).to(orig_weight.dtype)

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        A0, B0 = frozen_factors(module, active_adapter)
        adapted = lora_B(lora_A(dropout(x)))
        frozen = F.linear(F.linear(x, A0.to(x.dtype)), B0.to(x.dtype))
        return result + (adapted - frozen) * module.scaling[active_adapter]


def install_offset(
    layer: nn.Module, adapter: str, A0: torch.Tensor | None = None, B0: torch.Tensor | None = None
) -> None:
    """Register frozen A0 / B0 on a PEFT LoRA layer and switch it to the offset variant.

    Without A0 / B0 the layer's current lora_A / lora_B values are frozen (what apply_milora does right after
    setting them). The buffers take the adapter weights' own dtype and device, which is what makes the step-0
    difference exactly zero.
    """
    ref_A, ref_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    A0 = (ref_A.detach() if A0 is None else A0).to(device=ref_A.device, dtype=ref_A.dtype).clone()
    B0 = (ref_B.detach() if B0 is None else B0).to(device=ref_B.device, dtype=ref_B.dtype).clone()
    if not hasattr(layer, FROZEN_ATTR):
        setattr(layer, FROZEN_ATTR, nn.ModuleDict())
    getattr(layer, FROZEN_ATTR)[adapter] = _FrozenFactors(A0, B0)
    layer.lora_variant[adapter] = MiLoRAOffsetVariant()
