#!/usr/bin/env python
"""Cost of the MiLoRA cache fingerprint (sha256 of every byte of a weight) on one LLaMA-2-7B MLP matrix
(4096 x 11008, bf16), against decomposing the same matrix (what a cache hit saves). Prints one JSON line.

    python bench/fingerprint_speed.py                 # CPU, with one decomposition for the ratio
    python bench/fingerprint_speed.py --no-decompose  # fingerprint only
    python bench/fingerprint_speed.py --device cuda   # a GPU weight: copied to the host a block at a time

The alternatives hashlib offers are timed on the same bytes, so the choice of sha256 can be checked on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import statistics
import time

import torch

from milora_vlm.milora.cache import weight_fingerprint
from milora_vlm.milora.decompose import decompose


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=int, default=11008)
    p.add_argument("--inp", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--no-decompose", action="store_true")
    args = p.parse_args()

    w = torch.randn(args.out, args.inp, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(args.device)
    nbytes = w.numel() * w.element_size()
    host = w.cpu().view(torch.uint8).numpy()
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "load_average": os.getloadavg(),
        "shape": [args.out, args.inp],
        "dtype": "bfloat16",
        "device": args.device,
        "megabytes": round(nbytes / 1e6, 1),
        "fingerprint_s": round(median_seconds(lambda: weight_fingerprint(w), args.repeats), 4),
    }
    for name in ("blake2b", "sha1"):  # the same bytes, already on the host: hashing alone
        result[f"{name}_only_s"] = round(median_seconds(lambda: hashlib.new(name, host).digest(), args.repeats), 4)
    result["sha256_only_s"] = round(median_seconds(lambda: hashlib.sha256(host).digest(), args.repeats), 4)
    result["fingerprint_GB_per_s"] = round(nbytes / result["fingerprint_s"] / 1e9, 2)
    if not args.no_decompose:
        t0 = time.perf_counter()
        d = decompose(w, args.r, 1.0, "minor", "auto", None)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        result[f"decompose_{d.route}_r{args.r}_s"] = round(time.perf_counter() - t0, 2)
        result["fingerprint_over_decompose"] = round(result["fingerprint_s"] / result[f"decompose_{d.route}_r{args.r}_s"], 5)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
