"""Issue 17.1, counted rather than timed: what a MiLoRA training step computes next to a plain LoRA step.

Timings on a shared CPU resolve a ratio to 2-4% (BENCHMARKS.md); these counts are exact. The subtract form must
dispatch LoRA's ops, one for one, at the same shapes (so its step costs LoRA's); the offset form's
multiply-adds must be LoRA's plus the frozen path's own (offset.frozen_path_flops), with nothing wasted.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from milora_vlm.milora import apply_milora
from milora_vlm.milora.offset import MiLoRAOffsetVariant, frozen_path_flops, unfused_offset
from milora_vlm.milora.targets import find_targets
from tests.helpers.milora_models import batch, load_model, milora_config

KINDS = ["llama", "llava"]


class _OpTrace(TorchDispatchMode):
    """Every aten op dispatched, with the shapes and dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        self.ops.append((str(func), tuple((tuple(a.shape), a.dtype) for a in flat if isinstance(a, torch.Tensor))))
        return func(*args, **kwargs)


def adapted(kind: str, model_dir, dropout: float, **kw):
    cfg_kw = {"lora_dropout": dropout, **kw}
    return apply_milora(load_model(kind, model_dir), milora_config(kind, **cfg_kw)).train()


def forward_backward(model, inputs) -> None:
    torch.manual_seed(0)  # the same dropout masks in every model
    model(**inputs, labels=inputs["input_ids"]).loss.backward()


@pytest.fixture
def model_dir(request, tiny_causal_lm_dir, tiny_llava_dir):
    return tiny_llava_dir if request.param == "llava" else tiny_causal_lm_dir


@pytest.mark.parametrize("model_dir", KINDS, indirect=True, ids=KINDS)
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_subtract_step_dispatches_loras_ops(request, model_dir, dropout):
    """The paper's form (W_res in the base weight) runs LoRA's step exactly: the same aten ops in the same order at
    the same shapes and dtypes, forward and backward, so it costs what LoRA's step costs."""
    kind = request.node.callspec.params["model_dir"]
    traces = []
    for init in ("lora", "minor"):
        model = adapted(kind, model_dir, dropout, init=init, residual="subtract")
        inputs = batch(kind, model)
        with _OpTrace() as trace:
            forward_backward(model, inputs)
        traces.append(trace.ops)
    lora, subtract = traces
    assert any("mm" in op for op, _ in lora)  # the trace saw the GEMMs
    assert subtract == lora


def gemm_flops(model, inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        forward_backward(model, inputs)
    return counter.get_total_flops()


def frozen_floor(model, inputs, residual_copy: bool = False) -> tuple[int, int]:
    """Sum of frozen_path_flops over the adapted matrices, each with its input's token count and whether the input
    needs a gradient (seen by a hook during one step), and how many inputs needed none."""
    seen = {}

    def record(target):
        def hook(module, args):  # returns None: the inputs pass unchanged
            seen.setdefault(id(target), (target, args[0]))
        return hook

    hooks = [t.layer.register_forward_pre_hook(record(t)) for t in find_targets(model)]
    try:
        forward_backward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    total = sum(frozen_path_flops(x.numel() // x.shape[-1], t.shape[1], t.shape[0], t.layer.r["default"], x.requires_grad,
                                  residual_copy) for t, x in seen.values())
    return total, sum(not x.requires_grad for _, x in seen.values())


class _Unfused(MiLoRAOffsetVariant):
    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        return unfused_offset(module, active_adapter, x, result)


@pytest.mark.parametrize("model_dir", KINDS, indirect=True, ids=KINDS)
@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("path", ["fused", "unfused", "residual_copy"])  # unfused: the ZeRO-3 path
def test_offset_step_adds_only_the_frozen_paths_flops(request, model_dir, dropout, path):
    """Offset-form FLOPs == LoRA's + the frozen path's (s B0 A0 x forward, x's gradient through it backward where
    x needs one; with offset_backward 'residual_copy' the forward alone): the offset product spends nothing beyond
    what the form itself requires."""
    kind = request.node.callspec.params["model_dir"]
    lora = adapted(kind, model_dir, dropout, init="lora")
    backward = "residual_copy" if path == "residual_copy" else "factors"
    offset = adapted(kind, model_dir, dropout, init="minor", residual="offset", offset_backward=backward)
    if path == "unfused":
        for t in find_targets(offset):
            t.layer.lora_variant["default"] = _Unfused()
    inputs = batch(kind, lora)
    floor, no_grad_inputs = frozen_floor(offset, inputs, residual_copy=path == "residual_copy")
    # the tiny Llama's first layer reads frozen embeddings: its q/k/v inputs need no gradient, and that case counts
    assert no_grad_inputs == (3 if kind == "llama" else 0)
    assert floor > 0
    assert gemm_flops(offset, inputs) - gemm_flops(lora, inputs) == floor




@pytest.mark.parametrize("dropout", [False, True], ids=["fused", "dropout"])
@pytest.mark.parametrize("residual_copy", [False, True], ids=["factors", "residual_copy"])
def test_offset_product_keeps_only_what_its_backward_reads(dropout, residual_copy):
    """The tensors _OffsetAdapter holds from forward to backward, by shape, under bf16 autocast (where every saved
    factor is a cast copy, not the parameter itself): the factors backward keeps neither A nor B beside the
    stacked factors, the copy's backward none of the stacked factors or A0."""
    from milora_vlm.milora.offset import _OffsetAdapter

    n, d_in, d_out, r = 6, 12, 10, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g, requires_grad=True)
    A, A0 = (torch.randn(r, d_in, generator=g, requires_grad=grad) for grad in (True, False))
    B, B0 = (torch.randn(d_out, r, generator=g, requires_grad=grad) for grad in (True, False))
    W_res = torch.randn(d_out, d_in, generator=g) if residual_copy else None
    x_lora = torch.nn.functional.dropout(x, 0.1) if dropout else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _OffsetAdapter.apply(torch.zeros(n, d_out), x, x_lora, A, B, A0, B0, W_res, 2.0)
    if residual_copy:
        expected = [(n, d_in), (n, r), (r, d_in), (d_out, r), (d_out, d_in)]  # x_in, A x_in, A, B, W_res
    elif dropout:
        expected = [(n, d_in), (n, r), (r, d_in), (d_out, 2 * r), (r, d_in)]  # x_lora, A x_lora, A0, [B, -B0], A
    else:
        expected = [(n, d_in), (n, r), (2 * r, d_in), (d_out, 2 * r)]  # x, A x, [A - A0; A0], [B, B - B0]
    assert saved == expected
