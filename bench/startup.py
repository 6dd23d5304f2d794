"""Where a DeepSpeed training run's start-up goes on CPU: imports, the launcher, DeepSpeed's JIT-built op, ZeRO
set-up, model load and MiLoRA's decomposition.

1. imports: `python -c "import X"` in fresh processes (interleaved, median of --repeats), X from a bare interpreter
   to the training pipeline's module;
2. launcher: `deepspeed --num_gpus 2` running an empty script (its own runner and launch processes, both of
   which import deepspeed and torch, before any worker starts), and torchrun (one process importing torch) alike;
3. op: DeepSpeed's CPU all-reduce op (ShareMemCommBuilder), loaded from the torch extensions cache, and with
   --cold-op-build also compiled into an empty cache: what a run would pay at its first start on a machine if it
   let DeepSpeed build the op (milora_vlm.train.distributed.skip_deepspeed_shm_op: it does not);
4. run: the tiny LLaVA ZeRO-2 recipe for one step (`scripts/train_vlm.py --max_steps 1`) under each launcher,
   with the phases rank 0 logs (milora_vlm.train.callbacks.StartupTimes) and the wall time from launch to exit.
   The runs start on an empty torch extensions cache, as on a fresh machine; "ops_built_by_runs" lists what they
   compiled into it.

    python bench/startup.py [--repeats 3] [--cold-op-build] [--zero configs/zero3.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["sys", "torch", "transformers", "peft", "deepspeed", "milora_vlm.train.pipeline"]
OP = ("from deepspeed.accelerator import get_accelerator; "
      "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc


def launcher(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()),
            script, *args]


def torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
            script, *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--zero", default="configs/zero2.json")
    ap.add_argument("--cold-op-build", action="store_true", help="also compile the op into an empty cache (~1 min)")
    args = ap.parse_args()
    load0 = os.getloadavg()
    out: dict = {"bench": "startup", "loadavg_before": [round(x, 2) for x in load0]}

    imports: dict[str, list[float]] = {m: [] for m in MODULES}
    for _ in range(args.repeats):
        for m in MODULES:
            imports[m].append(timed([sys.executable, "-c", f"import {m}"])[0])
    out["import_s"] = {m: round(statistics.median(v), 2) for m, v in imports.items()}

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.py")
        open(empty, "w").close()
        out["launcher_empty_script_s"] = round(statistics.median(timed(launcher(empty))[0] for _ in range(args.repeats)), 2)
        out["torchrun_empty_script_s"] = round(statistics.median(timed(torchrun(empty))[0] for _ in range(args.repeats)), 2)
        out["op_load_cached_s"] = round(timed([sys.executable, "-c", OP])[0], 2)
        if args.cold_op_build:
            out["op_build_cold_s"] = round(timed([sys.executable, "-c", OP], _env(TORCH_EXTENSIONS_DIR=tmp))[0], 2)

        run_dir = os.path.join(tmp, "run")
        recipe = ["--config", "configs/tiny/llava_milora_zero2.yaml", "--deepspeed", args.zero, "--max_steps", "1",
                  "--save_steps", "100", "--report_to", "none",
                  "--model.path", os.path.join(tmp, "llava"), "--data.train_file", os.path.join(tmp, "shapes.jsonl"),
                  "--data.image_folder", os.path.join(tmp, "images")]
        script = os.path.join(ROOT, "scripts", "train_vlm.py")
        cache = os.path.join(tmp, "extensions")
        os.makedirs(cache)
        run_env = _env(TORCH_EXTENSIONS_DIR=cache)
        timed(launcher(script, *recipe, "--output_dir", run_dir), run_env)  # bootstrap: builds the tiny model and data once, warms the caches
        runs: dict[str, list[dict]] = {"deepspeed": [], "torchrun": []}
        for i in range(args.repeats):  # the two launchers interleaved
            for name, launch in (("deepspeed", launcher), ("torchrun", torchrun)):
                wall, proc = timed(launch(script, *recipe, "--output_dir", f"{run_dir}_{name}{i}"), run_env)
                found = re.search(r"start-up seconds: (\{.*\})", proc.stdout + proc.stderr)
                if not found:
                    raise SystemExit("no start-up line in the run's log")
                runs[name].append({"wall_s": round(wall, 2), **json.loads(found.group(1))})
        out["ops_built_by_runs"] = sorted(os.listdir(cache))
    for name, rs in runs.items():
        out[f"run_1_step_{name}"] = {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]}
    out["zero"] = os.path.basename(args.zero)
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
