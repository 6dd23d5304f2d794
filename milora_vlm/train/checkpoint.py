"""Which checkpoint to resume from: `--resume_from_checkpoint DIR | auto`.

A checkpoint directory (checkpoint-N) is complete when it holds everything needed to evaluate it and to resume:
weights (PEFT adapter, or the full model for adapter-free runs), the resolved recipe, the trainer state (written
last by the Trainer) and the optimizer state (DeepSpeed's `latest` + its global_step folder, or optimizer.pt).
`auto` picks the highest complete one and starts fresh when there is none.

Saving is not atomic in the Trainer (every rank writes its own files into checkpoint-N; rank 0's trainer state may
land before another rank's RNG state), so MiLoRATrainer has every rank write into OUTPUT/.saving/checkpoint-N
(STAGING_DIR) and, once all have finished, moves it to OUTPUT/checkpoint-N with one rename (`publish`). A save
killed at any point never leaves a half-written checkpoint-N; what it left in .saving is never looked at by `auto`
(only checkpoint-N folders count) and is removed by the next save (`clear_staging`). `missing_parts` still catches
other damage (files deleted by hand, a disk that filled up).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Optional

import yaml

from milora_vlm.config import RECIPE_FILENAME, RESUME_AUTO, ConfigError, Recipe

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING_DIR = ".saving"  # under output_dir; hidden, and not a checkpoint-N name, so nothing resumes from it
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def missing_parts(path: str) -> list[str]:
    """What a checkpoint directory lacks to be complete ([] when complete)."""
    missing = []
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        missing.append("weights (adapter_model.safetensors or model.safetensors)")
    for name in (RECIPE_FILENAME, "trainer_state.json"):
        if not os.path.isfile(os.path.join(path, name)):
            missing.append(name)
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):  # DeepSpeed: `latest` names the tag folder holding model + optimizer shards
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        if not os.path.isdir(os.path.join(path, tag)):
            missing.append(f"DeepSpeed state folder {tag}")
    elif not os.path.isfile(os.path.join(path, "optimizer.pt")):
        missing.append("optimizer state (DeepSpeed `latest` or optimizer.pt)")
    return missing


def staging_dir(output_dir: str) -> str:
    return os.path.join(output_dir, STAGING_DIR)


def clear_staging(output_dir: str) -> None:
    """Remove what killed saves left in the staging folder (one process per filesystem, before a save starts)."""
    shutil.rmtree(staging_dir(output_dir), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def publish(staged: str, target: str) -> None:
    """Move a finished checkpoint folder from the staging folder to its place, replacing an older one of that name.

    A directory rename cannot replace a non-empty directory, so an existing target is first moved aside into the
    staging folder (a kill in between leaves no checkpoint-N at all: `auto` takes an older one), then removed.
    """
    parent = os.path.dirname(os.path.abspath(target))
    old = None
    if os.path.lexists(target):
        old = os.path.join(os.path.dirname(staged), f"replaced-{os.path.basename(target)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staged, target)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
