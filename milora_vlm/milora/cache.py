"""Cache of initial factors: one safetensors file per (weights, targets, settings) key.

The key hashes a fingerprint of every target weight (sha256 of its shape, dtype and *every* byte: a sample of the
entries would let a finetune that moves the other entries hit a stale entry; hashing a 4096 x 11008 bf16 matrix
takes 0.12 s on one CPU core, 0.13% of decomposing it, BENCHMARKS.md) together with r, alpha,
init, seed and method. The settings travel in the file's safetensors metadata, so a miss can say which of them
changed. A file that cannot be read (truncated, not safetensors, wrong tensors) is only a miss: it is logged as a
warning, ignored, and the factors are recomputed and written again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

_META_KEY = "milora_cache"
CACHE_FORMAT = 2  # 2: whole-tensor fingerprints, and each matrix's largest singular value stored with its factors
_BLOCK_BYTES = 64 << 20  # fingerprint read size: bounds the host copy of a GPU weight

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # target name -> (A0 r x in, B0 out x r), fp32


def weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of shape, dtype and every byte of the (out x in) weight, read in row blocks of about 64 MB.

    The bytes are those of the logical row-major matrix, so a transposed view (Conv1D) and its contiguous copy
    agree, and a CUDA weight is copied to the host one block at a time (hashlib runs on the CPU).
    """
    w = weight.detach()
    w = w.reshape(1, -1) if w.dim() < 2 else w.reshape(w.shape[0], -1)
    h = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}|".encode())
    row_bytes = max(1, w.shape[1] * w.element_size())
    step = max(1, _BLOCK_BYTES // row_bytes)
    for start in range(0, w.shape[0], step):
        block = w[start : start + step].contiguous().cpu()
        h.update(block.view(torch.uint8).numpy())
    return h.hexdigest()


def cache_settings(config, fingerprints: dict[str, str]) -> dict:
    """Everything the factors depend on (residual mode does not: offset and subtract share a cache entry)."""
    return {
        "format": CACHE_FORMAT,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "init": config.init,
        "seed": config.seed,
        "method": config.method,
        "weights": fingerprints,
    }


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"milora-{key}.safetensors"


def load_cached(
    cache_dir, key: str, shapes: dict[str, tuple[int, int]], r: int
) -> tuple[Optional[tuple[Factors, dict[str, float]]], Optional[str]]:
    """((factors, largest singular value per target), None) from the entry for `key`, or (None, why not).

    `shapes` ({target name: (out, in)}) and r are checked against the file, so a damaged entry is a miss, never
    wrong factors or a crash.
    """
    path = cache_path(cache_dir, key)
    if not path.exists():
        return None, None
    try:
        return _read_entry(path, shapes, r), None
    except Exception as exc:  # noqa: BLE001  any unreadable file is a miss: the cache must never stop an init
        problem = f"{path} is unreadable ({type(exc).__name__}: {exc}); ignoring it and recomputing"
        logger.warning("MiLoRA cache: %s", problem)
        return None, problem


def _read_entry(path: Path, shapes: dict[str, tuple[int, int]], r: int) -> tuple[Factors, dict[str, float]]:
    factors: Factors = {}
    sigma_max: dict[str, float] = {}
    with safe_open(str(path), framework="pt") as f:
        names = set(json.loads((f.metadata() or {})[_META_KEY])["weights"])
        if names != set(shapes):
            raise ValueError(f"it holds {len(names)} targets, this model has {len(shapes)}")
        for name, (m, n) in shapes.items():
            A0, B0 = f.get_tensor(f"{name}.A0"), f.get_tensor(f"{name}.B0")
            smax = f.get_tensor(f"{name}.sigma_max")
            if A0.shape != (r, n) or B0.shape != (m, r) or smax.numel() != 1:
                raise ValueError(f"'{name}': A0 {tuple(A0.shape)}, B0 {tuple(B0.shape)}, expected ({r}, {n}), ({m}, {r})")
            if any(t.dtype != torch.float32 or not torch.isfinite(t).all() for t in (A0, B0, smax)):
                raise ValueError(f"'{name}': factors not finite fp32")
            factors[name] = (A0, B0)
            sigma_max[name] = float(smax)
    return factors, sigma_max


def save_cached(cache_dir, key: str, settings: dict, factors: Factors, sigma_max: dict[str, float]) -> Optional[Path]:
    """Write atomically (temp file + rename) so that a concurrent reader never sees half a file. A cache that
    cannot be written (read-only, disk full) is a warning: the factors are already computed."""
    path = cache_path(cache_dir, key)
    tensors = {}
    for name, (A0, B0) in factors.items():
        tensors[f"{name}.A0"] = A0.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.B0"] = B0.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.sigma_max"] = torch.tensor([sigma_max[name]], dtype=torch.float32)
    tmp = path.with_suffix(f".tmp{uuid.uuid4().hex}")  # unique across the nodes sharing a disk, not only per host
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(settings, sort_keys=True)})
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("MiLoRA cache: could not write %s (%s); the factors are not cached", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return path


def explain_miss(cache_dir, settings: dict) -> str:
    """Why no entry matches: compare with the entries that are there (the nearest one first). Unreadable
    neighbours are skipped with a warning."""
    entries = sorted(Path(cache_dir).glob("milora-*.safetensors")) if Path(cache_dir).is_dir() else []
    if not entries:
        return f"no cached factors in {cache_dir}"
    reasons = []
    for entry in entries:
        try:
            with safe_open(str(entry), framework="pt") as f:
                meta = f.metadata() or {}
            other = json.loads(meta[_META_KEY]) if _META_KEY in meta else None
        except Exception as exc:  # noqa: BLE001  a damaged neighbour says nothing about this miss
            logger.warning("MiLoRA cache: ignoring unreadable file %s (%s: %s)", entry, type(exc).__name__, exc)
            continue
        if not isinstance(other, dict) or not isinstance(other.get("weights"), dict):
            logger.warning("MiLoRA cache: ignoring %s: its settings are not what this version writes", entry)
            continue
        diffs = [f"{k} {other.get(k)!r} -> {settings[k]!r}" for k in settings if k != "weights" and other.get(k) != settings[k]]
        mine, theirs = settings["weights"], other["weights"]
        if set(mine) != set(theirs):
            diffs.append(f"targets differ ({len(set(mine) ^ set(theirs))} names not in both)")
        else:
            changed = [n for n in mine if mine[n] != theirs[n]]
            if changed:
                diffs.append(f"weights differ in {len(changed)} of {len(mine)} targets (e.g. {changed[0]})")
        reasons.append((len(diffs), f"{entry.name}: " + "; ".join(diffs)))
    if not reasons:
        return f"no readable MiLoRA cache entries in {cache_dir}"
    reasons.sort()
    return f"{len(reasons)} entries in {cache_dir}, nearest {reasons[0][1]}"
