"""Training helpers that need no training run: resume resolution, checkpoint completeness, loss-curve PNG,
skip totals, bootstrap data, the record ids that batches carry and the non-finite guard's report of them."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import yaml

from milora_vlm.config import RECIPE_FILENAME, ConfigError, build_recipe
from milora_vlm.data.collator import SKIPS_KEY, BatchSkips, ConversationCollator
from milora_vlm.data.dataset import ConversationDataset
from milora_vlm.data.skips import SkipRecord
from milora_vlm.train.bootstrap import instruction_records, shapes_records
from milora_vlm.train.callbacks import save_loss_curve
from milora_vlm.train.checkpoint import (check_resume_compatible, latest_complete_checkpoint, missing_parts, resolve_resume,
                                         write_manifest)
from milora_vlm.train.guards import NonFiniteGuard, TrainingStopped
from milora_vlm.train.skips import SkipCounter


def fake_checkpoint(path, deepspeed=True, recipe=None):
    """A 1-process checkpoint's files (ZeRO-2 or plain optimizer.pt), published with its manifest."""
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    (path / "trainer_state.json").write_text("{}")
    (path / "rng_state.pth").write_bytes(b"x")
    (path / RECIPE_FILENAME).write_text(yaml.safe_dump(recipe or {}))
    if deepspeed:
        (path / "latest").write_text("global_step3")
        (path / "global_step3").mkdir()
        (path / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (path / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    else:
        (path / "optimizer.pt").write_bytes(b"x")
    write_manifest(str(path), {"world_size": 1, "deepspeed": deepspeed, "zero_stage": 2 if deepspeed else None}, [0])
    return path


def test_checkpoint_completeness_and_auto_resume(tmp_path):
    out = tmp_path / "out"
    assert resolve_resume("auto", str(out)) is None  # nothing yet: start fresh
    fake_checkpoint(out / "checkpoint-3")
    fake_checkpoint(out / "checkpoint-10", deepspeed=False)
    broken = fake_checkpoint(out / "checkpoint-12")
    (broken / "trainer_state.json").unlink()  # deleted after the save
    half = fake_checkpoint(out / "checkpoint-15")
    (half / "latest").write_text("global_step15")  # names a folder that was never written
    assert missing_parts(str(out / "checkpoint-10")) == []
    assert missing_parts(str(broken)) == ["trainer_state.json is missing"]
    assert missing_parts(str(half)) == ["latest has 13 bytes, the save wrote 12"]
    assert latest_complete_checkpoint(str(out)) == str(out / "checkpoint-10")
    assert resolve_resume("auto", str(out)) == str(out / "checkpoint-10")
    with pytest.raises(ConfigError, match="cannot be resumed: trainer_state.json is missing"):
        resolve_resume(str(broken), str(out))
    assert resolve_resume(None, str(out)) is None


def test_resume_refuses_a_different_adapter(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "t.jsonl").write_text("{}\n")
    raw = {"model": {"kind": "causal_lm", "path": str(tmp_path / "m")}, "data": {"train_file": str(tmp_path / "t.jsonl"), "template": "alpaca"},
           "adapter": {"r": 8, "lora_alpha": 8}, "training": {"output_dir": str(tmp_path / "o")}}
    recipe = build_recipe(raw)
    ckpt = fake_checkpoint(tmp_path / "o" / "checkpoint-1", recipe=recipe.to_dict())
    check_resume_compatible(recipe, str(ckpt))
    raw["adapter"]["r"] = 16
    with pytest.raises(ConfigError, match=r"`adapter` differs .*\['r'\]"):
        check_resume_compatible(build_recipe(raw), str(ckpt))
    raw["adapter"]["r"] = 8
    raw["training"]["learning_rate"] = 1e-5  # training settings may change on resume
    check_resume_compatible(build_recipe(raw), str(ckpt))


def test_loss_curve_png(tmp_path):
    history = [{"step": i, "loss": 5.0 / i, "learning_rate": 1e-3} for i in range(1, 20)] + [{"step": 19, "train_runtime": 3.0}]
    assert save_loss_curve(history, str(tmp_path / "c.png"), "run")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert not save_loss_curve([{"step": 1, "train_runtime": 1.0}], str(tmp_path / "none.png"))


def test_skip_counter_single_process():
    rec = lambda reason: SkipRecord(reason, "d", "f:line 1", "id")  # noqa: E731
    counter = SkipCounter([rec("malformed_record")])
    counter.update(BatchSkips(samples=6, skipped=[rec("missing_image"), rec("missing_image")]))
    counter.update(BatchSkips(samples=4))
    counter.update(None)
    samples, reasons = counter.totals()
    assert samples == 11 and reasons == Counter(missing_image=2, malformed_record=1)
    entries = counter.log_entries()
    assert entries == {"skipped/total": 3.0, "skipped/fraction": pytest.approx(3 / 11),
                       "skipped/malformed_record": 1.0, "skipped/missing_image": 2.0}


def test_bootstrap_data_is_deterministic_and_mixed(tmp_path):
    a = shapes_records(str(tmp_path / "a"), random.Random(0))
    b = shapes_records(str(tmp_path / "b"), random.Random(0))
    assert json.dumps(a) == json.dumps(b)
    with_image = [r for r in a if "image" in r]
    assert 0 < len(with_image) < len(a)
    assert all((tmp_path / "a" / r["image"]).exists() for r in with_image)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in with_image)
    inst = instruction_records(random.Random(0))
    assert all(len(r["conversations"]) == 2 and "image" not in r for r in inst)


def test_batches_name_their_records_by_id_or_file_line(tmp_path, tiny_tokenizer):
    turns = [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "conversations": turns},
        {"id": "bad", "conversations": []},  # skipped: the next record stands in for it
        {"conversations": turns},  # no id: named by file:line
        {"id": 7, "conversations": turns},
    ]) + "\n")
    ds = ConversationDataset(str(path), tiny_tokenizer, "vicuna_v1", 512)
    batch = ConversationCollator(pad_token_id=0)([ds[0], ds[1], ds[3]])
    skips = batch[SKIPS_KEY]
    assert skips.records == ["a", f"{path}:line 3", "7"]
    assert [s.record_id for s in skips.skipped] == ["bad"] and skips.samples == 3  # one record looked at per row


class _Control:
    should_save = should_training_stop = False


class _State:
    global_step = 0


def _step(guard, state, records, loss=1.0, norm=1.0):
    import torch

    state.global_step += 1
    guard.note_batch(records)
    if guard.loss_is_finite(torch.tensor(loss), state.global_step):
        guard.grad_norm_is_finite(norm, state.global_step)
    control = _Control()
    guard.on_step_end(None, state, control)
    return control


def test_nonfinite_guard_names_the_batches_of_the_streak():
    guard, state = NonFiniteGuard(2, judge_grads=True), _State()
    assert not _step(guard, state, ["a", "b"]).should_training_stop
    assert not _step(guard, state, ["c"], loss=float("nan")).should_training_stop  # step 2: skipped, streak of 1
    assert not _step(guard, state, ["d"]).should_training_stop  # a good step ends the streak
    assert guard.run == [] and guard.skipped_total == 1
    guard.note_batch(["e1"])  # gradient accumulation: two micro-batches in step 4
    control = _step(guard, state, ["e2"], loss=float("inf"))
    assert not control.should_training_stop and guard.run == ["step 4: loss inf (rank 0); batches: rank 0 [e1, e2]"]
    control = _step(guard, state, ["f"], norm=float("nan"))
    assert control.should_training_stop and control.should_save and guard.skipped_total == 3
    with pytest.raises(TrainingStopped) as e:
        guard.raise_if_tripped("out", 5)
    msg = str(e.value)
    assert ("2 non-finite steps in a row (guards.max_consecutive_nonfinite 2): steps 4-5 non-finite: "
            "step 4: loss inf (rank 0); batches: rank 0 [e1, e2] | step 5: gradient norm nan; batches: rank 0 [f]") in msg
    assert "checkpoint-5" in msg and "[c]" not in msg  # step 2 was not part of the streak
