"""Side concerns of training, as Trainer callbacks: the loss-curve PNG, the note on a stitched learning-rate
schedule after a resume, and (for tests) reference logits."""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LOSS_CURVE = "loss_curve.png"
REFERENCE_LOGITS = "reference_logits.pt"
# Test hook: with MILORA_REFERENCE_LOGITS=N in the environment, the run saves the trained model's logits on its
# first N training records (eval mode) to output_dir/reference_logits.pt, so a test can check that the saved
# checkpoint reloads into the same function.
REFERENCE_ENV = "MILORA_REFERENCE_LOGITS"


def save_loss_curve(log_history: list[dict], path: str, title: str = "") -> bool:
    """Plot training loss (and learning rate) against step from the Trainer's log history; False if nothing logged."""
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*points)
    ax.plot(steps, losses, marker="o" if len(points) < 50 else None, label="training loss")
    skipped = [h["step"] for h in log_history if "nonfinite_steps_in_interval" in h and "step" in h]
    if skipped:  # logged intervals with non-finite (skipped) steps: marked, never drawn as a loss
        ax.plot(skipped, [min(losses)] * len(skipped), "x", color="red", linestyle="none",
                label="non-finite steps skipped")
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lrs = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h and "step" in h]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="gray", alpha=0.5, linestyle="--", label="learning rate")
        ax2.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class LossCurveCallback(TrainerCallback):
    def __init__(self, title: str = ""):
        self.title = title

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, LOSS_CURVE)
            if save_loss_curve(state.log_history, path, self.title):
                logger.info("loss curve written to %s", path)


class StitchedScheduleNote(TrainerCallback):
    """Says so when a resumed run's total steps differ from its checkpoint's.

    The Trainer builds the scheduler for the new total and then loads the checkpoint's step count into it, so the
    learning rate followed the old schedule up to the checkpoint and follows the new one from there: a stitched
    curve (for cosine: a jump at the checkpoint), not what a fresh run of the new length would use.
    """

    def __init__(self, checkpoint: str, saved_max_steps: int):
        self.checkpoint, self.saved_max_steps = checkpoint, saved_max_steps
        self.message: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps != self.saved_max_steps and state.is_world_process_zero:
            self.message = (
                f"resuming from {self.checkpoint}, saved by a run of {self.saved_max_steps} steps, with {state.max_steps} "
                f"steps now: the {args.lr_scheduler_type} learning-rate schedule is stitched (the old one up to the "
                f"checkpoint, the new {state.max_steps}-step one from there). For one schedule over {state.max_steps} "
                "steps, start a new output_dir instead of resuming"
            )
            logger.warning(self.message)


class ReferenceLogitsCallback(TrainerCallback):
    """Logits of the trained model on a fixed batch (the same on every rank, so ZeRO-3's gathers line up)."""

    def __init__(self, dataset, collator, count: int):
        self.dataset, self.collator, self.count = dataset, collator, count

    @torch.no_grad()
    def on_train_end(self, args, state, control, model=None, **kwargs):
        batch = self.collator([self.dataset[i] for i in range(min(self.count, len(self.dataset)))])
        batch.pop("skipped_samples", None)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}  # use_cache
        logits = model(**inputs).logits.float().cpu()
        model.train(was_training)
        if state.is_world_process_zero:
            torch.save({"batch": batch, "logits": logits}, os.path.join(args.output_dir, REFERENCE_LOGITS))


class StartupTimes(TrainerCallback):
    """Where a run's start-up goes, logged once (rank 0) after the first step and read by bench/startup.py:
    imports = process start to `mark("imports")`; then each `mark(phase)` since the previous one; the DeepSpeed
    engine / ZeRO set-up (inside Trainer.train, before on_train_begin) and the first step."""

    LOG_PREFIX = "start-up seconds:"

    def __init__(self):
        import psutil  # a DeepSpeed dependency

        self.process_start = psutil.Process().create_time()
        self.last = self.process_start
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        import time

        now = time.time()
        self.phases[phase] = round(now - self.last, 2)
        self.last = now

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark("engine_and_zero_init")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.mark("first_step")
            if state.is_world_process_zero:
                import json

                logger.info("%s %s", self.LOG_PREFIX, json.dumps(self.phases))
