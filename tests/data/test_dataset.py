"""The training dataset, collator, sampler and skip counting (tiny LLaVA, no network)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from milora_vlm.data.collator import SKIPS_KEY, ConversationCollator
from milora_vlm.data.dataset import ConversationDataset, NoTrainableRecords
from milora_vlm.data.templates import IGNORE_INDEX
from milora_vlm.train.sampler import ModalityLengthGroupedSampler
from milora_vlm.train.skips import SkipCounter

IMAGE_TOKENS = 16  # tiny LLaVA: 32x32 image, patch 8, CLS dropped


def conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "red.png")
    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    wide.save(root / "wide.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def make_dataset(path, processor, images, max_length=256, aspect="pad", vision=True):
    return ConversationDataset(
        path, processor.tokenizer, "vicuna_v1", max_length,
        image_folder=str(images),
        image_processor=processor.image_processor if vision else None,
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>") if vision else None,
        num_image_tokens=IMAGE_TOKENS if vision else 0,
        image_aspect_ratio=aspect,
    )


def test_mixed_batch_feeds_hf_llava(tmp_path, processor, images, tiny_llava_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "image": "red.png", "conversations": conv("<image>\nWhat color?", "red")},
        {"id": "b", "conversations": conv("What is 2 plus 3?", "5")},
        {"id": "c", "image": "wide.png", "conversations": conv("What color is it?", "blue")},  # placeholder added
    ])
    ds = make_dataset(path, processor, images)
    samples = [ds[i] for i in range(3)]
    assert all(s["skipped"] == [] for s in samples)
    assert "pixel_values" in samples[0] and "pixel_values" not in samples[1] and "pixel_values" in samples[2]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((samples[2]["input_ids"] == image_id).sum()) == IMAGE_TOKENS
    batch = ConversationCollator(pad_token_id=processor.tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch[SKIPS_KEY].samples == 3 and batch[SKIPS_KEY].skipped == []
    lengths = [len(s["input_ids"]) for s in samples]
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        answer = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert processor.tokenizer.decode(answer).strip().startswith(["red", "5", "blue"][row])
    batch.pop(SKIPS_KEY)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)


def test_pad_resize_native(tmp_path, processor, images):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "w", "image": "wide.png", "conversations": conv("<image>\nColor?", "blue")}])
    pix = {a: make_dataset(path, processor, images, aspect=a)[0]["pixel_values"] for a in ("pad", "resize", "native")}
    # pad: a 40x20 image becomes 40x40 with mean-colour bands above and below, which normalise to ~0
    assert pix["pad"][:, :4].abs().max() < 0.02
    # resize: stretched, so the top rows are image (blue), not padding
    assert pix["resize"][:, :4].abs().max() > 0.5
    assert not torch.allclose(pix["pad"], pix["resize"]) and pix["native"].shape == pix["pad"].shape


def test_skips_are_counted_by_reason_with_file_line_and_id(tmp_path, processor, images):
    long_q = "word " * 300
    records = [
        {"id": "ok1", "conversations": conv("What is 1 plus 1?", "2")},
        {"id": "missing", "image": "nope.png", "conversations": conv("<image>\nColor?", "red")},
        {"id": "corrupt", "image": "broken.png", "conversations": conv("<image>\nColor?", "red")},
        {"id": "toolong", "conversations": conv(long_q, "yes")},
        {"id": "twoimg", "image": "red.png", "conversations": conv("<image> and <image>", "red")},
        {"id": "roles", "conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "q"}]},
        {"id": "noconv", "conversations": "hello"},
        {"id": "ok2", "image": "red.png", "conversations": conv("<image>\nColor?", "red")},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records, raw_lines=['{"id": "cut", "conversations": [', '[1, 2]'])
    ds = make_dataset(path, processor, images, max_length=160)
    assert len(ds) == 8
    assert [(s.reason, s.where.endswith(f"line {n}")) for s, n in zip(ds.load_skips, (9, 10))] == [
        ("malformed_record", True), ("malformed_record", True)]
    sample = ds[1]  # records 2-7 are all bad: record 2 is reported, and ok2 stands in for it
    assert int((sample["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == IMAGE_TOKENS
    got = [(s.reason, s.record_id, s.where.rsplit(":", 1)[1]) for s in sample["skipped"]]
    assert got == [("missing_image", "missing", "line 2")] and sample["record"] == "ok2"
    got = [(s.reason, s.record_id, s.where.rsplit(":", 1)[1]) for i in range(2, 7) for s in ds[i]["skipped"]]
    assert got == [
        ("corrupt_image", "corrupt", "line 3"),
        ("answer_truncated", "toolong", "line 4"),
        ("image_placeholder_count", "twoimg", "line 5"),
        ("roles_not_alternating", "roles", "line 6"),
        ("bad_conversations", "noconv", "line 7"),
    ]
    assert "nope.png" in sample["skipped"][0].detail
    # image cut by truncation: max_length smaller than the image's tokens
    no_system = {"id": "short", "conversations": [{"from": "system", "value": ""}, *conv("1 plus 1?", "2")]}
    short = make_dataset(write_jsonl(tmp_path / "s.jsonl", [records[7], no_system]), processor, images, max_length=50)
    assert [s.reason for s in short[0]["skipped"]] == ["image_truncated"]
    # a text-only model skips image records
    text = make_dataset(write_jsonl(tmp_path / "t.jsonl", [records[7], records[0]]), processor, images, vision=False)
    assert [s.reason for s in text[0]["skipped"]] == ["image_without_vision_model"]

    collate = ConversationCollator(pad_token_id=processor.tokenizer.pad_token_id)
    counter = SkipCounter(ds.load_skips)
    for i in range(len(ds)):
        counter.update(collate([ds[i]])[SKIPS_KEY])
    samples, reasons = counter.totals()
    # each bad record is counted once, however many are in a row (six here)
    assert dict(reasons) == {"malformed_record": 2, "missing_image": 1, "corrupt_image": 1, "answer_truncated": 1,
                             "image_placeholder_count": 1, "roles_not_alternating": 1, "bad_conversations": 1}
    entries = counter.log_entries()
    assert entries["skipped/total"] == sum(reasons.values()) == 8
    assert entries["skipped/fraction"] == pytest.approx(8 / 10)
    assert samples == len(ds) + len(ds.load_skips) == 10


def test_all_bad_data_is_an_error(tmp_path, processor, images):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": str(i), "image": "nope.png", "conversations": conv("<image>\nq", "a")} for i in range(3)])
    ds = make_dataset(path, processor, images)
    with pytest.raises(NoTrainableRecords, match="none of the 3 records .* By reason: missing_image: 3"):
        ds[0]
    with pytest.raises(NoTrainableRecords, match="By reason: malformed_record: 1"):
        make_dataset(write_jsonl(tmp_path / "e.jsonl", [], raw_lines=["{"]), processor, images)


def test_vision_keepalive_changes_nothing_but_runs_the_tower(tmp_path, processor, images, tiny_llava_dir):
    """A text-only batch with the keepalive image gives the same loss and gradients (projector: zero gradient)."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "conversations": conv("What is 2 plus 3?", "5")},
        {"id": "b", "conversations": conv("What is 4 plus 4? Say it with words please", "8")},
    ])
    ds = make_dataset(path, processor, images)
    common = dict(pad_token_id=processor.tokenizer.pad_token_id, image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
                  num_image_tokens=IMAGE_TOKENS, image_shape=(3, 32, 32))
    plain = ConversationCollator(**common)([ds[0], ds[1]])
    kept = ConversationCollator(**common, vision_keepalive=True)([ds[0], ds[1]])
    assert "pixel_values" not in plain and kept["pixel_values"].shape == (1, 3, 32, 32)
    assert int((kept["input_ids"] == common["image_token_id"]).sum()) == IMAGE_TOKENS
    assert int(kept["attention_mask"].sum()) == int(plain["attention_mask"].sum())
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    model.model.multi_modal_projector.requires_grad_(True)

    def loss_and_grads(batch):
        model.zero_grad()
        batch = {k: v for k, v in batch.items() if k != SKIPS_KEY}
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = loss_and_grads(plain)
    loss_b, grads_b = loss_and_grads(kept)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    proj = [n for n in grads_b if "multi_modal_projector" in n]
    assert proj and all(grads_b[n].abs().max() == 0 for n in proj)
    for n, g in grads_a.items():
        torch.testing.assert_close(g, grads_b[n], rtol=1e-4, atol=1e-6)


def test_modality_grouped_sampler():
    lengths = [10 + i if i % 3 else -(5 + i) for i in range(50)]  # 16 text-only (negative), 34 image
    batch, world = 2, 2
    s = ModalityLengthGroupedSampler(lengths, batch_size=batch, world_size=world, seed=7)
    s.set_epoch(0)
    order = list(s)
    assert sorted(order) == list(range(50))
    assert order == list(s)  # same epoch, same order (resume-safe)
    s.set_epoch(1)
    assert list(s) != order
    megas = [order[i : i + batch * world] for i in range(0, 50, batch * world)]
    mixed = [m for m in megas if len({lengths[i] > 0 for i in m}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] == megas[-1])
    counts = Counter(len(m) for m in megas[:-1])
    assert set(counts) == {batch * world}
