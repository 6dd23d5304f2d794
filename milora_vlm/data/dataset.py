"""The training set: LLaVA conversation JSON / JSONL, read once into a compact index, tokenised lazily.

Each record is kept as its JSON text (one string per record: cheap to share with forked dataloader workers) and
turned into tokens, labels and pixels in `__getitem__` through the project's one masking routine,
`milora_vlm.data.templates.encode_conversation`. A record that cannot be trained on (SkipSample: no answer left
after truncation, image cut by truncation, missing, corrupt, oversized or out-of-folder image, bad roles, a null
turn, ...) is never trained as all -100. The sampler asks for each index once per epoch; when index i is bad,
the sample returned carries a `SkipRecord` for record i alone (file:line, id, reason, detail) and is filled with
the next trainable record after it. So each bad record is counted exactly once, however many are in a row (the
records passed over on the way are counted when the sampler asks for them). A sample whose answer was cut by
max_length (its end and EOS lost) is kept and noted ("answer_truncated"). The collator forwards skips and notes in
the batch and the trainer counts them (milora_vlm.train.skips), so the counts survive dataloader worker processes
and add up across ranks. Each sample also names the record it came from (`record`: its id, or file:line when it
has none), so the trainer can say which records made up a batch whose loss or gradients went non-finite
(milora_vlm.train.guards). A file with no trainable record at all raises NoTrainableRecords.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Optional

import torch
from torch.utils.data import Dataset

from .images import DEFAULT_MAX_IMAGE_PIXELS, load_image, resolve_image_path
from .records import iter_records, position_kind
from .skips import SkipRecord, SkipSample
from .templates import (
    HUMAN_ROLES,
    IMAGE_PLACEHOLDER,
    drop_leading_assistant,
    encode_conversation,
    get_template,
    image_to_front,
)

logger = logging.getLogger(__name__)

ESTIMATE_CHARS = 1 << 20  # per turn, for the length estimate: LLaVA-665K's longest turn is ~10 K characters
ANSWER_TRUNCATED = "answer_truncated"  # a kept sample whose answer max_length cut (the skip of the same name: none left)


class NoTrainableRecords(RuntimeError):
    """Not one record of the training file can be trained on; the message gives counts by reason and examples."""


def with_image_placeholder(conversations: list) -> list:
    """LLaVA's repair for an image record whose text has no `<image>`: prepend "<image>\\n" to the first human turn."""
    if any(isinstance(t, dict) and IMAGE_PLACEHOLDER in str(t.get("value", "")) for t in conversations):
        return conversations
    out = [dict(t) if isinstance(t, dict) else t for t in conversations]
    for turn in out:
        if isinstance(turn, dict) and str(turn.get("from", "")).lower() in HUMAN_ROLES:
            turn["value"] = f"{IMAGE_PLACEHOLDER}\n{turn.get('value', '')}"
            break
    return out


class ConversationDataset(Dataset):
    """Tokenised LLaVA conversations (text-only records mixed in freely).

    For a text-only model leave image_processor None: a record with an image is then skipped ("image_without_vision_model").
    Data policy (LLaVA's behaviour by default, see DataSection): too_long "truncate" | "drop";
    leading_assistant "drop_turn" | "skip_record"; image_to_front moves each `<image>` to the front of its turn.
    `lengths` holds LLaVA's cheap length estimate per record (words + image tokens), negative for text-only records,
    for the modality-grouped sampler.
    """

    def __init__(
        self,
        path: str,
        tokenizer,
        template: str,
        max_length: int,
        image_folder: Optional[str] = None,
        image_processor=None,
        image_token_id: Optional[int] = None,
        num_image_tokens: int = 0,
        image_aspect_ratio: str = "pad",
        too_long: str = "truncate",
        leading_assistant: str = "drop_turn",
        image_to_front: bool = True,
        max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
        allow_images_outside_folder: bool = False,
    ):
        self.path = os.fspath(path)
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.max_length = max_length
        self.image_folder = image_folder
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.image_aspect_ratio = image_aspect_ratio
        self.too_long = too_long
        self.leading_assistant = leading_assistant
        self.image_to_front = image_to_front
        self.max_image_pixels = max_image_pixels
        self.confine_images = not allow_images_outside_folder
        self._kind = position_kind(self.path)
        self._raw: list[str] = []
        self._pos: list[int] = []
        self.lengths: list[int] = []
        self._bad: dict[int, SkipRecord] = {}  # indices found untrainable in this process (so none is encoded twice)
        # Records that could not even be parsed (counted once, at load time).
        self.load_skips: list[SkipRecord] = []
        for pos, rec, err in iter_records(self.path):
            if err is not None:
                self.load_skips.append(SkipRecord("malformed_record", err, self._where(pos)))
                continue
            self._raw.append(json.dumps(rec, ensure_ascii=False))
            self._pos.append(pos)
            self.lengths.append(self._estimate_length(rec))
        if not self._raw:
            raise NoTrainableRecords(self._none_trainable(self.load_skips))
        for s in self.load_skips[:5]:
            logger.warning("skipping unreadable record %s", s.describe())

    def _where(self, pos: int) -> str:
        return f"{self.path}:{self._kind} {pos}"

    def _estimate_length(self, rec: dict) -> int:
        """LLaVA's estimate: words of all turns (+ image tokens); negative marks a text-only record. Each turn is
        read up to ESTIMATE_CHARS (a multi-megabyte turn would make millions of word strings here, only to sort
        by a length far beyond any max_length)."""
        convs = rec.get("conversations")
        words = sum(len(str(t.get("value", ""))[:ESTIMATE_CHARS].split()) for t in convs
                    if isinstance(t, dict)) if isinstance(convs, list) else 0
        words = max(words, 1)
        return words + self.num_image_tokens if rec.get("image") is not None else -words

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, i: int) -> dict:
        """Record i's sample; when record i is bad, its SkipRecord and the next trainable record's sample."""
        n = len(self._raw)
        skipped: list[SkipRecord] = []
        for attempt in range(n):
            j = (i + attempt) % n
            bad = self._bad.get(j)
            if bad is None:
                rec = json.loads(self._raw[j])
                try:
                    sample = self.encode(rec)
                except SkipSample as e:
                    rid = rec.get("id")
                    bad = self._bad[j] = SkipRecord(e.reason, e.detail, self._where(self._pos[j]),
                                                    None if rid is None else str(rid))
            if bad is not None:
                if attempt == 0:
                    skipped.append(bad)  # only record i is counted here: the others when the sampler asks for them
                continue
            rid = None if rec.get("id") is None else str(rec["id"])
            # a stand-in record's notes are counted when the sampler asks for it
            notes = sample.pop("notes", []) if attempt == 0 else []
            sample["notes"] = [SkipRecord(reason, detail, self._where(self._pos[j]), rid) for reason, detail in notes]
            sample["skipped"] = skipped
            sample["record"] = self._where(self._pos[j]) if rid is None else rid
            return sample
        raise NoTrainableRecords(self._none_trainable(self.load_skips + list(self._bad.values())))

    def _none_trainable(self, skips: list[SkipRecord]) -> str:
        by_reason = ", ".join(f"{r}: {k}" for r, k in sorted(Counter(s.reason for s in skips).items()))
        examples = "; ".join(s.describe() for s in skips[:3])
        return (f"none of the {len(skips)} records of {self.path} can be trained on. By reason: {by_reason}. "
                f"Examples: {examples}. Fix the data (data_prep/llava_instruct.py reports every bad record).")

    def encode(self, rec: dict) -> dict:
        """input_ids, labels (IGNORE_INDEX outside answers) and, for an image record, pixel_values [3, H, W].

        Raises SkipSample naming the field for anything that cannot be trained on.
        """
        convs = rec.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise SkipSample("bad_conversations", "field 'conversations' is missing or not a non-empty list")
        for k, turn in enumerate(convs):  # templates read turns as mappings: a null or scalar turn is a skip here
            if not isinstance(turn, dict):
                raise SkipSample("bad_turn", f"field 'conversations'[{k}] is {type(turn).__name__}, not an object")
        if self.leading_assistant == "drop_turn":
            convs = drop_leading_assistant(convs)
        image = rec.get("image")
        if image is not None:
            if self.image_processor is None:
                raise SkipSample("image_without_vision_model", f"field 'image' = {image!r} but the model has no vision tower")
            if not isinstance(image, str) or not image:
                raise SkipSample("bad_image_field", f"field 'image' must be one path string, got {type(image).__name__}")
            convs = with_image_placeholder(convs)
            if self.image_to_front:
                convs = image_to_front(convs)
        enc = encode_conversation(
            self.tokenizer,
            self.template,
            convs,
            image_token_id=self.image_token_id if image is not None else None,
            num_image_tokens=self.num_image_tokens if image is not None else 0,
            max_length=self.max_length,
            too_long=self.too_long,
        )
        if image is not None and enc.num_images != 1:
            raise SkipSample("image_placeholder_count", f"{enc.num_images} '<image>' placeholders for one image")
        out = {"input_ids": torch.tensor(enc.input_ids, dtype=torch.long), "labels": torch.tensor(enc.labels, dtype=torch.long)}
        if image is not None:
            from .images import process_images  # the pad/resize code shared with generation

            img = load_image(resolve_image_path(image, self.image_folder, self.confine_images), self.max_image_pixels)
            out["pixel_values"] = process_images([img], self.image_processor, self.image_aspect_ratio)[0]
        if enc.target_tokens_cut:  # kept (LLaVA trains such samples too) but counted: the answer lost its end
            out["notes"] = [(ANSWER_TRUNCATED, f"{enc.target_tokens_cut} answer tokens (EOS included) beyond "
                             f"max_length {self.max_length} cut")]
        return out
