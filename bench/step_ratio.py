"""MiLoRA / LoRA training-step time ratios, measured interleaved in one process (issue 17.1).

Builds one LLaMA-shaped decoder stack (default: hidden 1024, intermediate 2752, 2 layers, 16 heads, a 256-token
vocabulary so that the stack, not the LM head, dominates), wraps copies of it with a plain PEFT LoRA adapter
(MiLoRAConfig init="lora") and with MiLoRA in both residual forms, all seven projections, r 64, fp32, and times
forward + backward on a batch of 2 x 256 tokens. Every round times each variant once, in a shuffled order, so load
changes on a shared machine hit all of them alike; the ratios are medians (and quartiles) over rounds of
(variant step / LoRA step in the same round), in wall time and in this process's CPU time, with a 95% bootstrap
interval of that median (median_ci95: how precisely the rounds pin it down). A second plain LoRA (lora_control) is
timed like the others: its ratio to LoRA shows how far the machine's noise alone moves a ratio.
The load average is printed before and after.

offset_gemm_estimate: the offset form's frozen path, s B0 A0 x forward and its input gradient backward, is four
GEMMs per adapted matrix that LoRA does not have (x A0^T, (.) B0^T, g B0, (.) A0), whatever the implementation.
Each round also times those GEMMs on their own, at every adapted matrix's shape and the batch's token count;
offset_gemm_estimate = median over rounds of (LoRA step + their time) / LoRA step. Where GEMMs are compute-bound
(the LLaMA-shaped stack) it is about the best an exact offset step can do; on the tiny model, where a step is
mostly per-call overhead, the fused path (fewer, wider calls) can beat it. It is a slight over-estimate: it times
the backward pair for every matrix, which the step skips where the input needs no gradient (the first layer's
q/k/v on frozen embeddings); offset_flop_floor below counts that exactly.

FLOPs, counted exactly (torch's FlopCounterMode over one forward + backward of each variant): `flops` per variant
and `<variant>_flop_ratio` to LoRA's. The counter knows every matmul and the GPU's attention kernels, but not the
CPU's fused sdpa kernel, so CPU rows leave attention out; --count-only (the meta device) counts it.
frozen_path_flops = offset's minus LoRA's, which tests/milora/test_step_cost.py pins to the form's own need
(milora.offset.frozen_path_flops: 2 N r (in + out) forward per adapted matrix, the same again backward where its
input needs a gradient); subtract's ratio is 1.

offset_flop_floor: those frozen FLOPs run at the best rate this machine reaches on this model's own shapes: each
round also times the base layer's GEMM at the largest adapted matrix (N x in @ in x out, the step's most efficient
call) and converts. offset_flop_floor = median over rounds of (LoRA step + frozen FLOPs / that rate) / LoRA step.
An offset step that does LoRA's own part as LoRA does cannot go below it; only doing that part faster can (the
fused path skips LoRA's scaling pass and its `result + ...` pass; its 2r-wide GEMMs do not run at a better rate
than LoRA's r-wide ones on a CPU, BENCHMARKS.md, seventh run).

    python bench/step_ratio.py                      # lora_dropout 0.05 and 0, 20 rounds each
    python bench/step_ratio.py --rounds 40 --dropout 0.05
    python bench/step_ratio.py --variants subtract lora_control --rounds 80   # subtract's ratio, more precisely
    python bench/step_ratio.py --count-only --hidden 4096 --intermediate 11008 --layers 32 --vocab 32000 --seq 2048
                                                    # FLOPs only, on the meta device: LLaMA-2-7B in a few seconds

offset_residual_copy is the offset form with offset_backward 'residual_copy': x's gradient through a kept copy of
W_res = W - s B0 A0 instead of W and the frozen factors, so only the frozen path's forward half is left
(`offset_residual_copy_flop_ratio`), for one more copy of every adapted weight in memory.

The tiny recipe's model: `--model tiny_llava` (milora_vlm.model.tiny, the recipe's LLaVA with its targets).
On a GPU (`--device cuda`, bf16 by default there) every timing synchronises the device and only wall time is
reported (a process's CPU time says nothing about GPU work); bench/gpu_checks.sh runs it at 7B layer shapes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time

import torch

from milora_vlm.milora import MiLoRAConfig, apply_milora
from milora_vlm.milora.offset import MiLoRAOffsetVariant, install_offset, unfused_offset
from milora_vlm.milora.targets import find_targets
from milora_vlm.model.load import resolve_dtype

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# lora_control is a second, identical plain LoRA: its ratio to lora is the measurement's own noise floor.
# offset_unfused computes the offset form through the LoRA modules and autograd (offset.unfused_offset, the
# implementation before the fused _OffsetAdapter and still the ZeRO-3 path), for the before / after comparison.
# offset_residual_copy: the offset form with offset_backward 'residual_copy' (x's gradient through a kept copy of W_res).
VARIANTS = {"lora": {"init": "lora"}, "lora_control": {"init": "lora"}, "offset": {"init": "minor", "residual": "offset"},
            "offset_residual_copy": {"init": "minor", "residual": "offset", "offset_backward": "residual_copy"},
            "offset_unfused": {"init": "minor", "residual": "offset"}, "subtract": {"init": "minor", "residual": "subtract"}}


class _UnfusedOffset(MiLoRAOffsetVariant):
    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        return unfused_offset(module, active_adapter, x, result)


def llama_stack(hidden: int, intermediate: int, layers: int, vocab: int, seed: int = 0, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                      max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):  # "meta": shapes only (--count-only), no memory and no initialisation
        return LlamaForCausalLM(cfg).float()


def tiny_llava():
    """The tiny recipe's LLaVA (bootstrap: tiny builds the same architecture: hidden 64, 2 layers, CLIP 32 px)."""
    from milora_vlm.model.tiny import build_tiny_llava, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer([f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square")],
                                     vocab_size=400)
    return build_tiny_llava(tokenizer)[0].float()


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(). CPU time (this process, one thread) is far less disturbed by other jobs on a
    shared machine than wall time; on a GPU the device is synchronised around fn and only the wall time counts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


def step(model, inputs) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + backward."""

    def run():
        model(**inputs, labels=inputs["input_ids"]).loss.backward()

    elapsed = timed(run, inputs["input_ids"].device)
    model.zero_grad(set_to_none=True)
    return elapsed


def frozen_path_gemms(model, r: int, tokens: int):
    """A function running the four GEMMs of the offset form's frozen path at every adapted matrix's shape, timed
    like a step: (wall, CPU) seconds."""
    g = torch.Generator().manual_seed(0)
    device, dtype = _place(model)
    operands = []
    for t in find_targets(model):
        out, inp = t.shape
        operands.append([torch.randn(*shape, generator=g).to(device, dtype)
                         for shape in ((tokens, inp), (r, inp), (out, r), (tokens, out))])

    def gemms():
        for x, A0, B0, gy in operands:
            (x @ A0.T) @ B0.T  # forward: s B0 A0 x (the scaling is folded into the small matrices)
            (gy @ B0) @ A0  # backward: the input gradient through the frozen path

    return lambda: timed(gemms, device)


def _place(model) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's adapted weights (what the GEMMs above run in)."""
    weight = find_targets(model)[0].weight
    return weight.device, weight.dtype


def counted_flops(model, inputs) -> int:
    """FLOPs of one forward + backward as FlopCounterMode counts them: exact, for matmuls and the attention kernels
    it has a formula for (not the CPU's fused sdpa)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_gemm(model, tokens: int):
    """A function timing the base layer's GEMM at the largest adapted matrix: (wall, CPU) seconds, and its FLOPs."""
    g = torch.Generator().manual_seed(1)
    device, dtype = _place(model)
    out, inp = max((t.shape for t in find_targets(model)), key=lambda s: s[0] * s[1])
    x, w = (torch.randn(*shape, generator=g).to(device, dtype) for shape in ((tokens, inp), (out, inp)))
    return (lambda: timed(lambda: x @ w.T, device)), 2 * tokens * inp * out


def count_flops(base, targets, r: int, dropout: float, inputs) -> dict:
    """LoRA's and the offset form's counted FLOPs, without an SVD: --count-only runs it on a meta-device model (any
    size in a second), measure() on the real one when the offset form is not among the timed variants.

    The offset layers get A0, B0 = their current A, B (install_offset's default) instead of SVD factors, and W
    itself as the residual copy, which a meta tensor has no values for; what a step computes does not depend on
    those values. Subtract is not counted:
    it dispatches LoRA's ops one for one (tests/milora/test_step_cost.py).
    """
    flops = {}
    for name in ("lora", "offset", "offset_residual_copy"):
        cfg = MiLoRAConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=dropout, init="lora")
        model = apply_milora(copy.deepcopy(base), cfg).train()
        for t in find_targets(model) if name != "lora" else ():
            install_offset(t.layer, "default", W_res=t.weight.detach() if name == "offset_residual_copy" else None)
        flops[name] = counted_flops(model, inputs)
    return {"lora_dropout": dropout, "flops": flops, "frozen_path_flops": flops["offset"] - flops["lora"],
            **{f"{name}_flop_ratio": round(flops[name] / flops["lora"], 5) for name in ("offset", "offset_residual_copy")}}


def median_ci(values: list[float], resamples: int = 2000) -> list[float]:
    """95% bootstrap interval of the median (seeded): how precisely the rounds pin the median ratio down."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [round(medians[int(0.025 * resamples)], 4), round(medians[int(0.975 * resamples) - 1], 4)]


def measure(base, targets, r: int, dropout: float, inputs, rounds: int, warmup: int,
            variants: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    """Ratios to "lora" (always timed) of each variant in `variants`, plus the frozen path's estimate and floor."""
    def build(name: str):
        cfg = MiLoRAConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=dropout, **VARIANTS[name])
        model = apply_milora(copy.deepcopy(base), cfg).train()
        if name == "offset_unfused":
            for t in find_targets(model):
                t.layer.lora_variant["default"] = _UnfusedOffset()
        return model

    models = {name: build(name) for name in VARIANTS if name == "lora" or name in variants}
    flops = {name: counted_flops(m, inputs) for name, m in models.items()}
    # the floor needs the offset form's FLOPs even when it is not timed: counted without its minutes-long SVD init
    if "offset" in flops:
        offset_flops = flops["offset"]
    else:
        offset_flops = count_flops(base, targets, r, dropout, inputs)["flops"]["offset"]
    frozen_flops = offset_flops - flops["lora"]
    runners = {name: (lambda m=m: step(m, inputs)) for name, m in models.items()}
    tokens = int(inputs["input_ids"].numel())
    runners["frozen_path_gemms"] = frozen_path_gemms(models["lora"], r, tokens)
    runners["peak_gemm"], peak_flops = peak_gemm(models["lora"], tokens)
    for _ in range(warmup):
        for run in runners.values():
            run()
    times = {name: [] for name in runners}
    order = random.Random(0)
    for _ in range(rounds):
        names = list(runners)
        order.shuffle(names)  # no variant always runs right after the same other one
        for name in names:
            times[name].append(runners[name]())
    out = {"lora_dropout": dropout, "flops": flops, "frozen_path_flops": frozen_flops}
    out.update({f"{name}_flop_ratio": round(f / flops["lora"], 5) for name, f in flops.items() if name != "lora"})
    clocks = (("wall", 0),) if inputs["input_ids"].device.type == "cuda" else (("wall", 0), ("cpu", 1))
    for clock, i in clocks:
        lora = [t[i] for t in times["lora"]]
        out[f"lora_median_{clock}_s"] = round(statistics.median(lora), 4)
        for name in models:
            if name == "lora":
                continue
            ratios = [t[i] / l for t, l in zip(times[name], lora)]
            q = statistics.quantiles(ratios, n=4)
            out[f"{name}_ratio_{clock}"] = {"median": round(statistics.median(ratios), 4),
                                            "iqr": [round(q[0], 4), round(q[2], 4)], "median_ci95": median_ci(ratios)}
        estimates = [(l + t[i]) / l for t, l in zip(times["frozen_path_gemms"], lora)]
        out[f"offset_gemm_estimate_{clock}"] = round(statistics.median(estimates), 4)
        rates = [peak_flops / t[i] for t in times["peak_gemm"]]
        floors = [(l + frozen_flops / rate) / l for rate, l in zip(rates, lora)]
        out[f"peak_gemm_gflops_{clock}"] = round(statistics.median(rates) / 1e9, 1)
        out[f"offset_flop_floor_{clock}"] = round(statistics.median(floors), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["llama_stack", "tiny_llava"], default="llama_stack")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2752)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--r", type=int, default=None, help="default 64 (llama_stack), 8 (tiny_llava: the recipe's)")
    ap.add_argument("--batch", type=int, default=None, help="default 2 (llama_stack), 4 (tiny_llava)")
    ap.add_argument("--seq", type=int, default=None, help="default 256 (llama_stack), 128 (tiny_llava)")
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.05, 0.0])
    ap.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "lora"],
                    default=[v for v in VARIANTS if v != "lora"], help="timed against lora (always timed); fewer "
                    "variants give more rounds in the same time, e.g. --variants subtract lora_control --rounds 60")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="fp32, bf16, fp16 or auto (bf16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--count-only", action="store_true", help="no timing: LoRA's and the offset form's FLOPs, "
                    "counted on the meta device (any size, e.g. LLaMA-2-7B: --layers 32 --vocab 32000 --seq 2048)")
    args = ap.parse_args()
    if args.count_only and args.model != "llama_stack":
        ap.error("--count-only counts the llama_stack (a LLaVA forward needs real values to place image features); "
                 "the tiny model's FLOPs are in every timed row ('flops')")
    torch.set_num_threads(args.threads)
    device = torch.device("meta" if args.count_only else args.device)
    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as e:
        ap.error(str(e))
    tiny = args.model == "tiny_llava"
    args.r = args.r or (8 if tiny else 64)
    args.batch = args.batch or (4 if tiny else 2)
    args.seq = args.seq or (128 if tiny else 256)
    print(json.dumps({"host": platform.node(), "cpus": os.cpu_count(), "threads": args.threads,
                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                      "dtype": str(dtype), "torch": torch.__version__, "loadavg_before": os.getloadavg()}), flush=True)

    g = torch.Generator().manual_seed(0)
    if args.model == "llama_stack":
        base = llama_stack(args.hidden, args.intermediate, args.layers, args.vocab, device=device.type)
        targets = PROJECTIONS
        inputs = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)}
        shape = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "vocab": args.vocab}
    else:
        base = tiny_llava()
        targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        cfg = base.config
        text = torch.randint(10, cfg.text_config.vocab_size, (args.batch, args.seq), generator=g)
        text[:, 1 : 1 + cfg.image_seq_length] = cfg.image_token_index
        size = cfg.vision_config.image_size
        inputs = {"input_ids": text, "pixel_values": torch.randn(args.batch, 3, size, size, generator=g)}
        shape = {"model": "tiny_llava"}
    base = base.to(device, dtype)
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    for p in base.parameters():
        p.requires_grad_(False)
    for dropout in args.dropout:
        if args.count_only:
            row = count_flops(base, targets, args.r, dropout, inputs)
        else:
            row = measure(base, targets, args.r, dropout, inputs, args.rounds, args.warmup, tuple(args.variants))
            row.update(rounds=args.rounds, loadavg=[round(x, 2) for x in os.getloadavg()])
        row.update(shape, r=args.r, batch=args.batch, seq=args.seq, dtype=str(dtype))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
