"""Padding-free (packed) batches against the padded ones: same labels, same logits per sample, same loss."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

from milora_vlm.data.collator import SKIPS_KEY, ConversationCollator, pack_rows
from milora_vlm.data.dataset import ConversationDataset
from milora_vlm.data.templates import IGNORE_INDEX
from milora_vlm.model.packed_attention import PACKED_SDPA, use_packed_sdpa

IMAGE_TOKENS = 16  # tiny LLaVA: 32x32 image, patch 8, CLS dropped


def conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


RECORDS = [  # different images and lengths, text-only records between the image ones
    {"id": "a", "image": "red.png", "conversations": conv("<image>\nWhat color is the shape?", "red")},
    {"id": "b", "conversations": conv("What is 2 plus 3? " * 6, "5")},
    {"id": "c", "image": "blue.png", "conversations": conv("<image>\nIs there a circle?", "no, a square")},
    {"id": "d", "conversations": conv("Say yes.", "yes")},
    {"id": "e", "image": "green.png", "conversations": conv("<image>\nColor?", "green " * 5)},
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_llava_dir):
    root = tmp_path_factory.mktemp("pack")
    for name, rgb in (("red", (200, 30, 30)), ("blue", (0, 0, 255)), ("green", (0, 160, 0))):
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    return ConversationDataset(
        str(root / "d.jsonl"), proc.tokenizer, "vicuna_v1", 256, image_folder=str(root),
        image_processor=proc.image_processor, image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"),
        num_image_tokens=IMAGE_TOKENS,
    )


def collators(tokenizer, **kw):
    pad = tokenizer.pad_token_id
    return ConversationCollator(pad_token_id=pad, **kw), ConversationCollator(pad_token_id=pad, packing=True, **kw)


def spans(batch):
    """(row, start, length) of each sample in a packed batch: a segment starts where position_ids restart at 0.
    The row's trailing padding (pad ids) is left out."""
    out = []
    for r, pos in enumerate(batch["position_ids"].tolist()):
        starts = [c for c, p in enumerate(pos) if p == 0] + [len(pos)]
        out += [(r, s, e - s) for s, e in zip(starts, starts[1:])]
    return out


def assert_packed_matches_padded(model, padded, packed, n_samples):
    padded = {k: v for k, v in padded.items() if k != SKIPS_KEY}
    packed = {k: v for k, v in packed.items() if k != SKIPS_KEY}
    assert "attention_mask" not in packed  # transformers detects packing only without a 2D mask
    lengths = padded["attention_mask"].sum(1).tolist()
    segs = spans(packed)
    # samples in batch order within each row; the padded row of each packed sample, by length and content
    order = []
    for r, s, n in segs:
        match = [i for i in range(n_samples) if i not in order and lengths[i] == n
                 and torch.equal(padded["input_ids"][i, :n], packed["input_ids"][r, s : s + n])]
        if match:
            order.append(match[0])
            # labels: the padded row's, but the first (never a target there: the shift drops it) is ignored
            assert packed["labels"][r, s] == IGNORE_INDEX
            assert torch.equal(packed["labels"][r, s + 1 : s + n], padded["labels"][match[0], 1:n])
        else:  # padding, or the keepalive image's segment
            assert (packed["labels"][r, s : s + n] == IGNORE_INDEX).all()
    assert sorted(order) == list(range(n_samples))
    # the Trainer's token count for the loss average (labels shifted by one) is the same
    assert packed["labels"][:, 1:].ne(IGNORE_INDEX).sum() == padded["labels"][:, 1:].ne(IGNORE_INDEX).sum()

    def run(batch):
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), out.logits.detach(), grads

    loss_a, logits_a, grads_a = run(padded)
    loss_b, logits_b, grads_b = run(packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    k = 0
    for r, s, n in segs:  # each sample's logits as if it were alone: attention, positions, image features
        if k < len(order) and lengths[order[k]] == n and torch.equal(padded["input_ids"][order[k], :n], packed["input_ids"][r, s : s + n]):
            torch.testing.assert_close(logits_b[r, s : s + n], logits_a[order[k], :n], rtol=1e-4, atol=1e-5)
            k += 1
    assert k == n_samples
    assert grads_a.keys() <= grads_b.keys()  # + the vision tower's and projector's, with a keepalive image
    assert all(grads_b[name].abs().max() == 0 for name in grads_b.keys() - grads_a.keys())
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
@pytest.mark.parametrize("row_tokens", [None, 300])  # one row (flash-attention's layout), several rows
def test_packed_llava_batch_equals_padded(dataset, tiny_llava_dir, attn, row_tokens):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, attn_implementation="eager" if attn == "eager" else "sdpa")
    assert use_packed_sdpa(model) == (attn != "eager")
    if attn == "sdpa":  # transformers' own mask-based packing
        model.config.get_text_config()._attn_implementation = "sdpa"
    model.model.multi_modal_projector.requires_grad_(True)
    padded_c, packed_c = collators(dataset.tokenizer, image_token_id=dataset.image_token_id, num_image_tokens=IMAGE_TOKENS,
                                   image_shape=(3, 32, 32), row_tokens=row_tokens)
    samples = [dataset[i] for i in range(len(RECORDS))]
    padded, packed = padded_c(samples), packed_c(samples)
    if row_tokens is not None:
        assert packed["input_ids"].shape[0] > 1 and packed["input_ids"].shape[1] <= row_tokens
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert packed[SKIPS_KEY].records == padded[SKIPS_KEY].records == ["a", "b", "c", "d", "e"]
    assert_packed_matches_padded(model, padded, packed, len(samples))


def test_packed_keepalive_image_changes_nothing(dataset, tiny_llava_dir):
    """Several ranks, a text-only batch: the blank image's tokens are a segment of their own."""
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    _, packed_c = collators(dataset.tokenizer, image_token_id=dataset.image_token_id, num_image_tokens=IMAGE_TOKENS,
                            image_shape=(3, 32, 32), row_tokens=300)
    samples = [dataset[1], dataset[3]]
    plain = ConversationCollator(pad_token_id=dataset.tokenizer.pad_token_id)(samples)
    kept = ConversationCollator(**{**packed_c.__dict__, "vision_keepalive": True})(samples)
    assert kept["pixel_values"].shape == (1, 3, 32, 32)
    assert int((kept["input_ids"] == dataset.image_token_id).sum()) == IMAGE_TOKENS
    assert_packed_matches_padded(model, plain, kept, len(samples))


def test_packed_causal_lm_batch_equals_padded(tiny_causal_lm_dir):
    from milora_vlm.data.templates import encode_conversation

    tok = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_causal_lm_dir, attn_implementation="sdpa")
    assert use_packed_sdpa(model)
    samples = []
    for q, a in [("What is 2 plus 3?", "5"), ("Say yes " * 9, "yes yes"), ("Hi", "the answer is 42")]:
        enc = encode_conversation(tok, "vicuna_v1", conv(q, a))
        samples.append({"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels)})
    padded_c, packed_c = collators(tok)
    assert_packed_matches_padded(model, padded_c(samples), packed_c(samples), len(samples))


def test_pack_rows_balances_and_respects_capacity():
    lengths = [700, 650, 90, 1200, 40, 300, 2048, 610, 55, 980]
    rows = pack_rows(lengths, 2048)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    totals = [sum(lengths[i] for i in row) for row in rows]
    assert max(totals) <= 2048 and len(rows) == 4  # ceil(6673 / 2048): no more rows than needed here
    assert all(row == sorted(row) for row in rows)
    assert pack_rows(lengths) == [list(range(len(lengths)))]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([10, 3000], 2048)
