"""MiLoRA's two residual forms as PEFT LoRA variants, and the layer class that gives PEFT their true delta weight.

The "offset" residual: y = W x + s (B A x - B0 A0 x), W untouched, B0 A0 frozen.

PEFT's LoRA layer calls `layer.lora_variant[adapter].forward(...)` in place of its vanilla `result + s B A x`;
this variant adds s * (B A x - B0 A0 x). At step 0 A == A0 and B == B0 bit for bit, so the two products are the
same floating-point numbers, their difference is exactly 0, and the layer's output is the base output unchanged in
any dtype (adding +s B0 A0 x to W x and then subtracting it again would round). The gradients of A and B are
LoRA's, and the frozen path gives x the gradient of -s B0 A0 x: the same function and gradients as the paper's
W_res = W - s B0 A0, without rounding W_res into the base dtype.

PEFT has no hook for a frozen offset (its PiSSA/MiLoRA-style inits rewrite W), hence this small variant; its
training-time product is a hand-written autograd Function (_OffsetAdapter) so that both paths cost two GEMMs
each way instead of four. With offset_backward 'residual_copy' the layer also keeps W_res = W - s B0 A0 (a buffer,
never saved) and takes x's gradient through it, as the paper's form does, so the frozen path has no backward.

The "subtract" residual (the paper's W_res in the base weight) computes PEFT's vanilla LoRA forward; its variant
only supplies merge / unmerge. In both forms get_delta_weight (MiLoRALinear) is s (B A - B0 A0), the change of
the original W, which is what add_weighted_adapter and other PEFT weight tools read.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.utils.other import transpose
from torch import nn

from .targets import is_partitioned

# Attribute of the PEFT LoRA layer holding {adapter_name: _FrozenFactors}. The holder's buffers are not persistent:
# PEFT's adapter file stays a plain LoRA file and the factors travel in milora_init.safetensors (save_milora).
FROZEN_ATTR = "milora_frozen"


class _FrozenFactors(nn.Module):
    """B0 (out x r) and A0 (r x in) of one adapter: buffers, so never trained nor seen by the optimizer. W_res
    (out x in, or None) is the copy of W - s B0 A0 that offset_backward 'residual_copy' takes x's gradient through."""

    def __init__(self, A0: torch.Tensor, B0: torch.Tensor, W_res: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("A0", A0, persistent=False)
        self.register_buffer("B0", B0, persistent=False)
        self.register_buffer("W_res", W_res, persistent=False)


def frozen_factors(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    holder = getattr(layer, FROZEN_ATTR)[adapter]
    return holder.A0, holder.B0


def has_offset(layer: nn.Module, adapter: str) -> bool:
    """True when the layer computes the offset form (subtract-form layers also hold B0 / A0, for merging)."""
    return (
        hasattr(layer, FROZEN_ATTR)
        and adapter in getattr(layer, FROZEN_ATTR)
        and isinstance(layer.lora_variant.get(adapter), MiLoRAOffsetVariant)
    )


class _OffsetAdapter(torch.autograd.Function):
    """result + s (B A x_lora - B0 A0 x) with two GEMMs forward and two backward for the pair of paths (issue 17).

    x_lora is x (no dropout) or dropout(x); result is the base layer's output W x. Without dropout the product is
    taken in delta form,
        B A - B0 A0 = B (A - A0) + (B - B0) A0  =  [B, B - B0] @ [A - A0; A0],
    so one GEMM over the stacked [A - A0; A0] and one over [B, B - B0] compute both paths, and at step 0 (A - A0 and
    B - B0 exactly 0) every product is exactly 0 whatever order the GEMMs sum in: the layer's output stays the base
    output bit for bit. With dropout the inputs differ, so A x_lora and A0 x are two GEMMs and [B, -B0] is one.
    The second GEMM accumulates onto result (addmm), saving the separate pass over the N x out output that
    `result + ...` costs (about 2% of a tiny-recipe step; BENCHMARKS.md, step ratio).
    The gradients are written out (autograd would keep the intermediates of both forms): the paper's
    dA = s B^T g x_lora^T, dB = s g (A x_lora)^T, and x's gradient W^T g + s (B A - B0 A0)^T g in one of two ways:
    - W_res None (offset_backward 'factors'): W^T g comes back through result (the base layer's own backward), the
      rest as s (B A - B0 A0)^T g through both paths (split by path with dropout). Its multiply-adds are LoRA's
      plus frozen_path_flops, nothing more (tests/milora/test_step_cost.py).
    - W_res = W - s B0 A0 (offset_backward 'residual_copy'): W_res^T g + s A^T B^T g, the paper's own backward, so
      the frozen path costs nothing backward. result gets no gradient (the caller passes it detached: W_res^T g
      already carries the base layer's W^T g), and LoRA's multiply-adds plus the forward half of the frozen path's
      are all it does.
    """

    @staticmethod
    def forward(ctx, result, x, x_lora, A, B, A0, B0, W_res, scaling):
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # none on "meta"
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        ctx.dtypes = (result.dtype, x.dtype, x.dtype if x_lora is None else x_lora.dtype, A.dtype, B.dtype)
        ctx.shape, ctx.autocast = x.shape, autocast
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            # one compute dtype for forward and backward; 2-D views so that no GEMM operand needs a copy
            x, A, B, A0, B0 = (_as(t, dtype) for t in (x.reshape(-1, x.shape[-1]), A, B, A0, B0))
            r = A.shape[0]
            if x_lora is None:
                Wa = torch.cat([A - A0, A0])  # (2r, in)
                Wb = _scaled(torch.cat([B, B - B0], dim=1), scaling)  # (out, 2r)
                h = x @ Wa.T  # [(A - A0) x, A0 x]
                ax = h[:, :r] + h[:, r:]  # A x, for dB
                x_in, factors = x, (Wa, Wb)
            else:
                x_lora = _as(x_lora, dtype).reshape(-1, x_lora.shape[-1])
                Wb = _scaled(torch.cat([B, -B0], dim=1), scaling)
                ax = x_lora @ A.T
                h = torch.cat([ax, x @ A0.T], dim=1)
                x_in, factors = x_lora, (A0, Wb, A)
            # each backward keeps only what it reads: the copy's needs neither Wa, Wb nor A0
            ctx.save_for_backward(x_in, ax, *(factors if W_res is None else (A, B, W_res)))
            out = Wb.shape[0]
            y = torch.addmm(_as(result.reshape(-1, out), dtype), h, Wb.T)  # the GEMM adds onto the base output
        ctx.fused, ctx.residual_copy, ctx.r, ctx.scaling = x_lora is None, W_res is not None, r, scaling
        return y.reshape(*ctx.shape[:-1], out)

    @staticmethod
    def backward(ctx, gy):
        r, s, shape = ctx.r, ctx.scaling, ctx.shape
        x, ax, *factors = ctx.saved_tensors
        x_grad, x_lora_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        # factors: the base output's gradient passes through unchanged (W^T g is the base layer's own backward);
        # residual_copy: none, W_res^T g below includes W^T g
        grad_result = gy if not ctx.residual_copy and ctx.needs_input_grad[0] else None
        grad_x = grad_x_lora = None
        with torch.autocast(gy.device.type, enabled=False) if ctx.autocast else contextlib.nullcontext():
            gy = _as(gy.reshape(-1, gy.shape[-1]), ax.dtype)
            if not ctx.residual_copy:
                W_x, Wb, *A = factors  # W_x: [A - A0; A0] (fused) or A0 (dropout, which also keeps A)
                # (N, 2r): s g B and s g (B - B0) [fused] or s g B and -s g B0 [dropout]; the second half only
                # feeds x's gradient, so when x needs none (the first layer's q/k/v on frozen embeddings) it is
                # not computed
                gh = gy @ (Wb if x_grad else Wb[:, :r])
                if ctx.fused and x_grad:
                    grad_x = gh @ W_x
                elif not ctx.fused:
                    grad_x = gh[:, r:] @ W_x if x_grad else None
                    grad_x_lora = gh[:, :r] @ A[0] if x_lora_grad else None
            else:
                A, B, W_res = factors
                # s g B, taken as (B^T g^T)^T: a GEMM with r output columns (g @ B) ran 2-3x slower at r 8 on
                # the CPU's BLAS than this one with N, and no faster at r 64 (bench notes in BENCHMARKS.md)
                gh = _scaled((B.T @ gy.T).T, s)
                if x_grad:  # (out-of-place addmm: FlopCounterMode does not count addmm_, test_step_cost counts this)
                    grad_x = gy @ _as(W_res, gy.dtype)
                    if ctx.fused:
                        grad_x = torch.addmm(grad_x, gh, A)
                if not ctx.fused and x_lora_grad:
                    grad_x_lora = gh @ A
            grad_A = gh[:, :r].T @ x
            grad_B = _scaled(gy.T @ ax, s)
        grads = (grad_result, *(None if g is None else g.reshape(shape) for g in (grad_x, grad_x_lora)), grad_A, grad_B)
        return (*(None if g is None else _as(g, d) for g, d in zip(grads, ctx.dtypes)), None, None, None, None)


def frozen_path_flops(
    tokens: int, in_features: int, out_features: int, r: int, input_grad: bool, residual_copy: bool = False
) -> int:
    """FLOPs (2 x multiply-adds) the offset form must spend beyond LoRA's on one adapted matrix per step.

    s B0 A0 x costs 2 N r (in + out) forward, and x's gradient through it the same again backward; when x needs
    no gradient, or x's gradient is taken through the W_res copy (residual_copy), only the forward remains.
    LoRA's own work (6 N r (in + out) with x's gradient) is not included.
    """
    return 2 * tokens * r * (in_features + out_features) * (2 if input_grad and not residual_copy else 1)


# At the tiny recipe's sizes a step is dominated by per-op overhead: skip the no-op casts and the scaling by 1
# (alpha = r, the paper's MiLoRA setting).
def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scaled(t: torch.Tensor, scaling: float) -> torch.Tensor:
    return t if scaling == 1 else t.mul_(scaling)


def _dropout_active(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32, or the tensor's own dtype when wider (fp64 models keep their precision)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scaled_product(module: nn.Module, adapter: str) -> torch.Tensor:
    """s B A in fp32 (or wider), in the base weight's layout."""
    A, B = _wide(module.lora_A[adapter].weight), _wide(module.lora_B[adapter].weight)
    return transpose(B @ A * module.scaling[adapter], module.fan_in_fan_out)


def milora_delta(module: nn.Module, adapter: str) -> torch.Tensor:
    """s (B A - B0 A0) in fp32 (or wider) and the base weight's layout: what the adapter adds to the original W."""
    A, B = _wide(module.lora_A[adapter].weight), _wide(module.lora_B[adapter].weight)
    A0, B0 = frozen_factors(module, adapter)
    delta = (B @ A - _wide(B0) @ _wide(A0)) * module.scaling[adapter]
    return transpose(delta, module.fan_in_fan_out)


def _add(weight: torch.Tensor, delta: torch.Tensor, sign: float) -> torch.Tensor:
    """weight + sign * delta, computed in fp32 (or the weight's own wider dtype) and cast once."""
    wide = _wide(weight)
    return (wide + sign * delta.to(wide.device, wide.dtype)).to(weight.dtype)


class _MiLoRAVariant(LoraVariant):
    """The weight algebra both forms share: merge adds `merge_delta` to the layer's weight, computed in fp32 and cast
    once, unmerge subtracts it. PEFT calls these methods on the variant instance."""

    merge_delta: Any  # staticmethod (module, adapter) -> fp32 delta in the base weight's layout

    def supports_lora_conversion(self) -> bool:
        return False  # PEFT's convert_to_lora does not know B0 A0; milora_vlm.export writes the rank-2r LoRA

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to do: install_offset / install_subtract set the factors after the layer exists."""

    def merge_safe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return _add(orig_weight, self.merge_delta(module, active_adapter), 1.0)

    def merge_unsafe(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data.copy_(self.merge_safe(module, active_adapter, orig_weight.data))

    def unmerge(self, module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return _add(orig_weight, self.merge_delta(module, active_adapter), -1.0)


class MiLoRAOffsetVariant(_MiLoRAVariant):
    """y = W x + s (B A dropout(x) - B0 A0 x); merging adds s (B A - B0 A0) to W.

    The frozen path sees the un-dropped x, as W_res x does in the paper's form W_res x + s B A dropout(x); in eval
    mode (no dropout) the output at step 0 is bit-identical to the base layer's.
    """

    merge_delta = staticmethod(milora_delta)

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        A0, B0 = frozen_factors(module, active_adapter)
        scaling = module.scaling[active_adapter]
        if is_partitioned(lora_A.weight) or lora_B.bias is not None:
            # ZeRO-3 gathers lora_A / lora_B only when their own forward runs: call the modules.
            return unfused_offset(module, active_adapter, x, result)
        x_lora = dropout(x) if _dropout_active(dropout) else None
        W_res = getattr(module, FROZEN_ATTR)[active_adapter].W_res
        if W_res is not None and _result_is_base_output(module):
            result = result.detach()  # x's gradient goes through W_res instead of the base layer's W
        else:
            W_res = None
        return _OffsetAdapter.apply(result, x, x_lora, lora_A.weight, lora_B.weight, A0, B0, W_res, scaling)


def _result_is_base_output(module: nn.Module) -> bool:
    """True when the `result` PEFT hands the variant is the frozen base layer's output and nothing else (one active
    adapter, no trainable base parameter), so that cutting its graph for the W_res backward loses no gradient.
    Otherwise the layer takes x's gradient through the factors, the same gradient without the copy."""
    base = module.get_base_layer()
    return len(module.active_adapters) == 1 and not any(p.requires_grad for p in base.parameters())


def unfused_offset(module: nn.Module, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The same function through the LoRA modules and autograd: four GEMMs each way (the ZeRO-3 path; also the
    reference that bench/step_ratio.py times the fused one against)."""
    A0, B0 = frozen_factors(module, adapter)
    adapted = module.lora_B[adapter](module.lora_A[adapter](module.lora_dropout[adapter](x)))
    frozen = F.linear(F.linear(x, A0.to(x.dtype)), B0.to(x.dtype))
    return result + (adapted - frozen) * module.scaling[adapter]


class MiLoRASubtractVariant(_MiLoRAVariant):
    """The paper's form: the base layer holds W_res = W - s B0 A0 and the layer adds s B A dropout(x), exactly
    PEFT's vanilla LoRA forward; merging adds s B A to W_res. get_delta_weight (MiLoRALinear) still reports the
    change of the original W, s (B A - B0 A0), as in the offset form."""

    merge_delta = staticmethod(_scaled_product)

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        return result + lora_B(lora_A(module.lora_dropout[active_adapter](x))) * module.scaling[active_adapter]


class MiLoRALinear(LoraLinear):
    """PEFT's LoRA Linear whose get_delta_weight knows MiLoRA's frozen term.

    PEFT's own get_delta_weight returns s B A and ignores the layer's variant; merge / unmerge go through the
    variant, but add_weighted_adapter's svd combinations and other tools call get_delta_weight directly. MiLoRA
    layers are switched to this class (same state, one method more) by install_offset / install_subtract.
    """

    def get_delta_weight(self, adapter) -> torch.Tensor:
        if isinstance(self.lora_variant.get(adapter), (MiLoRAOffsetVariant, MiLoRASubtractVariant)):
            return milora_delta(self, adapter).to(self.lora_B[adapter].weight.dtype)
        return super().get_delta_weight(adapter)


def _as_milora_layer(layer: nn.Module) -> None:
    if type(layer) is LoraLinear:
        layer.__class__ = MiLoRALinear
    elif not isinstance(layer, MiLoRALinear):
        raise TypeError(f"MiLoRA adapts PEFT LoRA Linear layers; got {type(layer).__name__}")


def _install_factors(
    layer: nn.Module, adapter: str, A0: torch.Tensor | None, B0: torch.Tensor | None, W_res: torch.Tensor | None = None
) -> None:
    """Register frozen A0 / B0 buffers on a PEFT LoRA layer, in the adapter weights' own dtype and device.

    Without A0 / B0 the layer's current lora_A / lora_B values are frozen (what apply_milora does right after
    setting them); matching dtype and device is what makes the step-0 difference exactly zero.
    """
    ref_A, ref_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    A0 = (ref_A.detach() if A0 is None else A0).to(device=ref_A.device, dtype=ref_A.dtype).clone()
    B0 = (ref_B.detach() if B0 is None else B0).to(device=ref_B.device, dtype=ref_B.dtype).clone()
    if not hasattr(layer, FROZEN_ATTR):
        setattr(layer, FROZEN_ATTR, nn.ModuleDict())
    getattr(layer, FROZEN_ATTR)[adapter] = _FrozenFactors(A0, B0, W_res)
    _as_milora_layer(layer)


def install_subtract(
    layer: nn.Module, adapter: str, A0: torch.Tensor | None = None, B0: torch.Tensor | None = None
) -> None:
    """Record A0 / B0 on a layer whose base weight already holds W_res, for merge / get_delta_weight."""
    _install_factors(layer, adapter, A0, B0)
    layer.lora_variant[adapter] = MiLoRASubtractVariant()


def install_offset(
    layer: nn.Module,
    adapter: str,
    A0: torch.Tensor | None = None,
    B0: torch.Tensor | None = None,
    W_res: torch.Tensor | None = None,
) -> None:
    """Register frozen A0 / B0 on a PEFT LoRA layer (see _install_factors) and switch it to the offset variant.

    W_res: W - s B0 A0 in the base weight's dtype, device and (out, in) layout for offset_backward 'residual_copy'
    (apply.install_residual computes it), or None to take x's gradient through the factors.
    """
    if W_res is not None:
        W = layer.get_base_layer().weight
        if tuple(W_res.shape) != (layer.out_features, layer.in_features) or W_res.dtype != W.dtype:
            raise ValueError(f"W_res must be {layer.out_features} x {layer.in_features} {W.dtype}, got "
                             f"{tuple(W_res.shape)} {W_res.dtype}")
        W_res = W_res.detach()
    _install_factors(layer, adapter, A0, B0, W_res)
    layer.lora_variant[adapter] = MiLoRAOffsetVariant()
