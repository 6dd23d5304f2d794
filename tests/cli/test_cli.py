"""The command-line tools: every console script in pyproject.toml resolves to a callable in the package, each
wrapper file under data_prep/, eval/, scripts/ runs that same main(), and every script's --help exits 0 when
run as `python <file>` from another directory (no sys.path tricks: the installed package is imported)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, load_script

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

SCRIPTS = sorted(p.relative_to(REPO).as_posix() for d in ("data_prep", "eval", "scripts")
                 for p in (REPO / d).glob("*.py"))
# Scripts whose --help imports torch, transformers, PEFT or DeepSpeed (seconds each on a 2-core box): checked in
# one interpreter, in the slow lane. The others each start their own interpreter in the quick lane.
HEAVY = {"eval/generate.py", "scripts/analyze_subspace.py", "scripts/compare_inits.py", "scripts/build_llava.py",
         "scripts/export_adapter.py", "scripts/train_vlm.py", "scripts/build_demo_base.py"}


def console_scripts() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def resolve(target: str):
    module, _, attr = target.partition(":")
    return importlib.import_module(module), getattr(importlib.import_module(module), attr)


def load_file(rel: str):
    module = load_script(rel, "wrapper_" + rel.replace("/", "_")[:-3])
    return module


def test_console_scripts_resolve_to_callables():
    scripts = console_scripts()
    assert {"milora-score", "milora-generate", "milora-analyze", "milora-compare-inits", "milora-build-llava",
            "milora-prep-commonsense", "milora-prep-metamath", "milora-prep-easyvqa", "milora-prep-llava",
            "milora-prep-vqa", "milora-export"} <= set(scripts)
    for name, target in scripts.items():
        module, func = resolve(target)
        assert callable(func), f"{name} = {target!r} is not callable"
        assert module.__name__.startswith("milora_vlm.cli."), f"{name}: tools live in milora_vlm/cli/"
        # the console script's exit status: main() itself, or an entry() that calls main and returns 0
        assert func is module.main or func is getattr(module, "entry", None), f"{name}: {target!r} is not main / entry"


def test_each_tool_has_a_wrapper_that_runs_its_main():
    wrapped = {}
    for rel in SCRIPTS:
        text = (REPO / rel).read_text(encoding="utf-8")
        assert "sys.path.insert" not in text, f"{rel}: the installed package is imported, not a path hack"
        if "from milora_vlm.cli." in text:
            wrapped[rel] = load_file(rel)
    tools = {target.partition(":")[0] for target in console_scripts().values()}
    by_module = {m.main.__module__: rel for rel, m in wrapped.items()}
    assert set(by_module) == tools, "every tool has exactly one python-file wrapper, and every wrapper a tool"
    for rel, module in wrapped.items():
        assert module.main is importlib.import_module(module.main.__module__).main, rel


def run_help(rel: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # from another directory: a wrapper must not depend on the working directory either
    return subprocess.run([sys.executable, str(REPO / rel), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("rel", [s for s in SCRIPTS if s not in HEAVY])
def test_help_exits_zero(rel, tmp_path):
    proc = run_help(rel, tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout, f"{rel}: rc {proc.returncode}\n{proc.stderr[-2000:]}"


@pytest.mark.slow
def test_help_of_heavy_scripts_exits_zero(tmp_path):
    """One interpreter runs each heavy script as `python <file> --help` would (its folder first on sys.path)."""
    code = (
        "import runpy, sys, os\n"
        "bad = []\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv, saved = [path, '--help'], list(sys.path)\n"
        "    sys.path.insert(0, os.path.dirname(path))\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "        bad.append(f'{path}: no exit')\n"
        "    except SystemExit as e:\n"
        "        if e.code not in (0, None):\n"
        "            bad.append(f'{path}: exit {e.code}')\n"
        "    finally:\n"
        "        sys.path[:] = saved\n"
        "print('BAD', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    heavy = [str(REPO / rel) for rel in sorted(HEAVY)]
    assert set(HEAVY) <= set(SCRIPTS)
    proc = subprocess.run([sys.executable, "-c", code, *heavy], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("usage:") == len(heavy), proc.stdout[-3000:]


def test_no_path_hacks_in_benchmarks():
    """bench/ scripts import the installed package too (a sys.path hack would hide a missing install)."""
    for p in sorted((REPO / "bench").glob("*.py")):
        assert "sys.path.insert" not in p.read_text(encoding="utf-8"), f"{p.relative_to(REPO)}: no path hack"


def test_step_ratio_bench_measures_every_variant_and_the_frozen_path_estimate():
    """bench/step_ratio.py on a small stack: a ratio with quartiles per variant and clock, and the frozen path's
    GEMM estimate and FLOP floor above 1 (those GEMMs take time on top of a LoRA step)."""
    import torch

    bench = load_script("bench/step_ratio.py", "bench_step_ratio")
    base = bench.llama_stack(hidden=64, intermediate=128, layers=1, vocab=64)
    for p in base.parameters():
        p.requires_grad_(False)
    inputs = {"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))}
    row = bench.measure(base, bench.PROJECTIONS, r=4, dropout=0.05, inputs=inputs, rounds=4, warmup=1)
    for clock in ("wall", "cpu"):
        assert row[f"lora_median_{clock}_s"] > 0
        for name in ("offset", "offset_residual_copy", "offset_unfused", "subtract", "lora_control"):
            ratio = row[f"{name}_ratio_{clock}"]
            assert ratio["median"] > 0 and ratio["iqr"][0] <= ratio["iqr"][1]
            assert ratio["median_ci95"][0] <= ratio["median"] <= ratio["median_ci95"][1]
        assert row[f"offset_gemm_estimate_{clock}"] > 1
        assert row[f"offset_flop_floor_{clock}"] > 1 and row[f"peak_gemm_gflops_{clock}"] > 0
    # 2 N r (in + out) forward per matrix (q, k, v, o are 64 x 64, gate and up 128 x 64, down 64 x 128), and as
    # much again backward except for q, k, v, whose input (the normed embeddings) needs no gradient
    assert row["frozen_path_flops"] == 2 * 32 * 4 * (4 * 128 + 3 * 192) + 2 * 32 * 4 * (128 + 3 * 192)
    assert row["subtract_flop_ratio"] == row["lora_control_flop_ratio"] == 1
    assert row["offset_flop_ratio"] == row["offset_unfused_flop_ratio"] > 1
    # residual_copy: the frozen path's forward half only
    assert row["flops"]["offset_residual_copy"] - row["flops"]["lora"] == 2 * 32 * 4 * (4 * 128 + 3 * 192)
    only = bench.measure(base, bench.PROJECTIONS, r=4, dropout=0.0, inputs=inputs, rounds=3, warmup=1,
                         variants=("subtract",))
    assert {k for k in only if k.endswith("_ratio_cpu")} == {"subtract_ratio_cpu"}  # lora is the reference
    # offset not timed: its FLOPs for the floor are counted on an SVD-free copy, and come out the same
    assert only["frozen_path_flops"] == row["frozen_path_flops"]


def test_step_ratio_count_only_counts_on_the_meta_device():
    """--count-only: LoRA's and the offset form's FLOPs on a meta-device stack (no values, no memory). Its frozen
    path equals the timed rows' (real SVD factors, CPU) and the form's own need; attention, which the CPU's sdpa
    kernel leaves uncounted, is counted on meta, so LoRA's count is the larger there."""
    import torch

    bench = load_script("bench/step_ratio.py", "bench_step_ratio")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    meta = bench.llama_stack(hidden=64, intermediate=128, layers=1, vocab=64, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    row = bench.count_flops(meta, bench.PROJECTIONS, r=4, dropout=0.05, inputs={"input_ids": ids.to("meta")})
    real = bench.llama_stack(hidden=64, intermediate=128, layers=1, vocab=64)
    timed = bench.measure(real, bench.PROJECTIONS, r=4, dropout=0.05, inputs={"input_ids": ids}, rounds=2,
                          warmup=0, variants=("offset",))
    assert row["frozen_path_flops"] == timed["frozen_path_flops"] > 0
    assert row["flops"]["lora"] > timed["flops"]["lora"]
    assert row["offset_flop_ratio"] == round(row["flops"]["offset"] / row["flops"]["lora"], 5) > 1
    # the residual copy leaves the forward half of the frozen path: 2 N r (in + out) on each of the seven matrices
    assert row["flops"]["offset_residual_copy"] - row["flops"]["lora"] == 2 * 32 * 4 * (4 * 128 + 3 * 192)


def test_median_ci_brackets_the_median_and_narrows_with_more_rounds():
    import random
    import statistics

    bench = load_script("bench/step_ratio.py", "bench_step_ratio")
    rng = random.Random(1)
    few, many = ([1 + rng.gauss(0, 0.05) for _ in range(n)] for n in (10, 200))
    lo, hi = bench.median_ci(few)
    lo2, hi2 = bench.median_ci(many)
    assert lo <= statistics.median(few) <= hi and hi2 - lo2 < hi - lo and lo2 < 1 < hi2


@pytest.mark.slow
def test_gpu_checks_script_runs_both_benchmarks_end_to_end(tmp_path):
    """bench/gpu_checks.sh, the one command prepared for a lent GPU, at tiny sizes on the CPU: it writes the machine
    line, both step-ratio tables (lora_dropout 0.05 and 0), the r-128 row (r 8 at these sizes) and the packing
    table with all four layouts."""
    import json

    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "GPU_CHECKS_SMALL": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu_checks.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torch" in (out / "machine.txt").read_text()
    for name in ("step_ratio_7b_layers", "step_ratio_stack"):
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert rows[0]["device"] == "cpu" and rows[0]["dtype"] == "torch.bfloat16"
        assert [r["lora_dropout"] for r in rows[1:]] == [0.05, 0.0]
        assert all(r["offset_ratio_wall"]["median"] > 0 and r["offset_flop_floor_wall"] > 1 for r in rows[1:])
    rows = [json.loads(line) for line in (out / "step_ratio_7b_layers_r128.jsonl").read_text().splitlines()]
    assert [(r["lora_dropout"], r["r"], set(r["flops"])) for r in rows[1:]] == [
        (0.05, 8, {"lora", "offset", "offset_residual_copy"})]
    rows = [json.loads(line) for line in (out / "packing.jsonl").read_text().splitlines()]
    assert [r.get("layout") for r in rows[:4]] == ["padded", "padded+grouped", "packed", "packed+mask"]
    assert rows[2]["useful_fraction"] == 1.0 and rows[0]["useful_fraction"] < 1.0
    assert rows[4]["dtype"] == "torch.bfloat16" and rows[4]["packed_vs_padded_tokens_per_s"] > 0


@pytest.mark.slow
def test_benchmarks_refuse_an_unknown_dtype_by_name():
    for rel in ("bench/step_ratio.py", "bench/packing.py"):
        proc = subprocess.run([sys.executable, rel, "--dtype", "fp8"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and "unknown dtype 'fp8'" in proc.stderr, (rel, proc.stderr[-2000:])
    proc = subprocess.run([sys.executable, "bench/step_ratio.py", "--count-only", "--model", "tiny_llava"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--count-only counts the llama_stack" in proc.stderr, proc.stderr[-2000:]


def test_build_llava_missing_local_paths_are_usage_errors(tmp_path, capsys):
    """A mistyped local path is named at once (exit 2), not a hub lookup that ends in a connection error."""
    from milora_vlm.cli.build_llava import main

    with pytest.raises(SystemExit) as e:
        main(["--language-model", "nope", "--vision-tower", "nope2", "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "--language-model nope: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, words", [(["--replay", "5"], "--replay must be a fraction in [0, 1], got 5.0"),
                                          (["--replay", "nan"], "--replay must be a fraction"),
                                          ([], "is a file; give a folder")],
                         ids=["replay-5", "replay-nan", "output-file"])
def test_prep_easyvqa_refuses_bad_arguments_before_converting(tmp_path, monkeypatch, capsys, extra, words):
    import milora_vlm.cli.prep_easyvqa as prep

    monkeypatch.setattr(prep, "convert", lambda *a, **k: pytest.fail("convert ran despite bad arguments"))
    output = tmp_path / "out"
    if not extra:
        output.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as e:
        prep.main(["--output", str(output), *extra])
    assert e.value.code == 2 and words in capsys.readouterr().err
