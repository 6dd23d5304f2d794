"""PEFT's add_weighted_adapter for models carrying MiLoRA adapters.

PEFT combines adapters from their raw factors ("linear", "cat", the ties / dare / magnitude family) or from
get_delta_weight (the "*svd" family). A MiLoRA adapter's raw (A, B) is not its delta: the change of W is
s (B A - B0 A0), which is exactly the plain LoRA of rank 2r with A' = [A; A0], B' = [B, -B0] and the same
scaling (what milora_vlm.export writes). So each MiLoRA adapter taking part is first copied into such a temporary
plain rank-2r adapter, PEFT's own add_weighted_adapter combines those, and the copies are deleted: every
combination type then means for MiLoRA what it means for LoRA. The new adapter is a plain LoRA holding a change
of the original W (in the subtract form, the model's base layers hold W_res: use the offset form, e.g.
load_milora(..., residual="offset"), to run it).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from peft import PeftModel
from peft.tuners.lora import LoraModel

from .offset import FROZEN_ATTR, MiLoRALinear, frozen_factors

_COPY_SUFFIX = "__milora_rank2r"


class MiLoRALoraModel(LoraModel):
    """PEFT's LoraModel whose add_weighted_adapter expands MiLoRA adapters to their exact rank-2r LoRA first."""

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args, **kwargs) -> None:
        copies = {a: a + _COPY_SUFFIX for a in adapters if _is_milora(self, a)}
        if not copies or adapter_name in self.peft_config:  # PEFT returns without a word for an existing name
            return super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)
        try:
            for adapter, copy in copies.items():
                self._add_rank2r_copy(adapter, copy)
            super().add_weighted_adapter([copies.get(a, a) for a in adapters], weights, adapter_name, *args, **kwargs)
        finally:
            for copy in copies.values():
                if copy in self.peft_config:
                    self.delete_adapter(copy)

    @torch.no_grad()
    def _add_rank2r_copy(self, adapter: str, copy: str) -> None:
        config = self.peft_config[adapter]
        if config.rank_pattern or config.alpha_pattern or config.use_rslora:
            raise ValueError(f"adapter '{adapter}': rank_pattern / alpha_pattern / rslora are not MiLoRA settings")
        self.peft_config[copy] = replace(config, r=2 * config.r, lora_alpha=2 * config.lora_alpha, init_lora_weights=False)
        self.inject_adapter(self.model, copy)
        for module in self.model.modules():
            if isinstance(module, MiLoRALinear) and adapter in getattr(module, FROZEN_ATTR, {}):
                A0, B0 = frozen_factors(module, adapter)
                A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                module.lora_A[copy].weight.copy_(torch.cat([A, A0.to(A.dtype)]))
                module.lora_B[copy].weight.copy_(torch.cat([B, -B0.to(B.dtype)], dim=1))


def _is_milora(lora_model: LoraModel, adapter: str) -> bool:
    return any(isinstance(m, MiLoRALinear) and adapter in getattr(m, FROZEN_ATTR, {}) for m in lora_model.model.modules())


def enable_weighted_combination(peft_model: PeftModel) -> None:
    """Switch the PeftModel's LoraModel to MiLoRALoraModel (same state, one method overridden)."""
    tuner = peft_model.base_model
    if type(tuner) is LoraModel:
        tuner.__class__ = MiLoRALoraModel
    elif not isinstance(tuner, MiLoRALoraModel):
        raise TypeError(f"expected PEFT's LoraModel under the PeftModel, got {type(tuner).__name__}")
