"""MiLoRA init under torch.distributed: each matrix decomposed once, factors identical on every rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from milora_vlm.milora import MiLoRAConfig, apply_milora, load_milora
from milora_vlm.milora.distributed import WAVE_PER_RANK, plan_waves
from milora_vlm.milora.targets import find_targets
from tests.helpers import REPO

FIELDS = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def test_plan_waves_bounds_what_a_rank_holds_and_balances_work():
    # LLaMA-7B: 32 layers of q, k, v, o (4096^2) and gate, up, down (4096 x 11008), cost ~ m n min(m, n)
    layer = [4096**3] * 4 + [4096 * 4096 * 11008] * 3
    costs = layer * 32
    for world_size in (1, 2, 8):
        waves = plan_waves(costs, world_size)
        assert plan_waves(costs, world_size) == waves  # deterministic: every rank computes the same plan
        assert sorted(i for wave in waves for i, _ in wave) == list(range(len(costs)))  # each matrix once
        for wave in waves:  # ZeRO-3 peak: a rank owns (so holds a full copy of) one matrix per wave
            owners = [o for _, o in wave]
            assert len(owners) == len(set(owners)) <= world_size
        # waves run one after the other: wall ~ sum of each wave's slowest rank, within 5% of perfect division
        wall = sum(max(costs[i] for i, _ in wave) for wave in waves)
        assert wall <= 1.05 * sum(costs) / world_size + max(costs)
    two = plan_waves(costs, 2, per_rank=3)
    assert all(max([o for _, o in w].count(r) for r in range(2)) <= 3 for w in two)
    loads = [sum(costs[i] for w in two for i, o in w if o == r) for r in range(2)]
    assert max(loads) / min(loads) < 1.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory, tiny_causal_lm_dir):
    if shutil.which("deepspeed") is None:
        pytest.fail("the deepspeed launcher is not on PATH (activate the project's virtual environment)")
    out = tmp_path_factory.mktemp("dist_milora")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()),
        str(REPO / "tests" / "helpers" / "dist_milora.py"),
        "--model", str(tiny_causal_lm_dir), "--out", str(out), "--config", json.dumps(FIELDS),
    ]  # fmt: skip
    # own process group, so that a hung run (ranks waiting on each other) is killed whole
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("the 2-process MiLoRA run hung (killed after 300 s):\n" + stdout[-3000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
    return out


def _rank(out: Path, rank: int, name: str):
    return load_file(str(out / f"rank{rank}_{name}.safetensors")), json.loads((out / f"rank{rank}_{name}.json").read_text())


@pytest.fixture(scope="module")
def single(tiny_causal_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float32)
    return apply_milora(model, MiLoRAConfig(**FIELDS))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["replicated", "zero3"])
def test_ranks_identical_each_matrix_once_and_equal_single_process(dist_run, single, scenario):
    (t0, r0), (t1, r1) = _rank(dist_run, 0, scenario), _rank(dist_run, 1, scenario)
    assert set(t0) == set(t1)
    for key in t0:
        assert torch.equal(t0[key], t1[key]), f"{scenario}: {key} differs between ranks"
    assert r0["partitioned"] is (scenario == "zero3") and r1["partitioned"] is (scenario == "zero3")
    names = [t.name for t in find_targets(single)]
    # every matrix decomposed exactly once across the two ranks, and both ranks did work
    assert sorted(r0["decomposed_names"] + r1["decomposed_names"]) == sorted(names)
    assert r0["decomposed_here"] > 0 and r1["decomposed_here"] > 0
    assert r0["world_size"] == 2
    assert r0["matrices"] == r1["matrices"] and r0["matrices"].keys() == set(names)  # same init report everywhere
    for t in find_targets(single):
        A, B = t.layer.lora_A["default"].weight, t.layer.lora_B["default"].weight
        torch.testing.assert_close(t0[f"{t.name}.A"], A, rtol=0, atol=1e-6)
        torch.testing.assert_close(t0[f"{t.name}.B"], B, rtol=0, atol=1e-6)
        assert torch.equal(t0[f"{t.name}.A0"], t0[f"{t.name}.A"])


@pytest.mark.slow
def test_zero3_cache_hit_skips_decomposition(dist_run):
    for rank in (0, 1):
        miss_t, miss = _rank(dist_run, rank, "zero3_cache_miss")
        hit_t, hit = _rank(dist_run, rank, "zero3_cache_hit")
        assert miss["cache"].startswith("miss") and miss["decomposed_here"] > 0
        assert hit["cache"] == "hit" and hit["decomposed_here"] == 0
        assert all(torch.equal(miss_t[k], hit_t[k]) for k in miss_t)


@pytest.mark.slow
def test_zero3_subtract_writes_w_res(dist_run, tiny_causal_lm_dir):
    from transformers import AutoModelForCausalLM

    t0, _ = _rank(dist_run, 0, "zero3_subtract")
    t1, _ = _rank(dist_run, 1, "zero3_subtract")
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float32)
    ref = apply_milora(model, MiLoRAConfig(**FIELDS, residual="subtract"))
    for t in find_targets(ref):
        assert torch.equal(t0[f"{t.name}.W"], t1[f"{t.name}.W"])
        torch.testing.assert_close(t0[f"{t.name}.W"], t.weight.data, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["adapter", "adapter_after_initialize"])
def test_zero3_saved_adapter_loads_single_process(dist_run, single, tiny_causal_lm_dir, adapter):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float32)
    loaded = load_milora(model, dist_run / adapter).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, single.eval()(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_zero3_owner_holds_one_gathered_weight_at_a_time(dist_run, single):
    sizes = {t.name: t.weight.numel() * t.weight.element_size() for t in find_targets(single)}
    for rank in (0, 1):
        _, report = _rank(dist_run, rank, "zero3")
        owned = sum(sizes[n] for n in report["decomposed_names"])
        # before: an owner copied every weight it owned and held them all until the broadcast
        assert 0 < report["peak_held_bytes"] <= WAVE_PER_RANK * max(sizes.values()) < owned
        assert _rank(dist_run, rank, "replicated")[1]["peak_held_bytes"] == 0  # replicated weights: no copies


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, failing_rank, error_type, text",
    [
        ("fail_oom_rank1", 1, "OutOfMemoryError", "simulated: CUDA out of memory"),
        ("fail_linalg_rank0", 0, torch.linalg.LinAlgError.__name__, "simulated: no convergence"),
        ("fail_fingerprint_rank1", 1, "MemoryError", "simulated: host OOM"),
        ("fail_cache_write_rank0", 0, "RuntimeError", "simulated: quota exceeded"),
    ],
)
def test_failure_on_one_rank_stops_every_rank_with_its_message(dist_run, name, failing_rank, error_type, text):
    for rank in (0, 1):
        got = json.loads((dist_run / f"rank{rank}_{name}.json").read_text())
        assert got["untouched"], f"rank {rank}: apply_milora left LoRA layers in the model"
        assert text in got["message"], got
        if rank == failing_rank:
            assert got["type"] == error_type, got
        else:
            assert got["type"] == "RuntimeError" and f"rank {failing_rank} failed: {error_type}: " in got["message"], got
        if "cache_write" not in name:
            assert "target 'model.layers." in got["message"], got  # which matrix


@pytest.mark.slow
def test_ranks_still_in_step_after_failures(dist_run):
    (t0, r0), (t1, r1) = _rank(dist_run, 0, "after_failures"), _rank(dist_run, 1, "after_failures")
    ref, _ = _rank(dist_run, 0, "zero3")
    assert r0["decomposed_here"] > 0 and r1["decomposed_here"] > 0
    assert all(torch.equal(t0[k], t1[k]) and torch.equal(t0[k], ref[k]) for k in ref)
