"""apply_milora: wrap a model with PEFT LoRA layers and set their initial values from SVD factors of W."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import transpose
from torch import nn

from .combine import enable_weighted_combination
from .config import MiLoRAConfig
from .distributed import Factors, InitReport, compute_initial_factors, resolve_device
from .offset import install_offset, install_subtract
from .targets import Target, find_targets, is_partitioned, vision_tower_exclusion

logger = logging.getLogger(__name__)

ADAPTER = "default"


def peft_lora_config(config: MiLoRAConfig) -> LoraConfig:
    """The plain PEFT LoraConfig carrying a MiLoRA adapter (its adapter_config.json is a standard LoRA one)."""
    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=config.target_modules,
        lora_dropout=config.lora_dropout,
        modules_to_save=config.modules_to_save,
        bias="none",
        # PEFT's Kaiming / zero init for init="lora"; otherwise the values are ours, set right after.
        init_lora_weights=config.init == "lora",
    )


def apply_milora(model: nn.Module, config: MiLoRAConfig) -> PeftModel:
    """Wrap `model` (a transformers causal LM or LLaVA, unwrapped) with a MiLoRA adapter and return the PeftModel.

    init != "lora": every target's lora_A / lora_B start as A0 / B0 = the selected SVD factors of W (see
    decompose.minor_factors); residual "offset" freezes them as buffers (output unchanged bit for bit at step 0),
    residual "subtract" writes W_res = W - s B0 A0 (computed in fp32, or fp64 for fp64 weights, cast once) into the
    base weight; it is refused on weights tied to another module (the write would change both).
    target_modules given as names on a LLaVA-style model (one with a `vision_tower`) match in the language model
    and projector only; give a regex to adapt the vision tower.
    Only the adapter (and modules_to_save) require grad. Works under torch.distributed / DeepSpeed ZeRO-2/3 with
    each matrix decomposed once; the result carries `milora_config` and `milora_init_report`.
    If anything fails, `model` is left as it was (PEFT's injection is undone) and the error is raised.
    """
    if not isinstance(config, MiLoRAConfig):
        raise TypeError(f"config must be a MiLoRAConfig, got {type(config).__name__}")
    if isinstance(model, PeftModel):
        raise TypeError("apply_milora takes the base model, not a PeftModel (it adds the adapter itself)")

    snapshot = ModelSnapshot(model)
    try:
        return _apply(model, config)
    except BaseException:
        snapshot.restore()
        raise


def _apply(model: nn.Module, config: MiLoRAConfig) -> PeftModel:
    lora_config = peft_lora_config(config)
    lora_config.exclude_modules = vision_tower_exclusion(model, config.target_modules)
    with torch.random.fork_rng(devices=[]):  # the same Kaiming draws on every rank for init="lora"
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora_config, adapter_name=ADAPTER)
    targets = find_targets(peft_model, ADAPTER)

    report = InitReport(total=len(targets))
    if config.init != "lora":
        preflight(targets, config)
        if config.residual == "subtract":
            refuse_tied(peft_model, targets)
        factors, report = compute_initial_factors(targets, config)
        set_initial_values(targets, factors)
        install_residual(peft_model, targets, factors, config)
    enable_weighted_combination(peft_model)
    peft_model.milora_config = config
    peft_model.milora_init_report = report
    return peft_model


class ModelSnapshot:
    """Every module's attributes (dicts copied one level deep: _modules, _parameters, hooks, ...) and every
    parameter's requires_grad, so that a failed apply_milora can undo PEFT's in-place injection (get_peft_model
    replaces modules, freezes the base and sets model.peft_config; PEFT's unload() would keep the
    modules_to_save copies and the flags). The weights' values are not copied: nothing writes them before the
    last step (the subtract write)."""

    def __init__(self, model: nn.Module):
        self.modules = [(m, {k: v.copy() if isinstance(v, dict) else v for k, v in vars(m).items()}) for m in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, state in self.modules:
            module.__dict__.clear()
            module.__dict__.update(state)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)


def refuse_tied(peft_model: PeftModel, targets: list[Target]) -> None:
    """residual 'subtract' writes W_res into the weight: refuse weights shared with another module (e.g. lm_head
    tied to the input embeddings), which the write would change as well."""
    names = defaultdict(list)
    for name, p in peft_model.base_model.model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    for t in targets:
        others = [n for n in names[id(t.weight)] if not n.startswith(f"{t.name}.")]
        if others:
            raise ValueError(
                f"target '{t.name}' shares its weight with '{others[0]}' (tied weights): residual 'subtract' would "
                "rewrite both; use residual 'offset' (W untouched) or drop the target"
            )


def record_subtract(peft_model: PeftModel, factors: Factors) -> None:
    """Under residual 'subtract' the base weights hold W_res = W - s B0 A0. Keep B0 A0 (save_milora rebuilds W
    from them) and refuse what would present W_res as the base model: disable_adapter(), unload() and
    disable_adapter_layers() give W_res x, not W x (residual 'offset' gives the base exactly)."""
    peft_model.milora_subtract_factors = {n: (a.cpu(), b.cpu()) for n, (a, b) in factors.items()}
    peft_model.disable_adapter = _refusal("disable_adapter()")
    peft_model.base_model.unload = _refusal("unload()")
    peft_model.base_model.disable_adapter_layers = _refusal("disable_adapter_layers()")


def _refusal(what: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"{what} on a MiLoRA model with residual 'subtract' would give W_res = W - s B0 A0, not the base model: "
            "load the base model itself, or train with residual 'offset' (whose disabled adapter is the base exactly); "
            "merge_and_unload() is correct in both modes"
        )

    return refuse


def preflight(targets: list[Target], config: MiLoRAConfig) -> None:
    """Shape and dtype checks from metadata alone (ZeRO-3 shards included), identical on every rank, before any
    rank starts gathering or decomposing."""
    r = config.r
    refuse_partitioned_copy(targets, config)
    for t in targets:
        if is_partitioned(t.layer.lora_A[ADAPTER].weight):
            raise RuntimeError(
                "the LoRA weights are already ZeRO-3 partitioned: call apply_milora before deepspeed.initialize / "
                "Trainer, on the model returned by from_pretrained"
            )
        m, n = t.shape
        if r > min(m, n):
            raise ValueError(f"target '{t.name}' ({m} x {n}): r={r} must satisfy 1 <= r <= min(out, in) = {min(m, n)}")
        dtype = t.weight.dtype
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise TypeError(
                f"target '{t.name}': weight dtype {dtype} is quantised; load the base model in bf16/fp32 for MiLoRA init"
            )


@torch.no_grad()
def set_initial_values(targets: list[Target], factors: Factors) -> None:
    """A, B <- A0, B0 on every target."""
    for t in targets:
        A0, B0 = factors[t.name]
        t.layer.lora_A[ADAPTER].weight.copy_(A0)
        t.layer.lora_B[ADAPTER].weight.copy_(B0)


@torch.no_grad()
def install_residual(
    peft_model: PeftModel, targets: list[Target], factors: Factors, config: MiLoRAConfig, trainable: bool = True
) -> None:
    """The chosen residual form on every target, from its factors (apply_milora, load_milora).

    offset: B0 / A0 frozen on the layer, plus the W_res copy for offset_backward 'residual_copy' when the model
    will train (an inference model never runs a backward, so it does not pay the copy's memory);
    subtract: W_res written into the base weight, B0 / A0 kept for merge and get_delta_weight.
    """
    if config.residual == "offset":
        keep_copy = trainable and config.offset_backward == "residual_copy"
        if keep_copy:
            refuse_partitioned_copy(targets, config)
        for t in targets:
            A0, B0 = factors[t.name]
            W_res = None
            if keep_copy:  # the same W_res, bit for bit, as residual 'subtract' writes into the weight
                W_res = transpose(_low_rank_sum(t, t.weight.data, A0, B0, -config.scaling), t.layer.fan_in_fan_out)
            install_offset(t.layer, ADAPTER, A0, B0, W_res)
        if keep_copy:
            size = sum(t.weight.numel() * t.weight.element_size() for t in targets)
            logger.info("offset_backward residual_copy: W_res copies of the %d adapted weights kept for the backward "
                        "(%.1f MiB)", len(targets), size / 2**20)
    else:
        subtract_residual(targets, factors, config.scaling)
        for t in targets:
            install_subtract(t.layer, ADAPTER, *factors[t.name])
        record_subtract(peft_model, factors)


def refuse_partitioned_copy(targets: list[Target], config: MiLoRAConfig) -> None:
    if config.residual == "offset" and config.offset_backward == "residual_copy" and any(
        is_partitioned(t.weight) for t in targets
    ):
        raise ValueError(
            "offset_backward 'residual_copy' keeps a whole copy of each adapted weight, and these weights are "
            "ZeRO-3 partitioned: use offset_backward 'factors' under ZeRO-3"
        )


@torch.no_grad()
def subtract_residual(targets: list[Target], factors: Factors, scaling: float, sign: float = -1.0) -> None:
    """W <- W + sign * s B0 A0, computed in fp32 (fp64 for fp64 weights) and cast once into the base dtype (the
    paper's W_res for sign -1).

    Under ZeRO-3 each weight is gathered, updated identically on every rank, and re-partitioned from rank 0.
    """
    for t in targets:
        A0, B0 = factors[t.name]
        param = t.weight
        if is_partitioned(param):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                _add_low_rank(t, param, A0, B0, sign * scaling)
        else:
            _add_low_rank(t, param, A0, B0, sign * scaling)


def _add_low_rank(t: Target, param: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, coef: float) -> None:
    param.data.copy_(_low_rank_sum(t, param.data, A0, B0, coef))


def _low_rank_sum(t: Target, weight: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, coef: float) -> torch.Tensor:
    """weight + coef B0 A0 in the weight's dtype, device and layout, computed in fp32 (fp64 for fp64 weights) and
    cast once."""
    device = resolve_device("auto", weight)
    dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32 for 16-bit weights, fp64 weights stay fp64
    delta = coef * (B0.to(device, dtype) @ A0.to(device, dtype))
    if t.layer.fan_in_fan_out:
        delta = delta.T
    return (weight.to(device, dtype) + delta).to(weight.dtype).to(weight.device)
