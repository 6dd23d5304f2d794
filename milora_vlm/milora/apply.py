"""apply_milora: wrap a model with PEFT LoRA layers and set their initial values from SVD factors of W."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .combine import enable_weighted_combination
from .config import MiLoRAConfig
from .distributed import Factors, InitReport, compute_initial_factors, resolve_device
from .offset import install_offset, install_subtract
from .targets import Target, find_targets, is_partitioned

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
    residual "subtract" writes W_res = W - s B0 A0 (computed in fp32, cast once) into the base weight.
    Only the adapter (and modules_to_save) require grad. Works under torch.distributed / DeepSpeed ZeRO-2/3 with
    each matrix decomposed once; the result carries `milora_config` and `milora_init_report`.
    """
    if not isinstance(config, MiLoRAConfig):
        raise TypeError(f"config must be a MiLoRAConfig, got {type(config).__name__}")
    if isinstance(model, PeftModel):
        raise TypeError("apply_milora takes the base model, not a PeftModel (it adds the adapter itself)")

    with torch.random.fork_rng(devices=[]):  # the same Kaiming draws on every rank for init="lora"
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, peft_lora_config(config), adapter_name=ADAPTER)
    targets = find_targets(peft_model, ADAPTER)

    report = InitReport(total=len(targets))
    if config.init != "lora":
        preflight(targets, config.r)
        factors, report = compute_initial_factors(targets, config)
        set_initial_values(targets, factors, config)
        if config.residual == "subtract":  # W now holds W_res; save_milora needs B0 A0 to rebuild it from W
            peft_model.milora_subtract_factors = {n: (a.cpu(), b.cpu()) for n, (a, b) in factors.items()}
    enable_weighted_combination(peft_model)
    peft_model.milora_config = config
    peft_model.milora_init_report = report
    return peft_model


def preflight(targets: list[Target], r: int) -> None:
    """Shape and dtype checks from metadata alone (ZeRO-3 shards included), identical on every rank, before any
    rank starts gathering or decomposing."""
    for t in targets:
        m, n = t.shape
        if r > min(m, n):
            raise ValueError(f"target '{t.name}' ({m} x {n}): r={r} must satisfy 1 <= r <= min(out, in) = {min(m, n)}")
        dtype = t.weight.dtype
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise TypeError(
                f"target '{t.name}': weight dtype {dtype} is quantised; load the base model in bf16/fp32 for MiLoRA init"
            )


@torch.no_grad()
def set_initial_values(targets: list[Target], factors: Factors, config: MiLoRAConfig) -> None:
    """A, B <- A0, B0 and the chosen residual form on every target."""
    for t in targets:
        A0, B0 = factors[t.name]
        layer = t.layer
        if is_partitioned(layer.lora_A[ADAPTER].weight):
            raise RuntimeError(
                "the LoRA weights are already ZeRO-3 partitioned: call apply_milora before deepspeed.initialize / "
                "Trainer, on the model returned by from_pretrained"
            )
        layer.lora_A[ADAPTER].weight.copy_(A0)
        layer.lora_B[ADAPTER].weight.copy_(B0)
    if config.residual == "offset":
        for t in targets:
            install_offset(t.layer, ADAPTER)
    else:
        subtract_residual(targets, factors, config.scaling)
        for t in targets:  # B0 / A0 kept on the layer for merge and get_delta_weight
            install_subtract(t.layer, ADAPTER, *factors[t.name])


@torch.no_grad()
def subtract_residual(targets: list[Target], factors: Factors, scaling: float, sign: float = -1.0) -> None:
    """W <- W + sign * s B0 A0, computed in fp32 and cast once into the base dtype (the paper's W_res for sign -1).

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
    device = resolve_device("auto", param.data)
    delta = coef * (B0.to(device, torch.float32) @ A0.to(device, torch.float32))
    if t.layer.fan_in_fan_out:
        delta = delta.T
    new = (param.data.to(device, torch.float32) + delta).to(param.dtype)
    param.data.copy_(new.to(param.device))
