"""Batching tokenised conversations, images or not.

HF LLaVA takes `pixel_values` only for the images present, concatenated in order, and checks that their number of
features equals the number of image tokens in `input_ids`; samples without an image simply add no pixels. A batch
with no image at all carries no `pixel_values`, except with `vision_keepalive` (see below).
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

    def __call__(self, features: list[dict]) -> dict:
        skipped = [s for f in features for s in f.get("skipped", ())]
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
        records = [str(f["record"]) for f in features if "record" in f]
        notes = [s for f in features for s in f.get("notes", ())]
        batch[SKIPS_KEY] = BatchSkips(samples=len(features), skipped=skipped, records=records, notes=notes)
        return batch
