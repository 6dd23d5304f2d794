"""Training step time of the real pipeline (`scripts/train_vlm.py` under the deepspeed launcher), per init.

For each (ZeRO config, init/residual) it runs a recipe for --steps steps and prints one JSON line with the
trainer's own measurement (`train_runtime`, which excludes model loading and MiLoRA's decomposition), so the
MiLoRA-vs-LoRA step-time overhead and CPU regressions can be tracked in BENCHMARKS.md.

    python bench/train_step.py                                  # tiny LLaVA recipe, 2 CPU processes
    python bench/train_step.py --config configs/llava15_7b_milora.yaml --num-gpus 1 --steps 20

The tiny recipe builds its own model and data (`bootstrap: tiny`). On CPU, OMP_NUM_THREADS=1 per process.
Runs follow one another, minutes apart, so on a shared machine their ratios carry the load's drift: the
MiLoRA / LoRA step-time ratios come from bench/step_ratio.py, which interleaves the variants in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "lora": ["--adapter.init", "lora"],
    "minor_offset": ["--adapter.init", "minor", "--adapter.residual", "offset"],
    "minor_subtract": ["--adapter.init", "minor", "--adapter.residual", "subtract"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(config: str, zero: str, variant: str, steps: int, num_gpus: int, out_root: str) -> dict:
    out = os.path.join(out_root, f"{os.path.basename(zero)}_{variant}")
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
        "--master_port", str(_free_port()), os.path.join(ROOT, "scripts", "train_vlm.py"),
        "--config", config, "--deepspeed", zero, "--output_dir", out, "--max_steps", str(steps),
        "--save_steps", str(10 * steps), "--logging_steps", "1", "--report_to", "none", *VARIANTS[variant],
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{variant} under {zero} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "trainer_state.json")) as f:
        state = json.load(f)
    final = next(e for e in reversed(state["log_history"]) if "train_runtime" in e)
    return {
        "bench": "train_step", "config": config, "zero": os.path.basename(zero), "variant": variant,
        "steps": steps, "processes": num_gpus, "train_runtime_s": round(final["train_runtime"], 3),
        "s_per_step": round(final["train_runtime"] / steps, 4), "wall_s_including_startup": round(wall, 1),
        "final_loss": state["log_history"][-2].get("loss"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny/llava_milora_zero2.yaml")
    ap.add_argument("--zero", nargs="+", default=["configs/zero2.json", "configs/zero3.json"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--num-gpus", type=int, default=2, help="processes per node (CPU processes when no GPU)")
    ap.add_argument("--out", default=None, help="where runs are written (default: a temporary directory)")
    args = ap.parse_args()
    out_root = args.out or tempfile.mkdtemp(prefix="milora_bench_")
    import platform

    import torch

    for zero in args.zero:
        for variant in args.variants:
            row = run_one(args.config, zero, variant, args.steps, args.num_gpus, out_root)
            row["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
            row["torch"] = torch.__version__
            row["host"] = platform.node()
            row["loadavg_1m"] = round(os.getloadavg()[0], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
