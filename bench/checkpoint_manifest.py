#!/usr/bin/env python
"""What the checkpoint manifest costs: write_manifest (sha256 of every file, the save's last step) and
missing_parts (the re-hash `auto` does before a resume) on a synthetic checkpoint folder, beside a plain read of
the same bytes (what any verification must at least do). Prints one JSON line.

    python bench/checkpoint_manifest.py --mb 256

The folder mimics a 1-process ZeRO-2 checkpoint: most bytes in the optimizer shard (fp32 master weights + Adam
moments of the adapter), the rest in the adapter and model states. The machine's load average is printed, and the
three figures come from the same run, back to back, so their ratios are what to read on a noisy machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path


from milora_vlm.train.checkpoint import missing_parts, write_manifest

RUN = {"world_size": 1, "deepspeed": True, "zero_stage": 2}


def build(path: Path, total_mb: int) -> None:
    sizes = {"global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt": 0.75, "adapter_model.safetensors": 0.125,
             "global_step1/mp_rank_00_model_states.pt": 0.125}
    for name, share in sizes.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        with open(path / name, "wb") as f:
            for _ in range(max(1, int(total_mb * share))):
                f.write(os.urandom(1 << 20))
    for name, text in [("latest", "global_step1"), ("milora_recipe.yaml", "{}"), ("trainer_state.json", "{}"),
                       ("rng_state.pth", "x")]:
        (path / name).write_text(text)


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_all(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as h:
                while h.read(1 << 22):
                    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=256, help="checkpoint size in MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to build the folder (default: a temporary one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckpt = Path(tmp)
        build(ckpt, args.mb)
        read_s = best_of(args.repeats, lambda: read_all(ckpt))
        write_s = best_of(args.repeats, lambda: write_manifest(str(ckpt), RUN, [0]))
        verify_s = best_of(args.repeats, lambda: missing_parts(str(ckpt)))
        assert missing_parts(str(ckpt)) == []
    print(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2), "checkpoint_mib": args.mb,
        "read_s": round(read_s, 3), "write_manifest_s": round(write_s, 3), "verify_s": round(verify_s, 3),
        "manifest_mib_per_s": round(args.mb / write_s, 1), "verify_over_read": round(verify_s / read_s, 2),
    }))


if __name__ == "__main__":
    main()
