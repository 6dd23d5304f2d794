"""Cache of initial factors: one safetensors file per (weights, targets, settings) key.

The key hashes a cheap fingerprint of every target weight (shape, dtype and the raw bits of a strided sample of
65,536 entries: any finetune moves nearly every entry, and hashing 13 GB of LLaMA-2-7B targets in full would cost
more than the Gram route itself) together with r, alpha, init, seed and method. The settings travel in the file's
safetensors metadata, so a miss can say which of them changed.
"""

from __future__ import annotations

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

_SAMPLE = 65536
_META_KEY = "milora_cache"
CACHE_FORMAT = 1


def weight_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of shape, dtype and the exact bits of a strided sample of the weight (device-independent)."""
    flat = weight.detach().reshape(-1)
    stride = max(1, flat.numel() // _SAMPLE)
    sample = flat[::stride][:_SAMPLE].contiguous().cpu()
    h = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}|".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())
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


def load_cached(cache_dir, key: str) -> Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{target name: (A0, B0)} from the entry for `key`, or None if there is none."""
    path = cache_path(cache_dir, key)
    if not path.exists():
        return None
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        names = json.loads(f.metadata()[_META_KEY])["weights"].keys()
        for name in names:
            factors[name] = (f.get_tensor(f"{name}.A0"), f.get_tensor(f"{name}.B0"))
    return factors


def save_cached(cache_dir, key: str, settings: dict, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """Write atomically (temp file + rename) so that a concurrent reader never sees half a file."""
    path = cache_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (A0, B0) in factors.items():
        tensors[f"{name}.A0"] = A0.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.B0"] = B0.detach().to("cpu", torch.float32).contiguous()
    tmp = path.with_suffix(f".tmp{uuid.uuid4().hex}")  # unique across the nodes sharing a disk, not only per host
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(settings, sort_keys=True)})
    os.replace(tmp, path)
    return path


def explain_miss(cache_dir, settings: dict) -> str:
    """Why no entry matches: compare with the entries that are there (the nearest one first)."""
    entries = sorted(Path(cache_dir).glob("milora-*.safetensors")) if Path(cache_dir).is_dir() else []
    if not entries:
        return f"no cached factors in {cache_dir}"
    reasons = []
    for entry in entries:
        with safe_open(str(entry), framework="pt") as f:
            meta = f.metadata() or {}
        if _META_KEY not in meta:
            continue
        other = json.loads(meta[_META_KEY])
        diffs = [f"{k} {other.get(k)!r} -> {settings[k]!r}" for k in settings if k != "weights" and other.get(k) != settings[k]]
        mine, theirs = settings["weights"], other.get("weights", {})
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
