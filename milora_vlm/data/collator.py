"""Batching tokenised conversations, images or not.

HF LLaVA takes `pixel_values` only for the images present, concatenated in order, and checks that their number of
features equals the number of image tokens in `input_ids`; samples without an image simply add no pixels. A batch
with no image at all carries no `pixel_values`, except with `vision_keepalive` (see below).

Packing (`packing=True`, the recipe's data.packing): instead of padding every sample to the batch's longest, the
batch's samples are laid end to end in rows, without an attention mask but with `position_ids` that restart at 0
for each sample. transformers reads that layout as packed sequences (masking_utils.find_packed_sequence_indices
for eager / sdpa, modeling_flash_attention_utils._is_packed_sequence for flash-attention, which needs a single row)
and confines attention to each sample; rotary positions are those the sample would have had alone. As in
transformers' DataCollatorWithFlattening, each sample's first label is IGNORE_INDEX, so no sample's last token is
trained to predict the next sample's first (that label is never a target on the padded path either, where the
shift drops it). pixel_values follow the image tokens in row-major order, which is the order LLaVA's masked_scatter
fills them in, so every image's features land on its own tokens. The batch is the same samples as on the padded
path: same labels, same supervised tokens, so the token-averaged loss is the padded loss. Under sdpa the pipeline
also switches attention to one call per sample (milora_vlm.model.packed_attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .skips import SkipRecord
from .templates import IGNORE_INDEX

# Batch key carrying the skipped records (and the ids of those used) to the trainer (popped before the model sees
# the batch).
SKIPS_KEY = "skipped_samples"


@dataclass
class BatchSkips:
    """What the batch stands for: `samples` records were looked at (one per row: a bad record's row holds the next
    trainable one), `skipped` of them could not be used, `notes` were used but changed (answer_truncated);
    `records` names the ones the batch's rows came from, in row order (their id, or file:line), for the non-finite
    guard."""

    samples: int
    skipped: list[SkipRecord] = field(default_factory=list)
    records: list[str] = field(default_factory=list)
    notes: list[SkipRecord] = field(default_factory=list)


@dataclass
class ConversationCollator:
    """Right-pads input_ids (pad id), labels (IGNORE_INDEX) and builds the attention mask.

    vision_keepalive (for LLaVA under several processes): when a batch has no image, one blank image is added and
    its image tokens are written into padding slots (attention mask 0, label IGNORE_INDEX; the batch grows by at
    most ceil(image_tokens / batch) columns). The vision tower and projector then run on every rank at every step,
    in the same order as for image batches: ZeRO-3 gathers their partitioned weights collectively, so a rank that
    skipped them would hang the others, and a trainable projector gets a (zero) gradient on every rank. Those slots
    are after every real token of their row, so no real token attends to them: loss and gradients are unchanged.
    """

    pad_token_id: int
    image_token_id: Optional[int] = None
    num_image_tokens: int = 0
    image_shape: Optional[tuple[int, int, int]] = None  # (3, H, W) of the blank image
    vision_keepalive: bool = False
    packing: bool = False
    # Packed rows hold at most this many tokens (None: the whole batch in one row); see packed_row_tokens.
    row_tokens: Optional[int] = None

    def __call__(self, features: list[dict]) -> dict:
        batch = self._packed(features) if self.packing else self._padded(features)
        skipped = [s for f in features for s in f.get("skipped", ())]
        records = [str(f["record"]) for f in features if "record" in f]
        notes = [s for f in features for s in f.get("notes", ())]
        batch[SKIPS_KEY] = BatchSkips(samples=len(features), skipped=skipped, records=records, notes=notes)
        return batch

    def _padded(self, features: list[dict]) -> dict:
        lengths = [int(f["input_ids"].shape[0]) for f in features]
        width = max(lengths)
        pixels = [f["pixel_values"] for f in features if "pixel_values" in f]
        keepalive = self.vision_keepalive and not pixels
        if keepalive:
            free = sum(width - n for n in lengths)
            if free < self.num_image_tokens:
                width += math.ceil((self.num_image_tokens - free) / len(features))
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (f, n) in enumerate(zip(features, lengths)):
            input_ids[row, :n] = f["input_ids"]
            labels[row, :n] = f["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        elif keepalive:
            remaining = self.num_image_tokens
            for row, n in enumerate(lengths):  # row-major, as LLaVA's masked_scatter fills image features
                take = min(width - n, remaining)
                input_ids[row, n : n + take] = self.image_token_id
                remaining -= take
            batch["pixel_values"] = torch.zeros((1, *self.image_shape))
        return batch

    def _packed(self, features: list[dict]) -> dict:
        # Written here because transformers' DataCollatorWithFlattening makes one row only and knows no pixel_values.
        segments = [(f["input_ids"], f["labels"]) for f in features]
        keepalive = self.vision_keepalive and not any("pixel_values" in f for f in features)
        if keepalive:  # the blank image's tokens as a segment of their own: no real token can attend to them
            ids = torch.full((self.num_image_tokens,), self.image_token_id, dtype=torch.long)
            segments.append((ids, torch.full_like(ids, IGNORE_INDEX)))
        rows = pack_rows([int(ids.shape[0]) for ids, _ in segments], self.row_tokens)
        width = max(sum(int(segments[i][0].shape[0]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        pixels = []
        for r, row in enumerate(rows):
            col = 0
            for i in row:
                ids, lab = segments[i]
                n = int(ids.shape[0])
                input_ids[r, col : col + n] = ids
                labels[r, col + 1 : col + n] = lab[1:]
                position_ids[r, col : col + n] = torch.arange(n)
                if i < len(features) and "pixel_values" in features[i]:
                    pixels.append(features[i]["pixel_values"])
                col += n
            position_ids[r, col:] = torch.arange(width - col)  # the row's padding: one more segment
        # use_cache False: transformers reads position_ids as packed sequences only when no KV cache is made (a
        # model in train mode without gradient checkpointing would otherwise make one and attend across samples).
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        elif keepalive:
            batch["pixel_values"] = torch.zeros((1, *self.image_shape))
        return batch


def packed_row_tokens(max_length: int, attn_implementation: Optional[str] = None) -> Optional[int]:
    """The packed row capacity the pipeline uses. flash-attention: None (one row; it reads packed sequences from
    position_ids only in a single row). Otherwise two max-length samples' worth: wider rows balance better (on an
    LLaVA-665K-like mix, 8 samples a batch, rows of 2048 tokens are ~0.95 useful, rows of 4096 ~0.99;
    bench/packing.py), while transformers still builds a row x row mask, and eager attention computes all of it."""
    return None if "flash" in str(attn_implementation) else 2 * max_length


def pack_rows(lengths: list[int], capacity: Optional[int] = None) -> list[list[int]]:
    """Which samples go in which row (each row lists its samples in batch order). capacity None: one row.

    The rows are padded to the longest, so the layout minimises rows x longest row: for each row count that can
    hold the batch, the samples are dealt longest first to the row with the fewest tokens, then single moves and
    swaps out of the longest row shorten it while they can. Hand-written: neither transformers nor TRL packs a
    fixed set of samples into several balanced rows (TRL's best-fit packing fills rows from a whole dataset)."""
    if capacity is None:
        return [list(range(len(lengths)))]
    if max(lengths) > capacity:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a packed row of {capacity}")
    best: Optional[tuple[int, list[list[int]]]] = None
    for k in range(max(1, math.ceil(sum(lengths) / capacity)), len(lengths) + 1):
        if best is not None and k * max(lengths) >= best[0]:
            break  # no layout with more rows can be smaller
        rows, width = _balanced_rows(lengths, k)
        if width <= capacity and (best is None or k * width < best[0]):
            best = (k * width, rows)
    return [sorted(row) for row in best[1]]


def _balanced_rows(lengths: list[int], k: int) -> tuple[list[list[int]], int]:
    rows: list[list[int]] = [[] for _ in range(k)]
    totals = [0] * k
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(k), key=totals.__getitem__)
        rows[r].append(i)
        totals[r] += lengths[i]
    while True:  # each change lowers the longest row's total, so this ends
        m = max(range(k), key=totals.__getitem__)
        change = next(((r, a, b) for r in range(k) if r != m for a in rows[m] for b in [None, *rows[r]]
                       if 0 < lengths[a] - (0 if b is None else lengths[b]) < totals[m] - totals[r]), None)
        if change is None:
            return rows, totals[m]
        r, a, b = change
        d = lengths[a] - (0 if b is None else lengths[b])
        rows[m].remove(a)
        rows[r].append(a)
        if b is not None:
            rows[r].remove(b)
            rows[m].append(b)
        totals[m] -= d
        totals[r] += d
