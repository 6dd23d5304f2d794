"""Guards that stop a run going wrong quietly (recipe section `guards`).

- Skip fraction: records the dataset passed over at train time (milora_vlm.train.skips) may be at most
  `max_skip_fraction` of what was looked at. Early in a run a couple of bad records are a large fraction of the few
  looked at, so the limit also needs the skips to exceed that fraction of the whole training file.
- Non-finite steps: a micro-step whose loss is NaN/inf on any rank is skipped on every rank (no backward, so no
  optimizer update and no DeepSpeed step); outside fp16 a step whose gradient norm is NaN/inf is skipped as well
  (its gradients are dropped; DeepSpeed's ZeRO optimizer already skips a step with an invalid norm). In fp16
  DeepSpeed's loss scaler owns overflow skips (several in a row are normal while the scale settles), so only the
  loss is judged there. Each skipped step is counted and logged with the ids of the records in every rank's
  batches; `max_consecutive_nonfinite` such steps in a row save a checkpoint of the last good state (skipped steps
  changed nothing) and stop the run with an error naming the steps and those batches.
- Disk full: a save that fails for lack of space ends with DiskFull naming ENOSPC and the path (`naming_disk_full`).

A skipped step is logged as skipped, not as a loss: the Trainer would log such a step as loss 0.0 (its NaN filter
substitutes an average of the interval's steps so far, which is zero at an interval's start). The guard keeps the
loss of the steps that did train in each logging interval (`note_loss`), and `interval_loss` gives the trainer's
log the mean of those (none when every step was skipped) and how many were skipped.

The Trainer has no hook to skip a backward, so MiLoRATrainer asks `NonFiniteGuard.loss_is_finite` in compute_loss
and leaves out the backward itself (milora_vlm.train.trainer).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
from collections import Counter

import torch
from transformers import TrainerCallback

from milora_vlm import dist as ranks

logger = logging.getLogger(__name__)

# Test hook: MILORA_POISON_LOSS_STEPS="3,4" makes rank 0's loss NaN on those (1-based) optimizer steps, so tests can
# exercise the non-finite guard (and the ranks' agreement to skip) without a model that diverges.
POISON_ENV = "MILORA_POISON_LOSS_STEPS"


class TrainingStopped(RuntimeError):
    """A guard stopped the run; the message says why and what was saved."""


def check_skip_fraction(samples: int, reasons: Counter, examples: dict[str, list[str]], file_records: int,
                        max_fraction: float) -> None:
    """Raise TrainingStopped when the skipped records exceed max_fraction of those looked at and of the file."""
    skipped = sum(reasons.values())
    if skipped == 0 or samples == 0:
        return
    if skipped / samples <= max_fraction or skipped <= max_fraction * file_records:
        return
    by_reason = ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items()))
    shown = "; ".join(e for r in sorted(examples) for e in examples[r][:2])
    raise TrainingStopped(
        f"{skipped} of {samples} records looked at were skipped ({100 * skipped / samples:.1f}% > guards.max_skip_fraction "
        f"{100 * max_fraction:.1f}%; the training file has {file_records} records). By reason: {by_reason}. "
        f"Examples: {shown}. Fix the data (data_prep reports every bad record) or raise guards.max_skip_fraction."
    )


def poisoned_steps() -> set[int]:
    value = os.environ.get(POISON_ENV, "").strip()
    return {int(s) for s in value.split(",") if s.strip()} if value else set()


class NonFiniteGuard(TrainerCallback):
    """Counts skipped non-finite steps; N in a row ask the Trainer to save and stop (then `raise_if_tripped`).

    The trainer hands it each micro-batch's record ids (`note_batch`); for a skipped step every rank's ids and
    reasons are gathered, so rank 0's warning and the stopping error name every batch of the streak.
    """

    def __init__(self, max_consecutive: int, judge_grads: bool):
        self.max_consecutive = max_consecutive
        self.judge_grads = judge_grads
        self.skipped_total = 0
        self.run: list[str] = []  # the current streak, one entry per step: "step N: loss nan (rank 0); batches: ..."
        self.run_steps: list[int] = []
        self.tripped: list[str] | None = None
        self.tripped_steps: list[int] = []
        self._bad_this_step: list[str] = []
        self._records_this_step: list[str] = []
        self._nonfinite_step = False
        self._poison = poisoned_steps()
        self._step_loss = 0.0  # this step's loss as the Trainer sums it (micro-steps' returned losses)
        self._interval = [0.0, 0, 0]  # since the last log: loss sum of trained steps, trained steps, skipped steps
        self.last_step_skipped = False

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss * float("nan") if step in self._poison and ranks.rank() == 0 else loss

    def note_batch(self, records) -> None:
        self._records_this_step.extend(records)

    def loss_is_finite(self, loss: torch.Tensor, step: int) -> bool:
        here = not bool(torch.isfinite(loss.detach()).all())
        bad = ranks.any_rank(here, loss.device)  # all ranks must skip the same steps, or collectives hang
        if here:  # only the ranks whose loss went bad say so; the others skip because they agreed to
            self._bad_this_step.append(f"step {step}: loss {loss.detach().float().mean().item()} (rank {ranks.rank()})")
        self._nonfinite_step |= bad
        return not bad

    def grad_norm_is_finite(self, norm: float | None, step: int) -> bool:
        if not self.judge_grads or norm is None or math.isfinite(norm):
            return True
        self._bad_this_step.append(f"step {step}: gradient norm {norm}")  # a global norm: the same on every rank
        self._nonfinite_step = True
        return False

    def note_loss(self, loss: torch.Tensor) -> None:
        """A micro-step's loss as training_step returns it (summed per step, as the Trainer does)."""
        value = float(loss.detach().float().mean())
        self._step_loss += value if math.isfinite(value) else 0.0

    def interval_loss(self, device) -> tuple[float | None, int]:
        """(mean loss of the trained steps since the last call, averaged over ranks, or None; skipped steps) — a
        collective: every rank calls it at the same log."""
        total, trained, skipped = self._interval
        self._interval = [0.0, 0, 0]
        total = ranks.mean_over_ranks(total, device)
        return (total / trained if trained else None), skipped

    def on_step_end(self, args, state, control, **kwargs):
        bad, reasons, records = self._nonfinite_step, self._bad_this_step, self._records_this_step
        self._nonfinite_step, self._bad_this_step, self._records_this_step = False, [], []
        step_loss, self._step_loss = self._step_loss, 0.0
        self.last_step_skipped = bad
        if not bad:  # the same decision on every rank (agreed loss check, global gradient norm)
            self._interval[0] += step_loss
            self._interval[1] += 1
            self.run, self.run_steps = [], []
            return control
        self._interval[2] += 1
        gathered = ranks.gather_object((reasons, records))
        reasons = list(dict.fromkeys(r for rank_reasons, _ in gathered for r in rank_reasons))
        batches = ", ".join(f"rank {i} [{', '.join(ids)}]" for i, (_, ids) in enumerate(gathered))
        self.skipped_total += 1
        self.run.append(f"{'; '.join(reasons)}; batches: {batches}")
        self.run_steps.append(state.global_step)
        logger.warning("skipped a non-finite step (%d in a row, %d in all): %s", len(self.run), self.skipped_total,
                       self.run[-1])
        if len(self.run) >= self.max_consecutive:
            self.tripped, self.tripped_steps = list(self.run), list(self.run_steps)
            control.should_save = True  # skipped steps changed nothing: this is the last good state
            control.should_training_stop = True
        return control

    def raise_if_tripped(self, output_dir: str, step: int) -> None:
        if self.tripped is not None:
            first, last = self.tripped_steps[0], self.tripped_steps[-1]
            steps = f"step {first}" if first == last else f"steps {first}-{last}"
            raise TrainingStopped(
                f"{len(self.tripped)} non-finite steps in a row (guards.max_consecutive_nonfinite "
                f"{self.max_consecutive}): {steps} non-finite: {' | '.join(self.tripped)}. The last good state is saved "
                f"as {os.path.join(output_dir, f'checkpoint-{step}')}; lower the learning rate or check those batches, "
                "then resume with --resume_from_checkpoint auto."
            )


class DiskFull(OSError):
    """No space left while saving; the message names ENOSPC and the path (torch.save only says "unexpected pos")."""


def _is_disk_full(path: str, error: BaseException) -> bool:
    seen = error
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    folder = path
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder) or "."
    return shutil.disk_usage(folder).free < (1 << 20)  # torch.save's writer hides the errno: ask the file system


@contextlib.contextmanager
def naming_disk_full(path: str):
    """Turn a save that failed because the disk is full into DiskFull naming ENOSPC and `path`."""
    try:
        yield
    except Exception as e:  # torch.save raises RuntimeError, safetensors SafetensorError, plain writes OSError
        if isinstance(e, DiskFull) or not _is_disk_full(path, e):
            raise
        raise DiskFull(errno.ENOSPC, f"no space left on device (ENOSPC) while saving to {path} "
                       f"({type(e).__name__}: {e}); free space there or set --output_dir elsewhere, then resume "
                       "with --resume_from_checkpoint auto", path) from e

