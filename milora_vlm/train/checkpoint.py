"""Which checkpoint to resume from: `--resume_from_checkpoint DIR | auto`.

A checkpoint directory (checkpoint-N) is complete when it holds everything needed to evaluate it and to resume:
weights (PEFT adapter, or the full model for adapter-free runs), the resolved recipe, the trainer state (written
last by the Trainer) and the optimizer state (DeepSpeed's `latest` + its global_step folder, or optimizer.pt).
`auto` picks the highest complete one and starts fresh when there is none.

Saving is not atomic in the Trainer (every rank writes its own files into checkpoint-N; rank 0's trainer state may
land before another rank's RNG state), so MiLoRATrainer puts SAVING_MARKER into checkpoint-N before any rank writes
and removes it (one atomic unlink) only after every rank has finished. A save killed at any point leaves the
marker, which `missing_parts` reports and `auto` passes over.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Optional

import yaml

from milora_vlm.config import RECIPE_FILENAME, RESUME_AUTO, ConfigError, Recipe

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SAVING_MARKER = "SAVE_IN_PROGRESS"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def missing_parts(path: str) -> list[str]:
    """What a checkpoint directory lacks to be complete ([] when complete)."""
    missing = []
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        missing.append("weights (adapter_model.safetensors or model.safetensors)")
    for name in (RECIPE_FILENAME, "trainer_state.json"):
        if not os.path.isfile(os.path.join(path, name)):
            missing.append(name)
    if os.path.exists(os.path.join(path, SAVING_MARKER)):
        missing.append(f"a finished save ({SAVING_MARKER} is still there: the save was interrupted)")
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):  # DeepSpeed: `latest` names the tag folder holding model + optimizer shards
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        if not os.path.isdir(os.path.join(path, tag)):
            missing.append(f"DeepSpeed state folder {tag}")
    elif not os.path.isfile(os.path.join(path, "optimizer.pt")):
        missing.append("optimizer state (DeepSpeed `latest` or optimizer.pt)")
    return missing


def begin_save(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, SAVING_MARKER), "w", encoding="utf-8") as f:
        f.write("checkpoint being written; removed when every rank has finished\n")
        f.flush()
        os.fsync(f.fileno())


def end_save(path: str) -> None:
    os.remove(os.path.join(path, SAVING_MARKER))


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of checkpoint-N folders in output_dir, ascending."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_complete_checkpoint(output_dir: str) -> Optional[str]:
    for step, path in reversed(checkpoints(output_dir)):
        missing = missing_parts(path)
        if not missing:
            return path
        logger.warning("checkpoint %s is incomplete (missing %s); looking at older ones", path, ", ".join(missing))
    return None


def resolve_resume(value: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint to resume from, or None to start fresh."""
    if value is None:
        if checkpoints(output_dir):
            logger.warning(
                "%s already holds checkpoints; this run starts fresh and will overwrite them "
                "(pass --resume_from_checkpoint auto to continue instead)", output_dir
            )
        return None
    if value == RESUME_AUTO:
        path = latest_complete_checkpoint(output_dir)
        logger.info("resume auto: %s", f"continuing from {path}" if path else f"no complete checkpoint in {output_dir}, starting fresh")
        return path
    missing = missing_parts(value)
    if missing:
        raise ConfigError(f"training.resume_from_checkpoint: {value} is incomplete, it lacks {', '.join(missing)}")
    return value


# Sections that must not change between a checkpoint and the run that resumes it.
_MUST_MATCH = ("model", "adapter", "trainable")


def check_resume_compatible(recipe: Recipe, checkpoint: str) -> None:
    """A resumed run must train the same thing: same model, adapter and trainable sections as the checkpoint."""
    with open(os.path.join(checkpoint, RECIPE_FILENAME), encoding="utf-8") as f:
        saved = yaml.safe_load(f) or {}
    now = recipe.to_dict()
    for section in _MUST_MATCH:
        if saved.get(section) != now[section]:
            old, new = saved.get(section) or {}, now[section] or {}
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) if isinstance(old, dict) and isinstance(new, dict) else [section]
            raise ConfigError(
                f"cannot resume from {checkpoint}: its recipe's `{section}` differs from this one in {keys} "
                "(resume with the same settings, or start a new output_dir)"
            )
