"""End to end: `deepspeed --num_gpus 2 scripts/train_vlm.py` on CPU (gloo) under ZeRO-2 and ZeRO-3, resumed from
intermediate checkpoints, reloaded with load_milora; plus a causal-LM alpaca run and an adapter-free stage-1 run.

Each launch costs tens of seconds on 2 cores, so runs are shared between tests through module fixtures.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from milora_vlm.config import load_recipe
from milora_vlm.train.checkpoint import missing_parts
from tests.helpers import REPO

SCRIPT = str(REPO / "scripts" / "train_vlm.py")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args: list[str], procs: int = 2, reference: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if reference:
        env["MILORA_REFERENCE_LOGITS"] = str(reference)
    port = free_port() if procs > 1 else None
    if procs > 1:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
        cmd += ["--num_gpus", str(procs), "--master_port", str(port), SCRIPT, *args]
    else:
        cmd = [sys.executable, SCRIPT, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    # DeepSpeed's CPU all-reduce op is not built (g++ at first start) and its buffers (66 MB per rank in RAM-backed
    # /dev/shm) do not outlive a launched run (milora_vlm.train.distributed.skip_deepspeed_shm_op).
    assert "shm_comm_op built" not in proc.stdout + proc.stderr
    assert port is None or not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"), "a DeepSpeed shm buffer leaked"
    return proc


def losses(output_dir) -> dict[int, float]:
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def last_log(output_dir) -> dict:
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h][-1]


def assert_reloads_to_reference(output_dir, base_dir):
    """The saved adapter, loaded with load_milora onto the untouched base, reproduces the trained model's logits."""
    from transformers import LlavaForConditionalGeneration

    from milora_vlm.milora import load_milora

    ref = torch.load(Path(output_dir) / "reference_logits.pt", weights_only=False)
    batch = {k: v for k, v in ref["batch"].items() if k not in ("labels", "skipped_samples")}
    base = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(**batch).logits
        model = load_milora(base, output_dir).eval()
        logits = model(**batch).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)
    assert (base_logits - ref["logits"]).abs().max() > 1e-3  # training changed the function
    assert_plain_peft_refuses(output_dir, base_dir)


def assert_plain_peft_refuses(output_dir, base_dir):
    """Plain PEFT never loads a run's adapter directories silently wrong: it refuses, naming load_milora."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    dirs = [Path(output_dir), *sorted(Path(output_dir).glob("checkpoint-*"))]
    for adapter_dir in dirs:
        with pytest.raises(ValueError, match="MILORA_ADAPTER.*load_milora"):
            PeftModel.from_pretrained(base, str(adapter_dir))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny LLaVA + data made by the recipe's own bootstrap, then a ZeRO-2 data file with bad records mixed in."""
    from milora_vlm.train.bootstrap import bootstrap_tiny

    root = tmp_path_factory.mktemp("e2e")
    recipe = load_recipe(REPO / "configs/tiny/llava_milora_zero2.yaml", [
        ("model.path", str(root / "llava")), ("data.train_file", str(root / "shapes.jsonl")),
        ("data.image_folder", str(root / "images")), ("output_dir", str(root / "unused"))])
    bootstrap_tiny(recipe)
    records = [json.loads(line) for line in (root / "shapes.jsonl").read_text().splitlines()]
    good = records[:30]
    bad = [{"id": "gone", "image": "missing.png", "conversations": good[0]["conversations"]},
           {"id": "norole", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    with open(root / "z2.jsonl", "w") as f:  # 32 records = 4 steps of 2 ranks x 4: every record is met
        for r in good[:10] + bad[:1] + good[10:20] + bad[1:] + good[20:]:
            f.write(json.dumps(r) + "\n")
        f.write('{"id": "cut", "conversations": [\n')
    image = next(r for r in records if "image" in r)
    text = next(r for r in records if "image" not in r)
    with open(root / "two.jsonl", "w") as f:  # ZeRO-3: one rank always gets the image record, the other the text one
        f.write(json.dumps(image) + "\n" + json.dumps(text) + "\n")
    return root


def common(work, name: str) -> list[str]:
    return ["--model.path", str(work / "llava"), "--data.image_folder", str(work / "images"),
            "--output_dir", str(work / name), "--seed", "0"]


@pytest.fixture(scope="module")
def zero2_run(work):
    train(["--config", "configs/tiny/llava_milora_zero2.yaml", *common(work, "z2"), "--data.train_file",
           str(work / "z2.jsonl"), "--max_steps", "6", "--save_steps", "3", "--data.group_by_modality_length", "true"],
          reference=4)
    return work / "z2"


@pytest.fixture(scope="module")
def zero3_run(work):
    train(["--config", "configs/tiny/llava_milora_zero3.yaml", *common(work, "z3"), "--data.train_file",
           str(work / "two.jsonl"), "--per_device_train_batch_size", "1", "--max_steps", "4", "--save_steps", "2"],
          reference=2)
    return work / "z3"


def test_zero2_trains_saves_complete_checkpoints_and_counts_skips(zero2_run, work):
    curve = losses(zero2_run)
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    assert curve[5] + curve[6] < curve[1] + curve[2]  # the loss falls
    for ckpt in ("checkpoint-3", "checkpoint-6"):
        assert missing_parts(str(zero2_run / ckpt)) == []
        for f in ("adapter_model.safetensors", "milora_init.safetensors", "milora_recipe.yaml", "processor_config.json",
                  "tokenizer.json", "latest"):
            assert (zero2_run / ckpt / f).exists(), f
    assert_reloads_to_reference(zero2_run, work / "llava")
    assert (zero2_run / "loss_curve.png").stat().st_size > 1000
    saved = load_recipe(zero2_run / "milora_recipe.yaml")
    assert saved.data.template == "vicuna_v1" and saved.training["use_cpu"] is True and saved.training["bf16"] is False
    # every bad record was met in the first epoch (4 steps x 2 ranks x 4 = 32 records), counted across both ranks
    log = last_log(zero2_run)
    assert log["skipped/missing_image"] >= 1 and log["skipped/bad_role"] >= 1 and log["skipped/malformed_record"] == 1
    assert log["skipped/total"] == log["skipped/missing_image"] + log["skipped/bad_role"] + 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(str(zero2_run / "**" / "events.out.tfevents.*"), recursive=True)
    tags = set()
    for e in events:
        acc = EventAccumulator(e)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/skipped/missing_image", "train/skipped/total"} <= tags


def test_zero2_residual_copy_backward_trains_the_same_curve(zero2_run, work):
    """adapter.offset_backward residual_copy (x's gradient through a kept W_res copy) under ZeRO-2 on 2 ranks: the
    same run as zero2_run gives the same losses (the same function and gradients, up to fp32 rounding), and its
    adapter, saved without the copy, reloads onto the untouched base to the trained logits."""
    proc = train(["--config", "configs/tiny/llava_milora_zero2.yaml", *common(work, "z2_copy"), "--data.train_file",
                  str(work / "z2.jsonl"), "--max_steps", "6", "--save_steps", "6", "--data.group_by_modality_length",
                  "true", "--adapter.offset_backward", "residual_copy"], reference=4)
    assert "W_res copies of the" in proc.stdout + proc.stderr  # the run did take the copy's backward
    first, copy = losses(zero2_run), losses(work / "z2_copy")
    assert sorted(copy) == sorted(first)
    for step in first:
        assert copy[step] == pytest.approx(first[step], rel=1e-4, abs=1e-5), (step, first, copy)
    assert load_recipe(work / "z2_copy" / "milora_recipe.yaml").adapter.offset_backward == "residual_copy"
    assert_reloads_to_reference(work / "z2_copy", work / "llava")


def test_zero2_resume_auto_continues_the_same_loss_curve(zero2_run, work):
    out = work / "z2_resumed"
    shutil.copytree(zero2_run / "checkpoint-3", out / "checkpoint-3")
    (out / "checkpoint-5").mkdir()  # an interrupted save: incomplete, so `auto` must not pick it
    (out / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"")
    train(["--config", "configs/tiny/llava_milora_zero2.yaml", *common(work, "z2_resumed"), "--data.train_file",
           str(work / "z2.jsonl"), "--max_steps", "6", "--save_steps", "3", "--data.group_by_modality_length", "true",
           "--resume_from_checkpoint", "auto"])
    first, resumed = losses(zero2_run), losses(out)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(first[step], rel=1e-5, abs=1e-6)


def test_zero3_mixed_modality_trains_and_saves_the_gathered_adapter(zero3_run, work):
    curve = losses(zero3_run)
    assert curve[4] < curve[1]
    assert missing_parts(str(zero3_run / "checkpoint-2")) == []
    assert glob.glob(str(zero3_run / "checkpoint-2" / "global_step2" / "*optim_states.pt"))
    assert_reloads_to_reference(zero3_run, work / "llava")  # not empty ZeRO-3 shards


def test_zero3_resume_continues_the_same_loss_curve(zero3_run, work):
    train(["--config", "configs/tiny/llava_milora_zero3.yaml", *common(work, "z3_resumed"), "--data.train_file",
           str(work / "two.jsonl"), "--per_device_train_batch_size", "1", "--max_steps", "4", "--save_steps", "2",
           "--resume_from_checkpoint", str(zero3_run / "checkpoint-2")])
    first, resumed = losses(zero3_run), losses(work / "z3_resumed")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(first[step], rel=1e-5, abs=1e-6)


def test_causal_lm_alpaca_recipe(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from milora_vlm.data.templates import encode_conversation
    from milora_vlm.milora import load_milora

    out = tmp_path / "lm_out"
    train(["--config", "configs/tiny/causal_lm_alpaca_milora.yaml", "--deepspeed", "null",
           "--model.path", str(tmp_path / "lm"), "--data.train_file", str(tmp_path / "inst.jsonl"),
           "--output_dir", str(out), "--max_steps", "12", "--save_steps", "12", "--export", "merged"], procs=1)
    curve = losses(out)
    assert curve[12] < curve[1]
    assert load_recipe(out / "milora_recipe.yaml").data.template == "alpaca"
    assert load_recipe(out / "export-merged" / "milora_recipe.yaml").data.template == "alpaca"  # eval needs no --template
    assert not (out / ".saving").exists()  # the staging folder goes once the checkpoint is published
    tok = AutoTokenizer.from_pretrained(out)
    model = load_milora(AutoModelForCausalLM.from_pretrained(tmp_path / "lm"), out).eval()
    rec = json.loads((tmp_path / "inst.jsonl").read_text().splitlines()[0])
    enc = encode_conversation(tok, "alpaca", rec["conversations"])
    assert "### Instruction:" in tok.decode(enc.input_ids)
    merged = AutoModelForCausalLM.from_pretrained(out / "export-merged").eval()  # export: merged, a plain checkpoint
    with torch.no_grad():
        ids = torch.tensor([enc.input_ids])
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_stage1_projector_only_saves_a_full_model(tmp_path, work):
    from safetensors.torch import load_file

    out = tmp_path / "stage1"
    train(["--config", "configs/tiny/llava_stage1_projector.yaml", "--model.path", str(work / "llava"),
           "--data.train_file", str(work / "shapes.jsonl"), "--data.image_folder", str(work / "images"),
           "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2"], procs=1)
    assert missing_parts(str(out / "checkpoint-2")) == []
    before, after = load_file(work / "llava" / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_packed_batches_train_under_zero(zero, work):
    """data.packing on 2 ranks: ZeRO-2 packs batches of 4 mixed records, ZeRO-3 one record a rank (the text-only
    rank packs the keepalive image's tokens as a segment of their own); the saved adapter reproduces the trained
    model on a packed batch. Packed == padded loss and logits are pinned in tests/data/test_packing.py."""
    data, batch = ("shapes.jsonl", "4") if zero == "zero2" else ("two.jsonl", "1")
    train(["--config", f"configs/tiny/llava_milora_{zero}.yaml", *common(work, f"packed_{zero}"), "--data.train_file",
           str(work / data), "--per_device_train_batch_size", batch, "--max_steps", "2", "--save_steps", "2",
           "--data.packing", "true"], reference=4)
    out = work / f"packed_{zero}"
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(out).values()) and sorted(losses(out)) == [1, 2]
    ref = torch.load(out / "reference_logits.pt", weights_only=False)["batch"]
    assert "position_ids" in ref and "attention_mask" not in ref
    assert_reloads_to_reference(out, work / "llava")
