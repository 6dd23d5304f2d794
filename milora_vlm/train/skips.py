"""Counting the records that training passed over, per reason, across dataloader workers and ranks.

Skips travel inside the batches (milora_vlm.data.collator.BatchSkips), so a dataloader worker process never has
to share a counter; each rank's trainer adds them up here and `totals()` gathers every rank's counts when the
trainer logs (all ranks log at the same steps). Records that could not even be parsed are found while loading
the file, identically on every rank, and are counted once.

`last_totals` / `last_examples` (from the latest `totals()`) feed the max-skip-fraction guard (guards.py).
Records trained on but changed (notes: answer_truncated, an answer cut by max_length) are counted alongside,
logged as `changed/<reason>`; they are not skips and do not count against the guard.
"""

from __future__ import annotations

import logging
from collections import Counter

from milora_vlm import dist as ranks
from milora_vlm.data.collator import BatchSkips
from milora_vlm.data.skips import SkipRecord

logger = logging.getLogger(__name__)


class SkipCounter:
    def __init__(self, load_skips: list[SkipRecord] = (), log_first: int = 3):
        self.samples = 0
        self.reasons: Counter = Counter()
        self.notes: Counter = Counter()
        self.last_notes: Counter = Counter()
        self.log_first = log_first
        self._load = Counter(s.reason for s in load_skips)
        self._load_n = len(load_skips)
        self._logged: Counter = Counter()
        # A few example records per reason (file:line id), for the max-skip-fraction error.
        self.examples: dict[str, list[str]] = {}
        for s in load_skips:
            self._example(s)
        self.last_totals: tuple[int, Counter] = (self._load_n, Counter(self._load))
        self.last_examples: dict[str, list[str]] = dict(self.examples)

    def _example(self, s: SkipRecord) -> None:
        shown = self.examples.setdefault(s.reason, [])
        if len(shown) < self.log_first:
            shown.append(s.describe())

    def update(self, batch: BatchSkips | None) -> None:
        if batch is None:
            return
        self.samples += batch.samples
        for s in batch.notes:
            self.notes[s.reason] += 1
            if self.notes[s.reason] == 1:
                logger.warning("trained on a changed record %s (further ones of this kind are only counted)", s.describe())
        for s in batch.skipped:
            self.reasons[s.reason] += 1
            self._example(s)
            if self._logged[s.reason] < self.log_first:
                self._logged[s.reason] += 1
                more = " (further ones of this reason are only counted)" if self._logged[s.reason] == self.log_first else ""
                logger.warning("skipped record %s%s", s.describe(), more)

    def totals(self) -> tuple[int, Counter]:
        """(records looked at, skips by reason) summed over all ranks; a collective call under torch.distributed."""
        # load-time skips are on rank 0's counter only: they join its share, so every rank gets the same totals
        # (the skip guard takes the same decision everywhere)
        samples, reasons, examples = self.samples + self._load_n, self.reasons + self._load, dict(self.examples)
        notes = Counter(self.notes)
        if ranks.world_size() > 1:
            gathered = ranks.gather_object((samples, dict(reasons), examples, dict(notes)))
            samples, reasons, examples, notes = 0, Counter(), {}, Counter()
            for s, r, e, n in gathered:
                samples += s
                reasons.update(r)
                notes.update(n)
                for reason, shown in e.items():
                    examples.setdefault(reason, []).extend(x for x in shown if x not in examples.get(reason, []))
        self.last_totals, self.last_examples, self.last_notes = (samples, reasons), examples, notes
        return self.last_totals

    @staticmethod
    def fraction(samples: int, reasons: Counter) -> float:
        return sum(reasons.values()) / samples if samples else 0.0

    def log_entries(self) -> dict[str, float]:
        """Scalars for the trainer's log (and TensorBoard): totals so far, per reason, and the skipped fraction."""
        samples, reasons = self.totals()
        out = {"skipped/total": float(sum(reasons.values())), "skipped/fraction": self.fraction(samples, reasons)}
        out.update({f"skipped/{reason}": float(n) for reason, n in sorted(reasons.items())})
        out.update({f"changed/{reason}": float(n) for reason, n in sorted(self.last_notes.items())})
        return out
