"""Worker for tests/milora/test_milora_distributed.py, run by `deepspeed --num_gpus 2` on CPU (gloo).

Scenarios, in order, each writing rank{R}_{name}.safetensors (adapter values) and rank{R}_{name}.json (report):
  replicated   weights on every rank (the ZeRO-2 case): plain from_pretrained, then apply_milora
  zero3        transformers' ZeRO-3 path (HfDeepSpeedConfig -> partitioned weights, as the HF Trainer does);
               also save_milora before and after deepspeed.initialize (adapter partitioned by then)
  zero3_cached ZeRO-3 again with a cache_dir, twice: the second run must be a cache hit
  zero3_subtract  residual="subtract": W_res written into partitioned weights (gathered here for the check)
  fail_*       ZeRO-3 inits where one rank raises (simulated out of memory / LinAlgError / failed cache write or
               fingerprint): rank{R}_{name}.json holds the exception each rank got and whether its model was
               left untouched
  after_failures  a normal ZeRO-3 init after those: the ranks' collectives still line up
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from milora_vlm.milora import MiLoRAConfig, apply_milora, save_milora
from milora_vlm.milora import cache as cache_mod
from milora_vlm.milora import distributed as dist_mod
from milora_vlm.milora.offset import frozen_factors
from milora_vlm.milora.targets import find_targets, full_weight, is_partitioned
from milora_vlm.train.distributed import init_distributed

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}


def dump(peft_model, out: Path, name: str, with_weights: bool = False) -> None:
    rank = dist.get_rank()
    config = peft_model.milora_config
    tensors = {}
    for t in find_targets(peft_model):
        tensors[f"{t.name}.A"] = t.layer.lora_A["default"].weight.detach().clone()
        tensors[f"{t.name}.B"] = t.layer.lora_B["default"].weight.detach().clone()
        if config.residual == "offset":
            A0, B0 = frozen_factors(t.layer, "default")
            tensors[f"{t.name}.A0"], tensors[f"{t.name}.B0"] = A0.clone(), B0.clone()
        if with_weights:
            with full_weight(t) as w:
                tensors[f"{t.name}.W"] = w.detach().clone()
    save_file(tensors, str(out / f"rank{rank}_{name}.safetensors"))
    report = peft_model.milora_init_report
    partitioned = all(is_partitioned(t.weight) for t in find_targets(peft_model))
    info = dict(vars(report), partitioned=partitioned)
    (out / f"rank{rank}_{name}.json").write_text(json.dumps(info))


# name: (failing rank, module, function, failing call number, exception), extra MiLoRAConfig fields
FAILURES = {
    "fail_oom_rank1": (1, dist_mod, "decompose", 1, lambda: torch.OutOfMemoryError("simulated: CUDA out of memory"), {}),
    "fail_linalg_rank0": (0, dist_mod, "decompose", 2, lambda: torch.linalg.LinAlgError("simulated: no convergence"), {}),
    "fail_fingerprint_rank1": (1, cache_mod, "weight_fingerprint", 3, lambda: MemoryError("simulated: host OOM"), {"cache_dir": True}),
    "fail_cache_write_rank0": (0, cache_mod, "save_cached", 1, lambda: RuntimeError("simulated: quota exceeded"), {"cache_dir": True}),
}


def run_failure(args, fields: dict, out: Path, name: str) -> None:
    rank = dist.get_rank()
    failing_rank, module, attr, at_call, make_error, extra = FAILURES[name]
    if extra.get("cache_dir"):
        fields = dict(fields, cache_dir=str(out / f"cache_{name}"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    before = [(n, type(m).__name__) for n, m in model.named_modules()]
    real, calls = getattr(module, attr), []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == at_call:
            raise make_error()
        return real(*a, **kw)

    if rank == failing_rank:
        setattr(module, attr, failing)
    try:
        apply_milora(model, MiLoRAConfig(**fields))
        result = {"type": None, "message": ""}
    except Exception as exc:  # noqa: BLE001  recorded for the test
        result = {"type": type(exc).__name__, "message": str(exc)}
    finally:
        setattr(module, attr, real)
    result["untouched"] = [(n, type(m).__name__) for n, m in model.named_modules()] == before
    (out / f"rank{rank}_{name}.json").write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True, help="MiLoRAConfig fields as JSON")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    fields = json.loads(args.config)

    init_distributed(use_deepspeed=True)  # gloo on CPU, as train_vlm.py

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dump(apply_milora(model, MiLoRAConfig(**fields)), out, "replicated")

    dschf = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841  (must stay alive: from_pretrained then partitions)

    peft_model = apply_milora(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), MiLoRAConfig(**fields))
    dump(peft_model, out, "zero3")
    save_milora(peft_model, out / "adapter")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    deepspeed.initialize(model=peft_model, optimizer=torch.optim.SGD(trainable, lr=0.0), config=DS_CONFIG)
    save_milora(peft_model, out / "adapter_after_initialize")  # adapter partitioned now: gathered to save

    cached = dict(fields, cache_dir=str(out / "cache"))
    for name in ("zero3_cache_miss", "zero3_cache_hit"):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        dump(apply_milora(model, MiLoRAConfig(**cached)), out, name)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dump(apply_milora(model, MiLoRAConfig(**dict(fields, residual="subtract"))), out, "zero3_subtract", with_weights=True)

    for name in FAILURES:
        run_failure(args, fields, out, name)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dump(apply_milora(model, MiLoRAConfig(**fields)), out, "after_failures")


if __name__ == "__main__":
    main()
