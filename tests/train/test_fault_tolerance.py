"""Fault tolerance (milora_vlm.train.guards, milora_vlm.train.checkpoint): bad records over / under
guards.max_skip_fraction, NaN losses skipped and, N in a row, stopping the run with a checkpoint of the last good
state and an error naming the batches' records; saves staged and renamed into place, so a killed save is never
resumed; 2-process ZeRO-2 and ZeRO-3 runs killed with SIGKILL and resumed with `auto` end where an uninterrupted
run ends.

Runs are shared between tests through module fixtures (each launch costs seconds to tens of seconds on 2 cores).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from milora_vlm.config import ConfigError, load_recipe
from milora_vlm.train.checkpoint import (MANIFEST, STAGING_DIR, check_run_compatible, checkpoints, clear_staging,
                                         latest_complete_checkpoint, missing_parts, publish, read_manifest, staging_dir,
                                         trusted_deepspeed_loads, write_manifest)
from milora_vlm.train.guards import TrainingStopped, check_skip_fraction
from tests.helpers import REPO

SCRIPT = str(REPO / "scripts" / "train_vlm.py")
ZERO2 = "configs/tiny/llava_milora_zero2.yaml"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def command(args: list[str], procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, SCRIPT, "--deepspeed", "null", *args]
    return deepspeed_launcher() + ["--num_gpus", str(procs), "--master_port", str(free_port()), SCRIPT, *args]


def environment(**extra: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def launch(args: list[str], procs: int = 1, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, procs), cwd=REPO, env=environment(**env), capture_output=True, text=True,
                          timeout=timeout)


def log_history(path) -> list[dict]:
    return json.loads((Path(path) / "trainer_state.json").read_text())["log_history"]


def losses(path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in log_history(path) if "loss" in h}


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def same_weights(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


# ---- units ---------------------------------------------------------------------------------------------------------

def test_skip_fraction_limit_needs_both_fractions():
    reasons = Counter({"missing_image": 2, "bad_conversations": 1})
    examples = {"missing_image": ["data.jsonl:line 4 (id a): missing_image: image file not found: x.png"],
                "bad_conversations": ["data.jsonl:line 9 (id b): bad_conversations: empty"]}
    check_skip_fraction(100, reasons, examples, file_records=100, max_fraction=0.05)  # 3% of those looked at
    check_skip_fraction(10, reasons, examples, file_records=100, max_fraction=0.05)  # 30%, but 3 <= 5% of the file
    with pytest.raises(TrainingStopped) as e:
        check_skip_fraction(20, reasons, examples, file_records=40, max_fraction=0.05)
    msg = str(e.value)
    assert "3 of 20" in msg and "missing_image: 2" in msg and "bad_conversations: 1" in msg
    assert "data.jsonl:line 4 (id a)" in msg and "guards.max_skip_fraction" in msg


def test_guards_keys_are_checked(tmp_path):
    base = [("model.path", str(tmp_path / "m")), ("data.train_file", str(tmp_path / "t.jsonl")),
            ("output_dir", str(tmp_path / "o"))]
    recipe = load_recipe(REPO / ZERO2, base + [("guards.max_consecutive_nonfinite", "5")])
    assert recipe.guards.max_consecutive_nonfinite == 5 and recipe.to_dict()["guards"]["max_consecutive_nonfinite"] == 5
    for key, value, words in [("guards.max_skip_fraction", "1.5", "between 0 and 1"),
                              ("guards.max_consecutive_nonfinite", "0", "at least 1"),
                              ("guards.max_consecutive_nonfinite", "many", "guards.max_consecutive_nonfinite"),
                              ("guards.max_skip_fractoin", "0.1", "did you mean")]:
        with pytest.raises(ConfigError, match=words):
            load_recipe(REPO / ZERO2, base + [(key, value)])


ONE_PROCESS = {"world_size": 1, "deepspeed": False, "zero_stage": None}


def write_checkpoint_files(path: Path, tag: str) -> None:
    """A 1-process checkpoint without DeepSpeed, manifest included (the save's last write)."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "rng_state.pth"):
        (path / name).write_bytes(tag.encode())
    (path / "milora_recipe.yaml").write_text("{}")
    (path / "trainer_state.json").write_text("{}")
    write_manifest(str(path), ONE_PROCESS, [0])


# A save as MiLoRATrainer._save_checkpoint does it (every file into the staging folder, then publish's renames),
# SIGKILLed once every file is written and before the manifest and any rename, or between publish's two renames (the older
# checkpoint-N of that name moved aside, the new one not yet in place). Plain Python: it starts in a blink.
_SAVER = """
import os, sys, time
staged, target, stop_after = sys.argv[1:]
os.makedirs(staged)
for name in ("adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "milora_recipe.yaml", "trainer_state.json"):
    with open(os.path.join(staged, name), "w") as f:
        f.write("{}")
if stop_after == "moved aside":
    os.replace(target, os.path.join(os.path.dirname(staged), "replaced-" + os.path.basename(target)))
print(stop_after, flush=True)
time.sleep(600)
"""


def kill_saver(out: Path, name: str, stop_after: str) -> None:
    staged = Path(staging_dir(str(out))) / name
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(staged), str(out / name), stop_after],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == stop_after
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_interrupted_save_is_never_resumed(tmp_path):
    out = tmp_path / "out"
    for step in (2, 4):
        write_checkpoint_files(Path(staging_dir(str(out))) / f"checkpoint-{step}", f"step {step}")
        publish(str(Path(staging_dir(str(out))) / f"checkpoint-{step}"), str(out / f"checkpoint-{step}"))
    assert missing_parts(str(out / "checkpoint-4")) == [] and not list(Path(staging_dir(str(out))).iterdir())

    # killed after every rank wrote checkpoint-6, before the manifest and the rename: only the staging folder holds it
    kill_saver(out, "checkpoint-6", "written")
    assert "no milora_manifest.json" in missing_parts(str(out / STAGING_DIR / "checkpoint-6"))[0]
    assert not (out / "checkpoint-6").exists()
    assert [s for s, _ in checkpoints(str(out))] == [2, 4]
    assert latest_complete_checkpoint(str(out)) == str(out / "checkpoint-4")

    # a run that resumed from checkpoint-2 saves checkpoint-4 again (after clearing the leftovers, as every save
    # does); killed between the renames: no checkpoint-4 at all, so `auto` takes checkpoint-2
    clear_staging(str(out))
    assert not (out / STAGING_DIR).exists()
    kill_saver(out, "checkpoint-4", "moved aside")
    assert not (out / "checkpoint-4").exists() and latest_complete_checkpoint(str(out)) == str(out / "checkpoint-2")

    # replacing an existing checkpoint-N (with leftovers of a killed save still in the staging folder)
    write_checkpoint_files(Path(staging_dir(str(out))) / "checkpoint-2", "again")
    publish(str(Path(staging_dir(str(out))) / "checkpoint-2"), str(out / "checkpoint-2"))
    assert (out / "checkpoint-2" / "optimizer.pt").read_text() == "again"
    assert sorted(p.name for p in (out / STAGING_DIR).iterdir()) == ["checkpoint-4", "replaced-checkpoint-4"]
    # other damage is still caught by the completeness check
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    assert missing_parts(str(out / "checkpoint-2")) == ["optimizer.pt is missing"]
    assert latest_complete_checkpoint(str(out)) is None


ZERO2_TWO_RANKS = {"world_size": 2, "deepspeed": True, "zero_stage": 2}


def zero2_checkpoint(path: Path, ranks=(0, 1), skip: tuple[str, ...] = ()) -> Path:
    """The file layout of a 2-rank ZeRO-2 checkpoint (contents are stand-ins), less the files named in `skip`."""
    names = ["adapter_model.safetensors", "milora_recipe.yaml", "trainer_state.json", "latest",
             "global_step4/mp_rank_00_model_states.pt"]
    for r in ranks:
        names += [f"rng_state_{r}.pth", f"global_step4/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"]
    for name in names:
        if name not in skip:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text("global_step4" if name == "latest" else f"{name} bytes")
    return path


@pytest.mark.parametrize("part", ["rng_state_1.pth", "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_a_rank_part_missing_at_save_fails_the_save_and_later_makes_the_checkpoint_incomplete(tmp_path, part):
    staged = zero2_checkpoint(tmp_path / "staged", skip=(part,))
    with pytest.raises(RuntimeError, match=re.escape(part)):
        write_manifest(str(staged), ZERO2_TWO_RANKS, [0, 1])
    assert not (staged / MANIFEST).exists()
    out = tmp_path / "out"
    older, newer = (zero2_checkpoint(out / f"checkpoint-{s}") for s in (2, 4))
    for c in (older, newer):
        write_manifest(str(c), ZERO2_TWO_RANKS, [0, 1])
    (newer / part).unlink()  # lost after the save
    assert missing_parts(str(newer)) == [f"{part} is missing"]
    assert latest_complete_checkpoint(str(out)) == str(older)
    # node-local disks: node 0's copy holds rank 0's parts only; asked for rank 1's it says what is missing
    node0 = zero2_checkpoint(tmp_path / "node0", ranks=(0,))
    write_manifest(str(node0), ZERO2_TWO_RANKS, [0])
    assert missing_parts(str(node0)) == [] and read_manifest(str(node0))["ranks"] == [0]
    assert len(missing_parts(str(node0), ranks=[1])) == 2


def test_damaged_or_planted_files_are_refused_and_auto_says_why(tmp_path, caplog):
    out = tmp_path / "out"
    ckpts = {s: zero2_checkpoint(out / f"checkpoint-{s}") for s in (2, 4, 6, 8, 10)}
    for c in ckpts.values():
        write_manifest(str(c), ZERO2_TWO_RANKS, [0, 1])
    optim = "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    text = (ckpts[10] / optim).read_text()
    (ckpts[10] / optim).write_text(text[:-1] + "X")  # same size, other bytes
    (ckpts[8] / "global_step4" / "payload.pt").write_bytes(b"planted")
    (ckpts[6] / MANIFEST).write_text("{not json")
    (ckpts[4] / MANIFEST).unlink()
    assert missing_parts(str(ckpts[10])) == [f"{optim} differs from what the save wrote (sha256 mismatch)"]
    assert missing_parts(str(ckpts[10]), verify_hashes=False) == []  # sizes alone cannot see it
    assert missing_parts(str(ckpts[8])) == ["global_step4/payload.pt is not in the manifest (not written by the save)"]
    assert "milora_manifest.json is unreadable" in missing_parts(str(ckpts[6]))[0]
    good = json.loads((ckpts[10] / MANIFEST).read_text())
    for damage, says in [({"files": {"config.json": 5}}, "not {size, sha256}"), ({"ranks": "0"}, "`ranks`"),
                         ({"files": {"../../etc/passwd": {"size": 1, "sha256": "x"}}}, "leaves the checkpoint"),
                         ({"run": []}, "`run`")]:
        (ckpts[6] / MANIFEST).write_text(json.dumps({**good, **damage}))  # parses, but not what the save writes
        assert says in missing_parts(str(ckpts[6]))[0]
    (ckpts[6] / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in missing_parts(str(ckpts[6]))[0]
    assert "no milora_manifest.json" in missing_parts(str(ckpts[4]))[0]
    with caplog.at_level("WARNING", logger="milora_vlm.train.checkpoint"):
        assert latest_complete_checkpoint(str(out)) == str(ckpts[2])
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 4 and "checkpoint-10: " + optim in skipped[0] and "payload.pt" in skipped[1]


def test_resume_refuses_another_deepspeed_setup_naming_the_key(tmp_path):
    ckpt = zero2_checkpoint(tmp_path / "checkpoint-4")
    write_manifest(str(ckpt), ZERO2_TWO_RANKS, [0, 1])
    saved = {"deepspeed": "/x/zero2.json"}
    check_run_compatible(str(ckpt), saved, dict(ZERO2_TWO_RANKS))
    for now, words in [({"deepspeed": False, "zero_stage": None}, r"`deepspeed: null`, so its ZeRO optimizer state would be dropped.*--deepspeed /x/zero2.json"),
                       ({"zero_stage": 3}, r"zero_optimization.stage 3, and ZeRO-2 shards"),
                       ({"world_size": 4}, r"saved under DeepSpeed ZeRO-2 by 2 process.*this run has 4 \(the world size")]:
        with pytest.raises(ConfigError, match=words):
            check_run_compatible(str(ckpt), saved, {**ZERO2_TWO_RANKS, **now})
    plain = tmp_path / "plain"
    write_checkpoint_files(plain, "x")
    with pytest.raises(ConfigError, match="DeepSpeed cannot read the Trainer's optimizer.pt"):
        check_run_compatible(str(plain), {}, dict(ZERO2_TWO_RANKS))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARK']}",))


def test_deepspeed_pickles_are_read_weights_only(tmp_path, monkeypatch):
    """DeepSpeed's own engine unpickles with weights_only=False; inside trusted_deepspeed_loads a planted object
    raises instead of running, while what DeepSpeed really writes (its loss scaler, ZeRO stage, fragment
    addresses) still loads."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    mark = tmp_path / "ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    torch.save({"optimizer_state_dict": _Payload()}, tmp_path / "planted.pt")
    real = {"loss_scaler": LossScaler(scale=1.0), "dynamic": DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1.0,
                                                                               delayed_shift=2, consecutive_hysteresis=False),
            "zero_stage": ZeroStageEnum.gradients, "slices": {"w": fragment_address(numel=4, start=2)},
            "state": torch.arange(3.0)}
    torch.save(real, tmp_path / "real.pt")
    engine = TorchCheckpointEngine()
    with trusted_deepspeed_loads():
        with pytest.raises(pickle.UnpicklingError):
            engine.load(str(tmp_path / "planted.pt"))
        back = engine.load(str(tmp_path / "real.pt"))
    assert not mark.exists()
    assert back["zero_stage"] is ZeroStageEnum.gradients and back["slices"]["w"] == fragment_address(numel=4, start=2)
    assert back["loss_scaler"].cur_scale == 1.0 and back["dynamic"].cur_scale == 2.0 ** 16
    engine.load(str(tmp_path / "planted.pt"))  # outside it, DeepSpeed's own load runs the payload
    assert mark.exists()


# ---- single-process runs: bad records and NaN losses -----------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny LLaVA and shapes data from the recipe's bootstrap, plus a file with three kinds of bad records."""
    from milora_vlm.train.bootstrap import bootstrap_tiny

    root = tmp_path_factory.mktemp("faults")
    recipe = load_recipe(REPO / ZERO2, [
        ("model.path", str(root / "llava")), ("data.train_file", str(root / "shapes.jsonl")),
        ("data.image_folder", str(root / "images")), ("output_dir", str(root / "unused"))])
    bootstrap_tiny(recipe)
    records = [json.loads(line) for line in (root / "shapes.jsonl").read_text().splitlines()]
    image_rec = next(r for r in records if "image" in r)
    shutil.copy(root / "images" / image_rec["image"], root / "images" / "deleted.png")
    (root / "images" / "corrupt.png").write_bytes(b"not a png at all")
    bad = [dict(image_rec, id="deleted", image="deleted.png"), dict(image_rec, id="corrupt", image="corrupt.png"),
           {"id": "empty", "conversations": []}]
    good = records[:13]
    with open(root / "bad.jsonl", "w") as f:  # 16 records: 4 steps of 4 meet every one of them
        for r in good[:4] + bad[:1] + good[4:8] + bad[1:2] + good[8:12] + bad[2:] + good[12:]:
            f.write(json.dumps(r) + "\n")
    (root / "images" / "deleted.png").unlink()  # deleted after data_prep validated the file
    return root


def single(work, name: str, *extra: str) -> list[str]:
    return ["--config", ZERO2, "--model.path", str(work / "llava"), "--data.image_folder", str(work / "images"),
            "--data.train_file", str(work / "bad.jsonl"), "--output_dir", str(work / name), "--seed", "0", *extra]


@pytest.fixture(scope="module")
def nan_run(work):
    """Bad records under the limit; NaN loss on step 2 (skipped, training goes on) and on steps 4 and 5 (stop)."""
    proc = launch(single(work, "nan", "--max_steps", "8", "--save_steps", "1", "--save_total_limit", "10",
                         "--guards.max_skip_fraction", "0.3", "--guards.max_consecutive_nonfinite", "2"),
                  MILORA_POISON_LOSS_STEPS="2,4,5")
    return proc, work / "nan"


def file_ids(path) -> set[str]:
    return {json.loads(line)["id"] for line in Path(path).read_text().splitlines()}


def named_batches(text: str) -> dict[int, dict[int, list[str]]]:
    """{step: {rank: [record ids]}} from the guard's "step N: ...; batches: rank 0 [a, b], rank 1 [...]" entries."""
    found = {}
    for step, batches in re.findall(r"step (\d+): [^|]*?; batches: ((?:rank \d+ \[[^\]]*\](?:, )?)+)", text):
        found[int(step)] = {int(r): ids.split(", ") if ids else [] for r, ids in re.findall(r"rank (\d+) \[([^\]]*)\]", batches)}
    return found


def test_nonfinite_steps_are_skipped_and_too_many_stop_with_a_checkpoint(nan_run, work):
    proc, out = nan_run
    assert proc.returncode == 3, proc.stderr[-4000:]
    stop = proc.stderr[proc.stderr.index("train_vlm: stopped:"):]
    assert "2 non-finite steps in a row" in stop and "steps 4-5 non-finite" in stop
    assert "step 4: loss nan (rank 0)" in stop and "step 5: loss nan (rank 0)" in stop
    assert "skipped a non-finite step (1 in a row, 1 in all): step 2: loss nan" in proc.stderr
    # the error names the records of both poisoned batches (4 each; bad records are never in a batch)
    named = named_batches(stop)
    usable = file_ids(work / "bad.jsonl") - {"deleted", "corrupt", "empty"}
    assert sorted(named) == [4, 5] and all(list(b) == [0] for b in named.values()), stop
    assert all(len(b[0]) == 4 and set(b[0]) <= usable for b in named.values()), stop
    step2 = named_batches(proc.stderr[proc.stderr.index("(1 in a row, 1 in all): step 2"):].splitlines()[0])
    assert len(step2[2][0]) == 4 and set(step2[2][0]) <= usable
    ckpts = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert ckpts == [1, 2, 3, 4, 5]  # stopped at step 5, with a checkpoint of it
    assert all(missing_parts(str(out / f"checkpoint-{s}")) == [] for s in ckpts)
    w = {s: adapter(out / f"checkpoint-{s}") for s in ckpts}
    assert same_weights(w[1], w[2])  # step 2 skipped: no optimizer update
    assert not same_weights(w[2], w[3])  # step 3 trained
    assert same_weights(w[3], w[4]) and same_weights(w[3], w[5])  # the saved state is the last good one
    assert not (out / "adapter_model.safetensors").exists()  # a stopped run does not pass for a finished one
    last = [h for h in log_history(out / "checkpoint-5") if "nonfinite_steps_skipped" in h][-1]
    assert last["nonfinite_steps_skipped"] == 3


def test_resume_skips_a_tampered_checkpoint_and_refuses_another_deepspeed_setup(nan_run, work):
    """The NaN run saved without DeepSpeed. A copy whose newest optimizer.pt was replaced is skipped by `auto`,
    naming the file; the older one is then refused at start, naming the `deepspeed` key, before any model loads."""
    _, out = nan_run
    again = work / "tampered"
    for step in (4, 5):
        shutil.copytree(out / f"checkpoint-{step}", again / f"checkpoint-{step}")
    torch.save({"state": {}, "param_groups": []}, again / "checkpoint-5" / "optimizer.pt")
    proc = subprocess.run([sys.executable, SCRIPT, *single(work, "tampered", "--resume_from_checkpoint", "auto")],
                          cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"skipping {again / 'checkpoint-5'}: optimizer.pt" in proc.stderr
    assert f"cannot resume from {again / 'checkpoint-4'}: it was saved without DeepSpeed" in proc.stderr
    assert "Resume with `deepspeed: null` (--deepspeed null)" in proc.stderr


def test_bad_records_under_the_limit_are_counted_and_named(nan_run, work):
    proc, out = nan_run
    last = [h for h in log_history(out / "checkpoint-5") if "skipped/total" in h][-1]
    assert last["skipped/missing_image"] >= 1 and last["skipped/corrupt_image"] >= 1 and last["skipped/bad_conversations"] >= 1
    assert "skipped record" in proc.stderr and "bad.jsonl:line" in proc.stderr and "(id deleted)" in proc.stderr


def test_skipped_steps_are_logged_as_skipped_not_as_a_loss(nan_run):
    """Step 2 (NaN, skipped) once showed as loss 0.0 in trainer_state, TensorBoard and the loss curve."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc, out = nan_run
    logs = {h["step"]: h for h in log_history(out / "checkpoint-5") if "learning_rate" in h}
    assert "loss" not in logs[2] and "grad_norm" not in logs[2] and logs[2]["nonfinite_steps_in_interval"] == 1
    assert logs[1]["loss"] > 0.5 and logs[3]["loss"] > 0.5 and "nonfinite_steps_in_interval" not in logs[3]
    events = EventAccumulator(glob.glob(str(out / "runs" / "*" / "events.*"))[0])
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 3]  # steps 4 and 5 stopped the run
    assert [e.step for e in events.Scalars("train/nonfinite_steps_in_interval")] == [2, 4, 5]


# ---- 2 processes, ZeRO-2 and ZeRO-3: SIGKILL and resume, NaN on one rank -----------------------------------------

ZERO3 = "configs/tiny/llava_milora_zero3.yaml"


def zero2_args(work, name: str, *extra: str, config: str = ZERO2, steps: int = 8) -> list[str]:
    return ["--config", config, "--model.path", str(work / "llava"), "--data.image_folder", str(work / "images"),
            "--data.train_file", str(work / "shapes.jsonl"), "--output_dir", str(work / name), "--seed", "0",
            "--max_steps", str(steps), "--save_steps", "2", "--save_total_limit", "10", *extra]


def zero3_args(work, name: str, *extra: str) -> list[str]:
    return zero2_args(work, name, *extra, config=ZERO3, steps=6)


def kill_when(args: list[str], out: Path, trigger: str, delay: float) -> None:
    """Run 2 processes and SIGKILL all of them (launcher and both ranks: the whole process group) `delay` seconds
    after out/trigger appears."""
    proc = subprocess.Popen(command(args, 2), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / trigger).exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def resume_and_compare(args: list[str], full: Path, killed: Path, steps: int) -> int:
    """Resume the killed run with `auto`: it must end with the uninterrupted run's weights and loss curve."""
    resumed_from = latest_complete_checkpoint(str(killed))
    step = int(resumed_from.rsplit("-", 1)[1])
    assert 2 <= step < steps
    resumed = launch([*args, "--resume_from_checkpoint", "auto"], procs=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"continuing from {resumed_from}" in resumed.stderr
    assert not (killed / STAGING_DIR).exists() or not list((killed / STAGING_DIR).iterdir())  # leftovers cleared
    a, b = adapter(full), adapter(killed)
    assert any("multi_modal_projector" in k for k in a)  # the trained projector is saved with the adapter
    assert same_weights(a, b, atol=1e-6)
    first, again = losses(full), losses(killed)
    assert sorted(again) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert again[s] == pytest.approx(first[s], rel=1e-5, abs=1e-6), s
    return step


def fault_rng() -> random.Random:
    seed = int(os.environ.get("FAULT_SEED", os.getpid()))
    print(f"FAULT_SEED={seed}")
    return random.Random(seed)


def kill_after_save_began_and_resume(args_for, work, full: str, killed: str, max_delay: float,
                                     steps: int) -> tuple[int, bool, float]:
    """Train `full` to the end; train `killed` and kill it a random delay (up to max_delay s) after the save of
    checkpoint-4 began; resume it with `auto` and compare with `full`. Returns (checkpoint resumed from, whether
    the kill landed inside that save, the delay)."""
    run = launch(args_for(work, full), procs=2)
    assert run.returncode == 0, run.stderr[-4000:]
    delay = fault_rng().uniform(0.0, max_delay)
    out = work / killed
    kill_when(args_for(work, killed), out, f"{STAGING_DIR}/checkpoint-4", delay)
    in_save = not (out / "checkpoint-4").exists()
    return resume_and_compare(args_for(work, killed), work / full, out, steps), in_save, delay


@pytest.mark.slow
def test_zero2_killed_at_a_random_step_resumes_to_the_same_weights_and_losses(work):
    # killed a random delay after the save of checkpoint-4 began: inside that save, in steps 5-6 or in the save of
    # checkpoint-6. The trigger is the save's start, not a finished checkpoint, and the delay short, so that even on
    # a fast machine the kill lands before the run's last save (measured on CI: 0.8 s after checkpoint-6 was too late)
    step, in_save, delay = kill_after_save_began_and_resume(zero2_args, work, "full", "killed", 0.4, steps=8)
    assert step == 2 if in_save else step in (4, 6)
    print(f"killed {delay:.2f} s after the save of checkpoint-4 began; resumed from checkpoint-{step} to the same "
          "weights and losses")


@pytest.mark.slow
def test_zero3_killed_in_or_after_a_save_resumes_to_the_same_weights_and_losses(work):
    # killed a random delay after the save of checkpoint-4 began (its staging folder appeared): inside that save
    # (every rank writing its ZeRO-3 shards; the rename not done yet) or in steps 5-6; `auto` must then take
    # checkpoint-2 or checkpoint-4, never a half-written one
    step, in_save, delay = kill_after_save_began_and_resume(zero3_args, work, "z3_full", "z3_killed", 0.25, steps=6)
    assert step == (2 if in_save else 4)
    print(f"killed {delay:.2f} s after the save of checkpoint-4 began ({'inside' if in_save else 'after'} the save); "
          f"resumed from checkpoint-{step} to the same weights and losses")


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_ranks_agree_to_skip_a_nan_on_one_rank_and_stop_together(work, zero):
    """Only rank 0's loss is poisoned (steps 2, 3): both ranks must skip, or DeepSpeed's collectives would hang; the
    error names both ranks' batches."""
    name = f"z{zero}_nan"
    out = work / name
    args = (zero2_args if zero == 2 else zero3_args)(work, name, "--max_steps", "4", "--save_steps", "1",
                                                    "--guards.max_consecutive_nonfinite", "2")
    proc = launch(args, procs=2, timeout=300, MILORA_POISON_LOSS_STEPS="2,3")
    assert proc.returncode == 3, proc.stderr[-4000:]
    stop = proc.stderr[proc.stderr.index("train_vlm: stopped:"):].splitlines()[0]
    assert "2 non-finite steps in a row" in stop and "steps 2-3 non-finite" in stop
    assert "step 3: loss nan (rank 0)" in stop and "(rank 1)" not in stop  # rank 1's loss was fine
    named, ids = named_batches(stop), file_ids(work / "shapes.jsonl")
    assert sorted(named) == [2, 3], stop
    for step, by_rank in named.items():
        assert sorted(by_rank) == [0, 1] and all(len(b) == 4 and set(b) <= ids for b in by_rank.values()), stop
        assert not set(by_rank[0]) & set(by_rank[1])  # each rank's own batch
    assert missing_parts(str(out / "checkpoint-3")) == [] and not (out / "checkpoint-4").exists()
    w1, w3 = adapter(out / "checkpoint-1"), adapter(out / "checkpoint-3")
    assert same_weights(w1, w3)  # neither rank stepped on the poisoned steps
    assert not any(p.name == "adapter_model.safetensors" for p in out.iterdir())


@pytest.mark.slow
def test_zero2_bad_records_over_the_limit_stop_every_rank(work):
    """Over guards.max_skip_fraction: a clear error naming counts by reason and records, on every rank."""
    proc = launch(zero2_args(work, "z2_over", "--data.train_file", str(work / "bad.jsonl"), "--max_steps", "4",
                             "--guards.max_skip_fraction", "0.05"), procs=2, timeout=300)
    assert proc.returncode != 0, proc.stderr[-4000:]
    msg = proc.stderr[proc.stderr.index("train_vlm: stopped:"):]
    assert "guards.max_skip_fraction" in msg and "By reason:" in msg and "bad.jsonl:line" in msg
    assert any(r in msg for r in ("missing_image", "corrupt_image", "bad_conversations"))


@pytest.mark.parametrize("ds, words", [
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs zero_optimization.stage 3"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer needs"),
    ({"zero_optimization": {"stage": 4}}, "stage 4 is not one of"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, "both enabled"),
])
def test_impossible_zero_settings_fail_before_loading_anything(tmp_path, ds, words):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=words):
        load_recipe(REPO / ZERO2, [("model.path", str(tmp_path / "m")), ("data.train_file", str(tmp_path / "t.jsonl")),
                                   ("output_dir", str(tmp_path / "o")), ("deepspeed", str(path))])


def test_a_run_in_this_process_leaves_zero3_off_for_what_loads_next(monkeypatch):
    """compare_inits trains in-process and then loads models to evaluate: transformers' process-wide "ZeRO-3 is on"
    (HfDeepSpeedConfig) must not outlive the run, or those models load partitioned (empty weights)."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from milora_vlm.train import pipeline

    def zero3_run(recipe):
        holder.append(HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1}))  # as the Trainer
        assert is_deepspeed_zero3_enabled()
        raise RuntimeError("the run failed")

    holder = []
    monkeypatch.setattr(pipeline, "_run", zero3_run)
    with pytest.raises(RuntimeError, match="the run failed"):
        pipeline.run(None)
    assert holder and not is_deepspeed_zero3_enabled()  # cleared though the config object is still referenced
