#!/usr/bin/env python
"""MiLoRA init cost: the reference way (torch.linalg.svd fp32, one matrix at a time) against minor_factors' fast
route, on LLaMA-2-7B target shapes, plus the accuracy of both against an fp64 SVD. Prints one JSON line.

Defaults are LLaMA-2-7B (hidden 4096, intermediate 11008, 32 layers, q,k,v,up,down, r 64) for an H100:
    python bench/init_speed.py --device cuda
    python bench/init_speed.py --device cuda --apply        # also time apply_milora on a built Llama of these shapes
On a CPU, scale it down:
    python bench/init_speed.py --device cpu --layers 1 --scale 4

The matrices have a known log-spaced spectrum (condition number --cond) in random orthonormal bases: timings do not
depend on the spectrum, accuracy does, and random Gaussian matrices would have near-zero, near-degenerate minor
singular values (an ill-posed subspace) unlike trained weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time

import torch

from milora_vlm.milora import MiLoRAConfig, apply_milora, minor_factors
from milora_vlm.milora.decompose import resolve_method


def target_shapes(hidden: int, inter: int, targets: list[str]) -> list[tuple[str, tuple[int, int]]]:
    table = {
        "q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
        "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter),
    }  # fmt: skip
    return [(t, table[t]) for t in targets]


def make_weight(shape, cond: float, bases: dict, device, gen) -> torch.Tensor:
    """(U * S) @ V^T with S log-spaced from 1 to 1/cond (2% jitter, re-sorted) and per-shape random bases."""
    m, n = shape
    k = min(m, n)
    if shape not in bases:
        U, _ = torch.linalg.qr(torch.randn(m, k, device=device, generator=gen))
        V, _ = torch.linalg.qr(torch.randn(n, k, device=device, generator=gen))
        bases[shape] = (U, V)
    U, V = bases[shape]
    S = torch.logspace(0, -math.log10(cond), k, device=device)
    S = torch.sort(S * (1 + 0.02 * torch.rand(k, device=device, generator=gen)), descending=True).values
    return ((U * S) @ V.T).contiguous()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's code's way: full fp32 SVD, keep the last r triplets (alpha = r, scaling 1)."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    root = S[-r:].sqrt()
    return root[:, None] * Vh[-r:], U[:, -r:] * root


def max_angle(X: torch.Tensor, Y: torch.Tensor) -> float:
    qx, _ = torch.linalg.qr(X.double())
    qy, _ = torch.linalg.qr(Y.double())
    return float(torch.arccos(torch.linalg.svdvals(qx.T @ qy).clamp(max=1.0).min()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--scale", type=int, default=1, help="divide hidden and intermediate by this")
    p.add_argument("--targets", default="q,k,v,up,down")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--cond", type=float, default=1e3, help="condition number of the synthetic weights")
    p.add_argument("--method", default="auto", help="minor_factors route to time against the reference")
    p.add_argument("--weight-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                   help="angles vs an fp64 SVD, one matrix per distinct shape")  # fmt: skip
    p.add_argument("--apply", action="store_true", help="also time apply_milora on a Llama of these shapes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = torch.device(args.device)
    hidden, inter = args.hidden // args.scale, args.intermediate // args.scale
    dtype = getattr(torch, args.weight_dtype)
    shapes = target_shapes(hidden, inter, args.targets.split(","))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    bases: dict = {}
    route = {f"{m}x{n}": resolve_method(args.method, (m, n), device) for _, (m, n) in shapes}

    for _, shape in shapes:  # warm-up per shape (cuSOLVER handles, workspaces), not timed
        W = make_weight(shape, args.cond, bases, device, gen).to(dtype)
        reference_svd(W, args.r)
        minor_factors(W, args.r, method=args.method)
    sync(device)

    times = {"reference_svd": {}, "minor_factors": {}}
    accuracy = {}
    for layer in range(args.layers):
        for name, shape in shapes:
            W = make_weight(shape, args.cond, bases, device, gen).to(dtype)
            key = f"{shape[0]}x{shape[1]}"
            for label, fn in (("reference_svd", lambda: reference_svd(W, args.r)),
                              ("minor_factors", lambda: minor_factors(W, args.r, method=args.method))):  # fmt: skip
                sync(device)
                t0 = time.perf_counter()
                A, B = fn()
                sync(device)
                times[label].setdefault(key, []).append(time.perf_counter() - t0)
                if args.accuracy and layer == 0 and key not in accuracy.get(label, {}):
                    _, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
                    U = _left(W, Vh, args.r)
                    accuracy.setdefault(label, {})[key] = {
                        "max_angle_V": max_angle(A.T, Vh[-args.r :].T),
                        "max_angle_U": max_angle(B, U),
                    }

    summary = {}
    for label, per in times.items():
        total = sum(sum(v) for v in per.values())
        summary[label] = {
            "total_s": round(total, 4),
            "per_matrix_median_s": {k: round(statistics.median(v), 5) for k, v in per.items()},
            "matrices": sum(len(v) for v in per.values()),
        }
    result = {
        "bench": "init_speed",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "settings": {
            "layers": args.layers, "hidden": hidden, "intermediate": inter, "targets": args.targets, "r": args.r,
            "cond": args.cond, "weight_dtype": args.weight_dtype, "method": args.method, "route": route,
        },  # fmt: skip
        **summary,
        "speedup": round(summary["reference_svd"]["total_s"] / summary["minor_factors"]["total_s"], 2),
    }
    if args.accuracy:
        result["accuracy_vs_fp64_svd_rad"] = accuracy
    if args.apply:
        result["apply_milora"] = time_apply(args, hidden, inter, dtype, device)
    print(json.dumps(result))


def _left(W: torch.Tensor, Vh: torch.Tensor, r: int) -> torch.Tensor:
    """Left singular vectors of the minor part from the fp64 right ones (exact in fp64 for this spectrum)."""
    Y = W.double() @ Vh[-r:].T
    return Y / Y.norm(dim=0)


def time_apply(args, hidden: int, inter: int, dtype, device) -> dict:
    """apply_milora end to end on a LlamaForCausalLM with these shapes (random weights, small vocab)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=args.layers,
        num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
    )  # fmt: skip
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    config = MiLoRAConfig(r=args.r, lora_alpha=args.r, target_modules=[names[t] for t in args.targets.split(",")], method=args.method)
    sync(device)
    t0 = time.perf_counter()
    peft_model = apply_milora(model, config)
    sync(device)
    report = peft_model.milora_init_report
    return {"total_s": round(time.perf_counter() - t0, 3), "matrices": report.total, "decompose_s": round(report.seconds, 3)}


if __name__ == "__main__":
    main()
