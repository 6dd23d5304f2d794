"""Which checkpoint to resume from (`--resume_from_checkpoint DIR | auto`), and whether it can be trusted.

A checkpoint directory (checkpoint-N) is complete when its manifest (MANIFEST, written as the last step of the
save) verifies: every file it lists is present with its size and sha256, no other file is there, and it holds
everything needed to evaluate and resume: weights (PEFT adapter, or the full model for adapter-free runs), the
resolved recipe, the trainer state, the optimizer state (DeepSpeed's `latest` + its tag folder, or
optimizer.pt) and, for every rank whose files land on this disk, its RNG state and ZeRO optimizer shard.
`auto` picks the newest checkpoint that is complete on every rank's disk, naming the ones it skipped and why.

Saving is not atomic in the Trainer (every rank writes its own files into checkpoint-N; rank 0's trainer state may
land before another rank's RNG state), so MiLoRATrainer has every rank write into OUTPUT/.saving/checkpoint-N
(STAGING_DIR) and, once all have finished, one process per disk (the lowest rank writing there: global rank 0 on a
shared disk, each node's local rank 0 on node-local disks; see train/distributed.py `storage_layout`) writes the
manifest and moves the folder to OUTPUT/checkpoint-N with one rename (`publish`). A save killed at any point never
leaves a checkpoint-N with a valid manifest; what it left in .saving is never looked at by `auto` and is removed
by the next save (`clear_staging`).

Trust: checkpoint files are pickles, and unpickling runs code. The manifest refuses any file whose hash differs
from what the save wrote (damage, or a file replaced or planted later), and every pickle of a resume is read with
`weights_only=True` (the Trainer does so for its own files; `trusted_deepspeed_loads` makes DeepSpeed's engine do
so too, with DEEPSPEED_SAFE_GLOBALS as the only classes allowed). The manifest is a checksum, not a signature:
whoever can rewrite it can rewrite the files, which is why the weights-only loading matters (README, "Trust").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Callable, Optional


from milora_vlm import jsontext
from milora_vlm.config import RECIPE_FILENAME, RESUME_AUTO, ConfigError, Recipe, read_yaml

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING_DIR = ".saving"  # under output_dir; hidden, and not a checkpoint-N name, so nothing resumes from it
MANIFEST = "milora_manifest.json"
MANIFEST_FORMAT = 1
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


# ---- what a checkpoint must hold -------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(path: str) -> list[str]:
    """Every file under path, relative, with "/" separators, except the manifest itself."""
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def _deepspeed_tag(path: str, names: set[str]) -> Optional[str]:
    if "latest" not in names:
        return None
    with open(os.path.join(path, "latest"), encoding="utf-8") as f:
        return f.read().strip()


def _shared_parts(path: str, names: set[str], run: dict) -> list[str]:
    """What every disk's copy of a checkpoint needs, whoever wrote it."""
    missing = []
    if not any(f in names for f in WEIGHT_FILES):
        missing.append("weights (adapter_model.safetensors or model.safetensors)")
    missing += [n for n in (RECIPE_FILENAME, "trainer_state.json") if n not in names]
    if run.get("save_only_model"):  # the Trainer writes no optimizer or RNG state then
        return missing
    tag = _deepspeed_tag(path, names)
    if tag is not None:
        if not any(n.startswith(tag + "/") for n in names):
            missing.append(f"DeepSpeed state folder {tag}")
        elif (run.get("zero_stage") or 0) < 3 and f"{tag}/mp_rank_00_model_states.pt" not in names:
            missing.append(f"{tag}/mp_rank_00_model_states.pt")
    elif run.get("deepspeed"):
        missing.append("DeepSpeed state (`latest` and its tag folder)")
    elif "optimizer.pt" not in names:
        missing.append("optimizer state (DeepSpeed `latest` or optimizer.pt)")
    return missing


def _rank_parts(path: str, names: set[str], run: dict, rank: int) -> list[str]:
    """What rank `rank` wrote and needs back to resume: its RNG state, and under ZeRO its optimizer shard (and,
    under ZeRO-3, its model-state shard)."""
    world = run.get("world_size", 1)
    missing = []
    if run.get("save_only_model"):
        return missing
    rng = f"rng_state_{rank}.pth" if world > 1 else "rng_state.pth"
    if rng not in names:
        missing.append(rng)
    tag = _deepspeed_tag(path, names)
    if tag is not None and (run.get("zero_stage") or 0) >= 1:
        shard = re.compile(rf"^{re.escape(tag)}/(bf16_)?zero_pp_rank_{rank}_mp_rank_\d+_optim_states\.pt$")
        if not any(shard.match(n) for n in names):
            missing.append(f"{tag}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt (rank {rank}'s ZeRO optimizer shard)")
        if run["zero_stage"] == 3 and f"{tag}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt" not in names:
            missing.append(f"{tag}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    return missing


def write_deepspeed_latest(path: str) -> None:
    """On a node-local disk, write DeepSpeed's `latest` (the name of the tag folder) where it is missing.

    Hand-written because DeepSpeed 0.19 writes `latest` on global rank 0 only, even with
    checkpoint.use_node_local_storage, so the other nodes' copies could not be loaded by tag."""
    latest = os.path.join(path, "latest")
    tags = [d for d in os.listdir(path) if d.startswith("global_step") and os.path.isdir(os.path.join(path, d))]
    if not os.path.exists(latest) and len(tags) == 1:
        with open(latest, "w", encoding="utf-8") as f:
            f.write(tags[0])


def write_manifest(path: str, run: dict, ranks: list[int]) -> dict:
    """The last step of a save, by the one process that publishes this disk's copy: check that the folder holds
    the shared parts and every part of `ranks` (the ranks whose files land on this disk), then record each file's
    size and sha256 together with `run` (run_signature). Raises RuntimeError if a part is missing: the save failed
    and must not pass for a checkpoint."""
    names = _files(path)
    present = set(names)
    missing = _shared_parts(path, present, run)
    for r in ranks:
        missing += _rank_parts(path, present, run, r)
    if missing:
        raise RuntimeError(f"checkpoint save into {path} is incomplete, it lacks {', '.join(missing)}")
    manifest = {
        "format": MANIFEST_FORMAT,
        "run": run,
        "ranks": sorted(ranks),
        "files": {n: {"size": os.path.getsize(os.path.join(path, n)), "sha256": _sha256(os.path.join(path, n))}
                  for n in names},
    }
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))
    return manifest


def read_manifest(path: str) -> dict:
    """The checkpoint's manifest; ValueError saying why when there is none or it cannot be read."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise ValueError(f"no {MANIFEST} (the save did not finish, or an older version of this project wrote it)")
    try:
        manifest = jsontext.read_object(file, MANIFEST)
    except jsontext.InputFileError as e:
        raise ValueError(f"{MANIFEST} is unreadable ({e})") from None
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise ValueError(f"{MANIFEST} is unreadable ({problem})")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What in a parsed manifest is not what write_manifest writes (None when all is), so nothing later trips."""
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"format {str(manifest.get('format'))[:80]!r}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "`files` is not an object"
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            return f"`files` entry {name[:200]!r} is not {{size, sha256}}"
        if os.path.isabs(name) or ".." in name.split("/"):
            return f"`files` entry {name[:200]!r} leaves the checkpoint directory"
    if not isinstance(manifest.get("run", {}), dict):
        return "`run` is not an object"
    ranks = manifest.get("ranks", [])
    if not (isinstance(ranks, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)):
        return "`ranks` is not a list of integers"
    return None


def missing_parts(path: str, ranks: Optional[list[int]] = None, verify_hashes: bool = True) -> list[str]:
    """What is wrong with a checkpoint directory ([] when complete and intact).

    Checks its manifest: every listed file present with its size and (verify_hashes) sha256, no file it does not
    list, the shared parts, and the parts of `ranks` (default: the ranks the manifest says wrote to this disk)."""
    try:
        manifest = read_manifest(path)
    except ValueError as e:
        return [str(e)]
    listed = manifest["files"]
    problems = []
    on_disk = set(_files(path))
    for name, entry in listed.items():
        file = os.path.join(path, name)
        if name not in on_disk:
            problems.append(f"{name} is missing")
        elif os.path.getsize(file) != entry.get("size"):
            problems.append(f"{name} has {os.path.getsize(file)} bytes, the save wrote {entry.get('size')}")
        elif verify_hashes and _sha256(file) != entry.get("sha256"):
            problems.append(f"{name} differs from what the save wrote (sha256 mismatch)")
    problems += [f"{name} is not in the manifest (not written by the save)" for name in sorted(on_disk - set(listed))]
    if not problems:  # the files are what the save wrote; do they hold all a resume needs?
        names, run = set(listed), manifest.get("run", {})
        if run.get("save_only_model"):
            problems.append("saved with save_only_model: weights only, no optimizer or RNG state to resume")
        problems += _shared_parts(path, names, run)
        for r in manifest.get("ranks", []) if ranks is None else ranks:
            problems += _rank_parts(path, names, run, r)
    return problems


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


Gather = Callable[[object], list]  # every rank's value, in rank order (distributed.gather_object)


def _alone(value: object) -> list:
    return [value]


def _verdict(path: str, rank: Optional[int], hashes: bool) -> list[str]:
    """This process's view of one checkpoint: its problems on this rank's disk ([] when fine)."""
    if not os.path.isdir(path):
        return ["not on this rank's disk"]
    if rank is None:
        return missing_parts(path)
    try:
        world = read_manifest(path).get("run", {}).get("world_size", 1)
    except ValueError as e:
        return [str(e)]
    # A rank beyond the checkpoint's world size has no parts to look for: check_resume_compatible refuses the
    # changed world size by name, rather than `auto` skipping every checkpoint and silently starting afresh.
    return missing_parts(path, ranks=[rank] if rank < world else [], verify_hashes=hashes)


def _problems_by_rank(verdicts: list[list[str]]) -> str:
    if len(verdicts) == 1:
        return "; ".join(verdicts[0])
    return "; ".join(f"rank {r}: {', '.join(v)}" for r, v in enumerate(verdicts) if v)


def latest_complete_checkpoint(output_dir: str, rank: Optional[int] = None, hashes: bool = True,
                               gather: Gather = _alone) -> Optional[str]:
    """The newest checkpoint-N that is complete on every rank's disk (the same path on every rank), or None.

    One process (rank None) checks every part the manifest lists. In a run, each rank checks the shared parts and
    its own on its disk (`hashes`: the one process per disk that publishes there also re-hashes every file), the
    verdicts are gathered, and a checkpoint counts only if no rank found a problem. Skipped ones are logged."""
    steps = sorted({s for found in gather([s for s, _ in checkpoints(output_dir)]) for s in found}, reverse=True)
    for step in steps:
        path = os.path.join(output_dir, f"checkpoint-{step}")
        verdicts = gather(_verdict(path, rank, hashes))
        if not any(verdicts):
            return path
        logger.warning("resume: skipping %s: %s", path, _problems_by_rank(verdicts))
    return None


def resolve_resume(value: Optional[str], output_dir: str, rank: Optional[int] = None, hashes: bool = True,
                   gather: Gather = _alone) -> Optional[str]:
    """The checkpoint to resume from, or None to start fresh (the same answer on every rank; see
    latest_complete_checkpoint for rank, hashes and gather)."""
    if value is None:
        if any(gather(bool(checkpoints(output_dir)))):
            logger.warning(
                "%s already holds checkpoints; this run starts fresh and will overwrite them "
                "(pass --resume_from_checkpoint auto to continue instead)", output_dir
            )
        return None
    if value == RESUME_AUTO:
        path = latest_complete_checkpoint(output_dir, rank, hashes, gather)
        logger.info("resume auto: %s", f"continuing from {path}" if path else f"no complete checkpoint in {output_dir}, starting fresh")
        return path
    verdicts = gather(_verdict(value, rank, hashes))
    if any(verdicts):
        raise ConfigError(f"training.resume_from_checkpoint: {value} cannot be resumed: {_problems_by_rank(verdicts)}")
    return value


# ---- does the checkpoint fit this run --------------------------------------------------------------------------

def run_signature(recipe: Recipe, world_size: int) -> dict:
    """What a checkpoint's optimizer state depends on beyond the recipe's model sections: recorded in the manifest
    and compared on resume (check_resume_compatible)."""
    stage = None
    if recipe.deepspeed is not None:
        # load_recipe has checked the file (its zero_optimization is a mapping)
        stage = (jsontext.read_object(recipe.deepspeed, "DeepSpeed config").get("zero_optimization") or {}).get("stage", 0)
    return {"world_size": world_size, "deepspeed": recipe.deepspeed is not None, "zero_stage": stage,
            "save_only_model": bool(recipe.training.get("save_only_model", False))}


def _describe(run: dict) -> str:
    return f"under DeepSpeed ZeRO-{run['zero_stage']}" if run.get("deepspeed") else "without DeepSpeed"


def check_run_compatible(checkpoint: str, saved_recipe: dict, now: dict) -> None:
    """Refuse, naming the key, a resume whose DeepSpeed setup cannot read the checkpoint's optimizer state.

    DeepSpeed's ZeRO files hold per-rank optimizer partitions laid out for one stage and one world size; the
    Trainer without DeepSpeed reads only optimizer.pt, so it would silently restart the optimizer. DeepSpeed's
    own reshaping route (universal checkpoints, ds_to_universal) is not wired in here: the message says so."""
    saved = read_manifest(checkpoint).get("run", {})
    ds_path = saved_recipe.get("deepspeed")
    where = f"cannot resume from {checkpoint}: it was saved {_describe(saved)} by {saved.get('world_size')} process(es)"
    if saved.get("deepspeed") and not now["deepspeed"]:
        raise ConfigError(f"{where}; this run has `deepspeed: null`, so its ZeRO optimizer state would be dropped. "
                          f"Set `deepspeed: {ds_path}` (--deepspeed {ds_path}), or start a new output_dir")
    if now["deepspeed"] and not saved.get("deepspeed"):
        raise ConfigError(f"{where}; this run sets `deepspeed`, and DeepSpeed cannot read the Trainer's optimizer.pt. "
                          "Resume with `deepspeed: null` (--deepspeed null), or start a new output_dir")
    if saved.get("deepspeed") and saved.get("zero_stage") != now["zero_stage"]:
        raise ConfigError(f"{where}; this run's `deepspeed` config has zero_optimization.stage {now['zero_stage']}, "
                          f"and ZeRO-{saved.get('zero_stage')} shards do not load under another stage. Resume with "
                          f"`deepspeed: {ds_path}`, or start a new output_dir (this project does not convert ZeRO "
                          "checkpoints between stages)")
    if saved.get("deepspeed") and (saved.get("zero_stage") or 0) >= 1 and saved.get("world_size") != now["world_size"]:
        raise ConfigError(f"{where}; this run has {now['world_size']} (the world size: number of nodes x processes "
                          "per node), and each rank's ZeRO optimizer shard belongs to one rank. Launch "
                          f"{saved.get('world_size')} processes, or start a new output_dir (this project does not "
                          "convert ZeRO checkpoints between world sizes)")


# Sections that must not change between a checkpoint and the run that resumes it.
_MUST_MATCH = ("model", "adapter", "trainable")


def check_resume_compatible(recipe: Recipe, checkpoint: str, run: Optional[dict] = None) -> None:
    """A resumed run must train the same thing: same model, adapter and trainable sections as the checkpoint, and
    (given this run's run_signature) a DeepSpeed setup that can read its optimizer state."""
    saved = read_yaml(os.path.join(checkpoint, RECIPE_FILENAME), "checkpoint's recipe") or {}
    if not isinstance(saved, dict):
        raise ConfigError(f"cannot resume from {checkpoint}: its {RECIPE_FILENAME} is not a mapping")
    now = recipe.to_dict()
    for section in _MUST_MATCH:
        if saved.get(section) != now[section]:
            old, new = saved.get(section) or {}, now[section] or {}
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) if isinstance(old, dict) and isinstance(new, dict) else [section]
            raise ConfigError(
                f"cannot resume from {checkpoint}: its recipe's `{section}` differs from this one in {keys} "
                "(resume with the same settings, or start a new output_dir)"
            )
    if run is not None:
        check_run_compatible(checkpoint, saved, run)


# ---- loading pickles without running code ------------------------------------------------------------------------

def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed (0.19) pickles into its ZeRO optimizer files besides tensors and containers: the
    ZeRO stage enum, the loss scaler, and ZeRO-1/2's fragment addresses. Found with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2 and ZeRO-3 checkpoints (fp32; fp16 adds the
    dynamic scaler)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def trusted_deepspeed_loads():
    """While active, DeepSpeed's checkpoint engine reads its files with torch.load(weights_only=True) and only
    deepspeed_safe_globals() allowed, instead of its own weights_only=False: a planted pickle raises
    UnpicklingError instead of running. DeepSpeed has no setting for this, so the engine's load is swapped for the
    duration (and put back)."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = deepspeed_safe_globals()

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    original = TorchCheckpointEngine.load
    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original
