"""Hostile inputs (issue 15): decompression bombs and extreme aspect ratios, image paths out of the image folder,
runs of bad records, null turns and non-UTF-8 bytes, answers cut by max_length, recipe mistakes that used to be
found only after loading, disk full, and DeepSpeed's shared-memory buffer of a one-process run.

Every hostile file is generated here, a few bytes each.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from milora_vlm.config import ConfigError, load_recipe
from milora_vlm.data.collator import SKIPS_KEY, ConversationCollator
from milora_vlm.data.dataset import ConversationDataset
from milora_vlm.data.images import expand_to_square, load_image, mean_color, process_images
from milora_vlm.data.records import iter_records
from milora_vlm.data.skips import SkipSample
from milora_vlm.model.tiny import tiny_image_processor
from milora_vlm.train.guards import DiskFull, check_skip_fraction, naming_disk_full
from milora_vlm.train.skips import SkipCounter
from tests.helpers import REPO
from tests.data.test_data_prep import llava_instruct  # the data_prep script, imported once by its tests

IMAGE_TOKENS = 17  # tiny_llava_dir: (32 / 8)^2 patches + CLS


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixel data (57 bytes): PIL opens it lazily."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_jsonl(path, records, raw: bytes = b"") -> str:
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(raw)
    return str(path)


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_dir)


def dataset(path, processor, folder, max_length=256, **kw) -> ConversationDataset:
    return ConversationDataset(path, processor.tokenizer, "vicuna_v1", max_length, image_folder=str(folder),
                               image_processor=processor.image_processor,
                               image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
                               num_image_tokens=IMAGE_TOKENS, **kw)


# ---- 1: bombs, pixel limit, bounded padding ------------------------------------------------------------------------

def test_bomb_images_are_bad_records_naming_the_limit(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20000, 20000))  # 57 bytes; PIL raises DecompressionBombError, not an OSError
    assert bomb.stat().st_size < 100
    with pytest.raises(SkipSample, match="exceeds limit.*max_image_pixels 40000000") as e:
        load_image(str(bomb))
    assert e.value.reason == "image_too_large"
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(8000, 6000))  # 48 MP: over the default limit, under PIL's
    with pytest.raises(SkipSample, match="8000x6000 = 48000000 pixels > max_image_pixels 40000000") as e:
        load_image(str(big))
    assert e.value.reason == "image_too_large"
    with pytest.raises(SkipSample) as e:  # the limit is configurable: past it, this header-only file fails to decode
        load_image(str(big), max_pixels=50_000_000)
    assert e.value.reason == "corrupt_image"
    # without a limit of ours, PIL's warning (over Image.MAX_IMAGE_PIXELS, under its error) refuses the same way
    warn = tmp_path / "warn.png"
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    warn.write_bytes(png_header_only(side, side))
    with pytest.raises(SkipSample, match="decompression bomb") as e:
        load_image(str(warn), max_pixels=None)
    assert e.value.reason == "image_too_large"


def test_bomb_in_training_and_data_prep_is_counted(tmp_path, processor):
    (tmp_path / "bomb.png").write_bytes(png_header_only(20000, 20000))
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "bomb", "image": "bomb.png", "conversations": conv("<image>\nq", "a")},
                                              {"id": "ok", "image": "ok.png", "conversations": conv("<image>\nq", "a")}])
    sample = dataset(path, processor, tmp_path)[0]
    assert [(s.reason, s.record_id) for s in sample["skipped"]] == [("image_too_large", "bomb")]
    assert sample["record"] == "ok"
    code = llava_instruct.main(["--input", path, "--image-folder", str(tmp_path), "--output", str(tmp_path / "o.jsonl"),
                                "--workers", "0"])
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert code == 0 and report["dropped_by_reason"] == {"image_too_large": 1}
    assert report["issues"][0]["line"] == 1 and "max_image_pixels" in report["issues"][0]["detail"]


def test_padding_is_bounded_by_the_processor_size(tmp_path, monkeypatch):
    """A 20000x1 PNG (a few bytes) once made a 20000x20000 canvas; nothing larger than the output is built now."""
    Image.new("1", (20000, 1)).save(tmp_path / "line.png")
    assert (tmp_path / "line.png").stat().st_size < 200
    img = load_image(str(tmp_path / "line.png"))
    made = []
    real_new = Image.new

    def spy(mode, size, *a, **kw):
        made.append(size)
        assert size[0] * size[1] <= 64 * 64, f"a {size} canvas for a 32x32 output"
        return real_new(mode, size, *a, **kw)

    monkeypatch.setattr(Image, "new", spy)
    p = tiny_image_processor(32)
    for mode in ("pad", "native", "resize"):
        assert process_images([img], p, mode).shape == (1, 3, 32, 32)


def test_bounded_padding_equals_llavas_expand2square_up_to_resampling():
    """LLaVA pads to the long side, then resizes; shrinking first, then padding, gives the same picture but for the
    image's border rows or columns (placed to the nearest pixel instead of a fraction of one)."""
    p = tiny_image_processor(32)
    for size in [(300, 200), (20, 50), (100, 60), (1000, 999)]:
        img = Image.new("RGB", size, (200, 30, 30))
        reference = p(images=[expand_to_square(img, mean_color(p))], return_tensors="pt")["pixel_values"][0]
        ours = process_images([img], p, "pad")[0]
        diff = (reference - ours).abs()
        assert diff.mean() < 0.05, size
        torch.testing.assert_close(ours[:, 14:18, 14:18], reference[:, 14:18, 14:18])  # the image itself
        torch.testing.assert_close(ours[:, :2, :2], reference[:, :2, :2])  # the padding (or image) corner
        off_rows, off_cols = (diff > 0.05).any(0).any(1).sum(), (diff > 0.05).any(0).any(0).sum()
        assert min(off_rows, off_cols) <= 6, size  # 2-3 border lines on each side of the image, no more
        gradient = Image.linear_gradient("L").resize(size).convert("RGB")  # native: centre square, then processor
        native = (p(images=[gradient], return_tensors="pt")["pixel_values"] - process_images([gradient], p, "native"))
        assert native.abs().mean() < 0.02, size
    small = Image.linear_gradient("L").resize((16, 8)).convert("RGB")  # nothing to shrink: identical to LLaVA's order
    torch.testing.assert_close(process_images([small], p, "pad"),
                               p(images=[expand_to_square(small, mean_color(p))], return_tensors="pt")["pixel_values"])


# ---- 7: image paths confined to image_folder -----------------------------------------------------------------------

@pytest.fixture
def escapes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "in.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "secret.png")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    records = [{"id": name, "image": image, "conversations": conv("<image>\nq", "a")} for name, image in
               [("dotdot", "../secret.png"), ("absolute", str(tmp_path / "secret.png")), ("symlink", "link.png"),
                ("inside", "in.png")]]
    return folder, write_jsonl(tmp_path / "d.jsonl", records)


def test_image_paths_outside_the_folder_are_skipped_in_training(escapes, processor):
    folder, path = escapes
    ds = dataset(path, processor, folder)
    got = [(s.record_id, s.reason) for i in range(len(ds)) for s in ds[i]["skipped"]]
    assert got == [("dotdot", "image_outside_folder"), ("absolute", "image_outside_folder"),
                   ("symlink", "image_outside_folder")]
    assert "allow_images_outside_folder" in ds[0]["skipped"][0].detail
    opened = dataset(path, processor, folder, allow_images_outside_folder=True)
    assert all(opened[i]["skipped"] == [] for i in range(len(opened)))


def test_image_paths_outside_the_folder_are_dropped_by_data_prep(escapes, tmp_path):
    folder, path = escapes
    args = ["--input", path, "--image-folder", str(folder), "--workers", "0"]
    assert llava_instruct.main([*args, "--output", str(tmp_path / "o.jsonl")]) == 0
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["dropped_by_reason"] == {"image_outside_folder": 3} and report["records_kept"] == 1
    assert llava_instruct.main([*args, "--output", str(tmp_path / "p.jsonl"), "--allow-images-outside-folder"]) == 0
    assert json.loads((tmp_path / "p.report.json").read_text())["records_kept"] == 4


# ---- 2: each bad record counted once --------------------------------------------------------------------------------

def test_a_run_of_bad_records_is_counted_once_each(tmp_path, tiny_tokenizer):
    good = {"conversations": conv("What color?", "red")}
    records = [dict(good, id="g0"), *({"id": f"b{i}", "conversations": []} for i in range(64)), dict(good, id="g1")]
    ds = ConversationDataset(write_jsonl(tmp_path / "d.jsonl", records), tiny_tokenizer, "vicuna_v1", 256)
    collate, counter = ConversationCollator(pad_token_id=0), SkipCounter(ds.load_skips)
    for start in range(0, len(ds), 4):  # 64 in a row: no error, each counted once
        counter.update(collate([ds[i] for i in range(start, min(start + 4, len(ds)))])[SKIPS_KEY])
    samples, reasons = counter.totals()
    assert (samples, dict(reasons)) == (66, {"bad_conversations": 64})
    # 2.5% bad records in a row stay 2.5%: under a 5% limit, as when they are scattered
    records = [dict(good, id=f"g{i}") for i in range(78)] + [{"id": f"b{i}", "conversations": []} for i in range(2)]
    ds = ConversationDataset(write_jsonl(tmp_path / "e.jsonl", records), tiny_tokenizer, "vicuna_v1", 256)
    counter = SkipCounter()
    counter.update(collate([ds[i] for i in range(len(ds))])[SKIPS_KEY])
    samples, reasons = counter.totals()
    assert sum(reasons.values()) / samples == 2 / 80
    check_skip_fraction(samples, reasons, counter.last_examples, len(ds), 0.05)  # does not stop


def test_all_bad_file_stops_with_exit_3(tmp_path, tiny_causal_lm_dir, capsys):
    from milora_vlm.train.pipeline import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": f"b{i}", "conversations": [None]} for i in range(5)])
    code = main(["--config", "configs/tiny/causal_lm_alpaca_milora.yaml", "--deepspeed", "null", "--model.path",
                 str(tiny_causal_lm_dir), "--data.train_file", bad, "--output_dir", str(tmp_path / "out"),
                 "--max_steps", "2", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    assert "train_vlm: stopped: none of the 5 records" in err and "bad_turn: 5" in err and "bad.jsonl:line 1" in err


# ---- 3: null turns and non-UTF-8 bytes -----------------------------------------------------------------------------

def test_null_turn_and_non_utf8_byte_are_counted_skips_in_training(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "null", "conversations": [None, {"from": "gpt", "value": "a"}]},
                                              {"id": "ok", "conversations": conv("q", "a")}],
                       raw=b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}\n')
    ds = ConversationDataset(path, tiny_tokenizer, "vicuna_v1", 256)
    assert [(s.reason, s.where.rsplit(":", 1)[1]) for s in ds.load_skips] == [("malformed_record", "line 3")]
    assert "not UTF-8: byte 0xe9" in ds.load_skips[0].detail
    skipped = ds[0]["skipped"]
    assert [(s.reason, s.record_id) for s in skipped] == [("bad_turn", "null")]
    assert "'conversations'[0] is NoneType" in skipped[0].detail


def test_non_utf8_byte_is_a_report_entry_in_data_prep(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"id": "ok", "conversations": conv("q", "a")}],
                        raw=b'{"id": "bad", "conversations": [{"from": "human", "value": "\xff"}]}\n')
    assert llava_instruct.main(["--input", jsonl, "--output", str(tmp_path / "o.jsonl"), "--workers", "0"]) == 0
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["dropped_by_reason"] == {"not_utf8": 1} and report["issues"][0]["line"] == 2
    array = tmp_path / "a.json"
    array.write_bytes(b'[{"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},\n'
                      b' {"id": "bad\x80"}]')
    assert [(i, err) for i, _, err in iter_records(array)] == [(1, None), (2, "not UTF-8: byte 0x80")]


def test_non_utf8_byte_in_the_converters(tmp_path, capsys):
    from tests.data.test_data_prep_converters import commonsense, vqa

    array = tmp_path / "commonsense_170k.json"  # one bad record of an array: a report entry, the rest converted
    array.write_bytes(b'[{"instruction": "q\xe9", "input": "", "output": "a"},\n'
                      b' {"instruction": "q", "input": "", "output": "a"}]')
    assert commonsense.main(["--input", str(array), "--output", str(tmp_path / "cs.jsonl")]) == 0
    report = json.loads((tmp_path / "cs.report.json").read_text())
    assert report["dropped_by_reason"] == {"not_utf8": 1} and report["issues"][0]["index"] == 1
    assert report["records_kept"] == 1
    questions = tmp_path / "gqa.json"  # one JSON document: a clear file error (exit 2), not a traceback
    questions.write_bytes(b'{"1": {"imageId": "n1", "question": "caf\xe9?", "answer": "yes"}}')
    assert vqa.main(["--format", "gqa", "--questions", str(questions), "--output", str(tmp_path / "g.jsonl")]) == 2
    assert "not UTF-8: byte 0xe9" in capsys.readouterr().err


# ---- 10: answers cut by max_length ----------------------------------------------------------------------------------

def test_truncated_answer_is_kept_and_counted(tmp_path, tiny_tokenizer):
    long_answer = " ".join(["red green blue"] * 40)
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "long", "conversations": conv("What color?", long_answer)},
                                              {"id": "short", "conversations": conv("What color?", "red")}])
    limit = len(ConversationDataset(path, tiny_tokenizer, "vicuna_v1", 4096)[1]["input_ids"]) + 5
    ds = ConversationDataset(path, tiny_tokenizer, "vicuna_v1", limit)
    long, short = ds[0], ds[1]
    assert len(long["input_ids"]) == limit and long["labels"][-1] != tiny_tokenizer.eos_token_id  # EOS lost
    assert [(n.reason, n.record_id) for n in long["notes"]] == [("answer_truncated", "long")]
    assert f"max_length {limit}" in long["notes"][0].detail and short["notes"] == []
    counter = SkipCounter()
    counter.update(ConversationCollator(pad_token_id=0)([long, short])[SKIPS_KEY])
    entries = counter.log_entries()
    assert entries["changed/answer_truncated"] == 1.0 and entries["skipped/total"] == 0.0


# ---- 8: recipe mistakes stop at start --------------------------------------------------------------------------------

@pytest.fixture
def recipe_file(tmp_path, tiny_causal_lm_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "conversations": conv("q", "a")}])
    raw = yaml.safe_load((REPO / "configs/tiny/causal_lm_alpaca_milora.yaml").read_text())
    raw.pop("bootstrap")
    raw["model"]["path"], raw["data"]["train_file"] = str(tiny_causal_lm_dir), data
    raw["training"]["output_dir"] = str(tmp_path / "out")
    raw["deepspeed"] = None

    def write(mutate=None, text=None, deepspeed=None) -> str:
        r = json.loads(json.dumps(raw))
        if deepspeed is not None:
            ds = tmp_path / "ds.json"
            ds.write_text(json.dumps(deepspeed))
            r["deepspeed"] = str(ds)
        if mutate:
            mutate(r)
        path = tmp_path / "r.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(r, sort_keys=False))
        return str(path)

    write.raw = raw
    return write


@pytest.mark.parametrize("key, value, message", [
    ("fp16", True, "training.fp16 and training.bf16 are both true"),
    ("learning_rate", -1e-4, "training.learning_rate: -0.0001 is negative"),
    ("per_device_train_batch_size", 0, "training.per_device_train_batch_size: 0 must be at least 1"),
    ("num_train_epochs", 0, "training.num_train_epochs: 0.0 trains nothing"),
])
def test_training_values_that_do_nothing_or_fail_late_stop_at_start(recipe_file, key, value, message):
    def mutate(r):
        r["training"][key] = value
        if key == "fp16":
            r["training"]["bf16"] = True
        if key == "num_train_epochs":
            r["training"].pop("max_steps")

    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe_file(mutate))


def test_output_dir_that_is_a_file_or_unwritable_stops_at_start(recipe_file, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="training.output_dir: .*afile' is a file"):
        load_recipe(recipe_file(lambda r: r["training"].update(output_dir=str(tmp_path / "afile"))))
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        ro.chmod(0o555)
        if os.access(ro, os.W_OK):
            pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        with pytest.raises(ConfigError, match=r"training.output_dir: cannot write in .*ro'.*Read-only|Permission"):
            load_recipe(recipe_file(lambda r: r["training"].update(output_dir=str(ro / "run"))))
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)


def test_duplicate_yaml_key_stops_at_start(recipe_file):
    text = Path(recipe_file()).read_text().replace("  r: 8\n", "  r: 8\n  r: 4\n", 1)
    assert text.count("  r: ") == 2
    with pytest.raises(ConfigError, match=r"key 'r' is given twice \(lines \d+ and \d+\)"):
        load_recipe(recipe_file(text=text))


def test_deepspeed_misspelled_key_and_bool_stage_stop_at_start(recipe_file):
    base = json.loads((REPO / "configs/zero2.json").read_text())
    misspelled = {("zero_optimisation" if k == "zero_optimization" else k): v for k, v in base.items()}
    with pytest.raises(ConfigError, match="unknown top-level key 'zero_optimisation'; did you mean 'zero_optimization'"):
        load_recipe(recipe_file(deepspeed=misspelled))
    bool_stage = dict(base, zero_optimization=dict(base["zero_optimization"], stage=True))
    with pytest.raises(ConfigError, match="zero_optimization.stage True is not one of 0, 1, 2, 3"):
        load_recipe(recipe_file(deepspeed=bool_stage))
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):  # the shipped configs pass
        load_recipe(recipe_file(deepspeed=json.loads((REPO / "configs" / name).read_text())))


# ---- 9: disk full, DeepSpeed's shm buffer ---------------------------------------------------------------------------

def test_disk_full_names_enospc_and_the_path(tmp_path, monkeypatch):
    full = tmp_path / "full"
    full.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],
                                                   capture_output=True).returncode == 0
    if not mounted:  # simulate what torch.save reports on a full disk, and a file system with no space left
        import shutil

        def failing_save(*a, **kw):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

        monkeypatch.setattr(torch, "save", failing_save)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 16, 1 << 16, 0))
    target = full / "checkpoint-3"
    try:
        with pytest.raises(DiskFull, match=rf"ENOSPC\) while saving to {target}.*unexpected pos") as e:
            with naming_disk_full(str(target)):
                target.mkdir()
                torch.save({"w": torch.zeros(100_000)}, target / "weights.pt")
        assert e.value.errno == 28 and e.value.filename == str(target)
    finally:
        if mounted:  # lazily: the failed writer's file may still be open until garbage collection
            subprocess.run(["umount", "-l", str(full)], check=True)
    with pytest.raises(RuntimeError, match="not about space"):  # other errors pass through unchanged
        with naming_disk_full(str(tmp_path)):
            raise RuntimeError("not about space")


@pytest.mark.slow
def test_training_onto_a_full_disk_names_enospc_and_the_path(tmp_path, tiny_causal_lm_dir, capsys):
    from milora_vlm.train.pipeline import main

    full = tmp_path / "full"
    full.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(full)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs a small tmpfs mount (root)")
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"r{i}", "conversations": conv("What is 2 plus 3?", "5")}
                                              for i in range(8)])
    try:
        code = main(["--config", "configs/tiny/causal_lm_alpaca_milora.yaml", "--deepspeed", "null", "--model.path",
                     str(tiny_causal_lm_dir), "--data.train_file", data, "--output_dir", str(full / "out"),
                     "--max_steps", "2", "--save_steps", "1", "--report_to", "none"])
    finally:
        subprocess.run(["umount", "-l", str(full)], check=True)
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert f"train_vlm: error: no space left on device (ENOSPC) while saving to {full / 'out'}" in err


def test_one_process_deepspeed_builds_no_shm_op_and_leaves_no_shm_buffer(tmp_path):
    """DeepSpeed's CPU shared-memory all-reduce op (a g++ build at first start, and a 66 MB /dev/shm buffer per rank
    it never unlinks; training does not use it) is neither built nor started; the deepspeed launcher sets
    LOCAL_SIZE, with which one local rank maps the buffer too."""
    code = ("import os; from milora_vlm.train import distributed; distributed.init_distributed(True); "
            "from deepspeed.comm import comm; print('PORT', os.environ['MASTER_PORT'], 'OP', comm.cdb.shm_comm_op)")
    env = dict(os.environ, LOCAL_SIZE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port, op = proc.stdout.split("PORT ")[1].split()[0], proc.stdout.split(" OP ")[1].split()[0]
    assert op == "None" and "shm_comm_op built" not in proc.stdout + proc.stderr
    left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    for f in left:  # this test's own leftovers (named by its port)
        os.unlink(f)
    assert not left


# ---- hostile JSON text, paths and lengths (2026-11-30 audit) ---------------------------------------------------------

GOOD = {"id": "ok", "conversations": conv("q", "a")}


def test_hostile_jsonl_lines_cost_their_record_only(tmp_path, monkeypatch, tiny_tokenizer):
    from milora_vlm import jsontext

    monkeypatch.setattr(jsontext, "MAX_LINE_BYTES", 300_000)  # the over-long line's bound, small for the test
    lines = [b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
             b'{"id": "surrogate", "conversations": [{"from": "human", "value": "\\ud800"}]}',
             b'{"id": "dup", "id": "dup2", "conversations": []}',
             b'{"id": "long", "pad": "' + b"x" * 400_000 + b'"}',
             b'{"id": "cut", "conversations": [']
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD], raw=b"\n".join(lines) + b"\n" + json.dumps(GOOD).encode() + b"\n")
    got = [(pos, err) for pos, _, err in iter_records(path)]
    assert [pos for pos, err in got if err is None] == [1, 7]
    errors = dict((pos, err) for pos, err in got if err is not None)
    assert errors[2].startswith("malformed JSON: nested too deeply")
    assert "lone surrogate" in errors[3] and "duplicate key 'id'" in errors[4]
    assert errors[5] == "malformed JSON: a line longer than 300,000 bytes"  # (64 MiB by default)
    assert errors[6] == "malformed JSON: Expecting value at column 33"  # the cut line's own column, not line 2's
    ds = ConversationDataset(path, tiny_tokenizer, "vicuna_v1", 256)  # training counts the same five
    assert len(ds) == 2 and [s.where.rsplit(" ", 1)[1] for s in ds.load_skips] == ["2", "3", "4", "5", "6"]


def test_hostile_json_array_elements(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"id": "ok"}, {"id": "dup", "id": "x"}, {"v": "\\udfff"}, {"id": "ok2"}]')
    assert [(i, err) for i, _, err in iter_records(path)] == [
        (1, None), (2, "malformed JSON: duplicate key 'id' in an object"),
        (3, "malformed JSON: a \\u escape of a lone surrogate (not a character; not valid UTF-8)"), (4, None)]
    path.write_text('[{"id": "ok"}, ' + "[" * 100_000 + "]" * 100_000 + "]")
    from milora_vlm.data.records import RecordFileError

    with pytest.raises(RecordFileError, match="a.json: malformed JSON \\(nested too deeply\\) at line 1"):
        list(iter_records(path))


def test_utf16_file_is_one_clear_error(tmp_path):
    from milora_vlm.data.records import RecordFileError

    for name in ("d.jsonl", "d.json"):
        (tmp_path / name).write_bytes(json.dumps(GOOD).encode("utf-16"))
        with pytest.raises(RecordFileError, match=f"{name}: the file is UTF-16 .*re-save it as UTF-8"):
            list(iter_records(tmp_path / name))


def test_nul_in_an_image_path_is_a_bad_image_field(tmp_path, processor):
    from milora_vlm.data.images import resolve_image_path

    with pytest.raises(SkipSample) as info:
        resolve_image_path("ok.png\x00x", str(tmp_path), confine=True)
    assert info.value.reason == "bad_image_field" and "NUL" in info.value.detail
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "nul", "image": "ok.png\x00x", "conversations": conv("<image>\nq", "a")},
                                              GOOD])
    assert [(s.record_id, s.reason) for s in dataset(path, processor, tmp_path)[0]["skipped"]] == [("nul", "bad_image_field")]
    assert llava_instruct.main(["--input", path, "--output", str(tmp_path / "o.jsonl"), "--image-folder", str(tmp_path),
                                "--workers", "0"]) == 0
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["dropped_by_reason"] == {"bad_image_field": 1} and report["records_kept"] == 1


@pytest.fixture(params=["byte-level BPE", "sentencepiece"])
def any_tokenizer(request, tiny_tokenizer, llama_sp_tokenizer):
    """The tiny byte-level BPE, and a Llama-type sentencepiece tokenizer (its own fixture: legacy true and false)."""
    return tiny_tokenizer if request.param == "byte-level BPE" else llama_sp_tokenizer


def test_a_huge_turn_is_cut_before_the_tokenizer_sees_it(any_tokenizer, monkeypatch):
    from milora_vlm.data import templates

    seen = []
    real = templates._target_flags
    monkeypatch.setattr(templates, "_target_flags", lambda tok, text, spans: seen.append(len(text)) or real(tok, text, spans))
    huge = conv("What is this?", "red green blue " * 300_000)  # 4.5 M characters
    enc = templates.encode_conversation(any_tokenizer, "vicuna_v1", huge, max_length=128)
    budget = 129 * templates.max_chars_per_token(any_tokenizer)
    assert len(enc.input_ids) == 128 and max(seen) <= budget < 100_000
    # what is kept is what tokenising everything and truncating keeps
    short = conv("What is this?", "red green blue " * 300)
    full = templates.encode_conversation(any_tokenizer, "vicuna_v1", short)
    assert len(full.input_ids) > 128 and enc.input_ids == full.input_ids[:128] and enc.labels == full.labels[:128]
    with pytest.raises(SkipSample, match="characters: more than max length 128") as info:
        templates.encode_conversation(any_tokenizer, "vicuna_v1", huge, max_length=128, too_long="drop")
    assert info.value.reason == "too_long"
    with pytest.raises(SkipSample) as info:  # an image placeholder past the cut can never fit
        templates.encode_conversation(any_tokenizer, "vicuna_v1", conv("x " * 100_000 + "<image>\nq", "a"),
                                      image_token_id=5, num_image_tokens=4, max_length=128)
    assert info.value.reason == "image_truncated"


def test_sixteen_bit_and_float_grey_images_keep_their_contrast(tmp_path):
    import numpy as np

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")  # opens as I;16
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f.tiff")  # opens as F, values in [0, 1]
    for name in ("g16.png", "f.tiff"):
        got = np.asarray(load_image(str(tmp_path / name)), dtype=np.float64)[..., 0]
        assert abs(got.mean() - 127.5) < 1 and got.min() == 0 and got.max() == 255, name  # not clipped to white / black
    Image.linear_gradient("L").save(tmp_path / "l.png")  # 8-bit: PIL's own conversion, untouched
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "l.png"))),
                          np.asarray(Image.open(tmp_path / "l.png").convert("RGB")))


def test_unreadable_training_file_stops_with_exit_2_naming_it(tmp_path, tiny_causal_lm_dir, capsys):
    from milora_vlm.train.pipeline import main

    data = tmp_path / "utf16.jsonl"
    data.write_bytes(json.dumps(GOOD).encode("utf-16"))
    code = main(["--config", "configs/tiny/causal_lm_alpaca_milora.yaml", "--deepspeed", "null", "--model.path",
                 str(tiny_causal_lm_dir), "--data.train_file", str(data), "--output_dir", str(tmp_path / "out"),
                 "--max_steps", "2", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2 and f"train_vlm: error: {data}: the file is UTF-16" in err, err[-2000:]
