"""Initial factors for every target, computed once across all processes.

Single process: decompose every target in turn. Under torch.distributed (DeepSpeed ZeRO-2 replicated weights, or
ZeRO-3 partitioned weights), each matrix gets one owner rank, chosen greedily by cost ~ m n min(m, n) (largest
first, onto the least-loaded rank), so the wall time divides by the number of ranks; the owner decomposes it and
broadcasts the factors, so every rank holds the same bits. Under ZeRO-3 the weights are gathered one at a time
(collectively, in module order); the owner keeps a copy of the weights it owns, in their own dtype, to decompose
after the gathering pass, which is what lets the ranks work in parallel.

DeepSpeed and torch.distributed offer the collectives but not this scheduling, hence this module.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import cache as cache_mod
from .decompose import minor_factors
from .targets import Target, full_weight, is_partitioned

logger = logging.getLogger(__name__)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # target name -> (A0 r x in, B0 out x r), fp32


@dataclass
class InitReport:
    """What one process did during MiLoRA init (apply_milora attaches it as `peft_model.milora_init_report`)."""

    total: int = 0  # target matrices
    decomposed_here: int = 0  # matrices this rank decomposed (sums to `total` over ranks, or 0 on a cache hit)
    decomposed_names: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole init (gather, decompose, broadcast)
    world_size: int = 1
    cache: str = "off"  # "off", "hit", or "miss: <reason>"


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def assign_owners(costs: list[int], world_size: int) -> list[int]:
    """Greedy longest-processing-time split: biggest matrix first, onto the rank with the least work so far.
    Deterministic (ties broken by index and rank), so every rank computes the same plan without talking."""
    load = [0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def local_cuda_device() -> torch.device:
    """This process's GPU. apply_milora may run before the Trainer calls torch.cuda.set_device, when every rank's
    current device is still cuda:0, so the launcher's LOCAL_RANK decides."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        return torch.device("cuda", int(local_rank) % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def resolve_device(spec: str, weight: torch.Tensor) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return local_cuda_device()
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo (CPU runs, tests) moves CPU tensors."""
    if dist.get_backend() == "nccl":
        return local_cuda_device()
    return torch.device("cpu")


def _generator(seed: int, name: str) -> torch.Generator:
    """Per-matrix generator for init='random': depends on the seed and the matrix's name only, so the draw does
    not change with the rank that computes it or with the other targets."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def compute_initial_factors(targets: list[Target], config) -> tuple[Factors, InitReport]:
    """{name: (A0, B0)} for every target, identical on every rank, with `config` a MiLoRAConfig (init != 'lora')."""
    t0 = time.perf_counter()
    rank, world_size = world()
    report = InitReport(total=len(targets), world_size=world_size)
    owners = assign_owners([t.cost for t in targets], world_size)
    partitioned = any(is_partitioned(t.weight) for t in targets)
    use_cache = config.cache_dir is not None

    # Pass 1 (ZeRO-3 or cache): one gather per weight, in module order on every rank. Fingerprint it for the
    # cache key; the owner keeps a copy to decompose later.
    fingerprints: dict[str, str] = {}
    stash: dict[int, torch.Tensor] = {}
    if partitioned or use_cache:
        for i, t in enumerate(tqdm(targets, desc="MiLoRA: reading weights", disable=rank != 0 or not partitioned)):
            with full_weight(t) as w:
                if use_cache:
                    fingerprints[t.name] = cache_mod.weight_fingerprint(w)
                if partitioned and owners[i] == rank:
                    stash[i] = w.detach().clone()

    settings = key = None
    if use_cache:
        settings = cache_mod.cache_settings(config, fingerprints)
        key = cache_mod.cache_key(settings)
        cached = _agreed_cache_load(config.cache_dir, key, targets)
        if cached is not None:
            report.cache = "hit"
            report.seconds = time.perf_counter() - t0
            logger.info("MiLoRA init: cache hit %s, %d matrices, no decomposition", cache_mod.cache_path(config.cache_dir, key), len(targets))
            return cached, report
        report.cache = "miss: " + cache_mod.explain_miss(config.cache_dir, settings)
        logger.info("MiLoRA init: cache miss (%s); decomposing", report.cache[6:])

    # Pass 2: each rank decomposes the matrices it owns.
    mine = [i for i in range(len(targets)) if owners[i] == rank]
    local: Factors = {}
    error: Exception | None = None
    for i in tqdm(mine, desc=f"MiLoRA init ({config.init}, r={config.r})", disable=rank != 0):
        t = targets[i]
        if partitioned:
            w = stash.pop(i)
        else:
            with full_weight(t) as w:
                w = w.detach()
        device = resolve_device(config.decompose_device, w)
        gen = _generator(config.seed, t.name) if config.init == "random" else None
        try:
            A0, B0 = minor_factors(w.to(device), config.r, config.scaling, config.init, config.method, generator=gen)
        except (ValueError, TypeError) as exc:  # e.g. NaN in this weight: name it
            error = type(exc)(f"target '{t.name}': {exc}")
            break
        local[t.name] = (A0, B0)
        report.decomposed_names.append(t.name)
    report.decomposed_here = len(local)
    _raise_if_any_rank_failed(error, world_size)

    factors = _broadcast_factors(targets, owners, local, config.r) if world_size > 1 else local
    report.seconds = time.perf_counter() - t0

    if use_cache:
        # one writer per node (its local rank 0): on node-local disks every node needs its own copy for the next
        # run to hit (_agreed_cache_load); on a shared disk the nodes' atomic writes of the same bytes are harmless
        if int(os.environ.get("LOCAL_RANK", rank)) == 0:
            path = cache_mod.save_cached(config.cache_dir, key, settings, factors)
            logger.info("MiLoRA init: factors cached at %s", path)
        if world_size > 1:
            dist.barrier()
    logger.info(
        "MiLoRA init: %d matrices decomposed (%d on this rank of %d) in %.2f s, init=%s r=%d method=%s",
        len(targets), len(mine), world_size, report.seconds, config.init, config.r, config.method,
    )
    return factors, report


def _raise_if_any_rank_failed(error: Exception | None, world_size: int) -> None:
    """A rank whose matrix cannot be decomposed must not leave the others waiting in a broadcast forever."""
    if world_size > 1:
        flag = torch.tensor([0 if error is None else 1], device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if error is None and int(flag.item()):
            raise RuntimeError("MiLoRA init failed on another rank (its error names the matrix); stopping here too")
    if error is not None:
        raise error


def _agreed_cache_load(cache_dir, key: str, targets: list[Target]) -> Optional[Factors]:
    """Load the entry only if every rank can (no shared filesystem is assumed); otherwise all recompute."""
    cached = cache_mod.load_cached(cache_dir, key)
    if cached is not None and set(cached) != {t.name for t in targets}:
        cached = None
    rank, world_size = world()
    if world_size > 1:
        flag = torch.tensor([1 if cached is not None else 0], device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 0:
            return None
    return cached


def _broadcast_factors(targets: list[Target], owners: list[int], local: Factors, r: int) -> Factors:
    """Every owner sends its factors as one flat fp32 tensor [B0, A0]; every rank ends with all of them."""
    device = _comm_device()
    out: Factors = {}
    for i, t in enumerate(targets):
        m, n = t.shape
        if owners[i] == dist.get_rank():
            A0, B0 = local[t.name]
            flat = torch.cat([B0.reshape(-1), A0.reshape(-1)]).to(device)
        else:
            flat = torch.empty(m * r + r * n, dtype=torch.float32, device=device)
        dist.broadcast(flat, src=owners[i])
        out[t.name] = (flat[m * r :].view(r, n), flat[: m * r].view(m, r))
    return out
