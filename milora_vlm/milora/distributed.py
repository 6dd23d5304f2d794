"""Initial factors for every target, computed once across all processes.

Single process: decompose every target in turn. Under torch.distributed (DeepSpeed ZeRO-2 replicated weights, or
ZeRO-3 partitioned weights), the targets are sorted by cost ~ m n min(m, n) and cut into waves of one matrix per
rank (plan_waves); in each wave every rank decomposes its matrix, then the owners broadcast the factors, so the
wall time divides by the number of ranks and every rank holds the same bits. Under ZeRO-3 the wave's weights are
gathered one at a time (collectively, in the same order on every rank) and each owner keeps a copy of only its
own: a rank never holds more than WAVE_PER_RANK full weights besides the one being gathered (before, an owner
kept every weight it owned until the end: 12.9 GB / world size of bf16 copies for LLaMA-2-7B).

Any exception on one rank (a NaN weight, LinAlgError, out of memory, an unwritable cache) is shared at the next
agreement point (RankErrors.check, a collective every rank reaches), so every rank stops with that rank's message
instead of waiting forever in the next collective.

DeepSpeed and torch.distributed offer the collectives but not this scheduling or error agreement, hence this module.
"""

from __future__ import annotations

import contextlib
import os
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from milora_vlm import dist as ranks

from . import cache as cache_mod
from .cache import Factors
from .decompose import INITS, decompose, init_health, resolve_method
from .targets import Target, full_weight, is_partitioned

logger = logging.getLogger(__name__)

WAVE_PER_RANK = 1  # full weights an owner holds at once under ZeRO-3 (decomposition is the cost, not the gathers)
_MESSAGE_BYTES = 4096  # room for one rank's error message in the agreement collective


@dataclass
class InitReport:
    """What one process did during MiLoRA init (apply_milora attaches it as `peft_model.milora_init_report`)."""

    total: int = 0  # target matrices
    decomposed_here: int = 0  # matrices this rank decomposed (sums to `total` over ranks, or 0 on a cache hit)
    decomposed_names: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the whole init (gather, decompose, broadcast)
    world_size: int = 1
    cache: str = "off"  # "off", "hit", or "miss: <reason>"
    peak_held_bytes: int = 0  # most bytes of gathered ZeRO-3 weight copies this rank held at once
    matrices: dict[str, dict] = field(default_factory=dict)  # per target: decompose.init_health figures
    warnings: list[str] = field(default_factory=list)  # "target 'x': adapter starts nearly dead: ..." (also logged)


def plan_waves(costs: list[int], world_size: int, per_rank: int = WAVE_PER_RANK) -> list[list[tuple[int, int]]]:
    """Waves of (target index, owner rank): targets sorted by cost (largest first, ties by index), cut into
    waves of world_size * per_rank, each split over the ranks greedily (largest first, onto the least-loaded rank
    with room), so a rank owns at most per_rank matrices of a wave and the ranks of a wave get similar work.
    Deterministic, so every rank computes the same plan without talking."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    size = world_size * per_rank
    waves = []
    for start in range(0, len(order), size):
        load, count, wave = [0] * world_size, [0] * world_size, []
        for i in order[start : start + size]:
            rank = min((r for r in range(world_size) if count[r] < per_rank), key=lambda r: (load[r], r))
            wave.append((i, rank))
            load[rank] += costs[i]
            count[rank] += 1
        waves.append(wave)
    return waves


def resolve_device(spec: str, weight: torch.Tensor) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return ranks.local_cuda_device()
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def _generator(seed: int, name: str) -> torch.Generator:
    """Per-matrix generator for init='random': depends on the seed and the matrix's name only, so the draw does
    not change with the rank that computes it or with the other targets."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


class RankErrors:
    """The first exception this rank met, and check(): a collective after which every rank raises if any failed.

    Work that may fail on one rank only runs under capture(); collectives (ZeRO-3 gathers, broadcasts) keep
    running on a failed rank until the next check(), so no rank is ever left waiting in one.
    """

    def __init__(self) -> None:
        self.error: Optional[BaseException] = None
        self.where = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @contextlib.contextmanager
    def capture(self, where: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # noqa: BLE001  any failure, so that the other ranks hear of it
            if self.error is None:
                self.error, self.where = exc, where

    def describe(self) -> str:
        return f"{type(self.error).__name__}: {self.where}: {self.error}"

    def check(self) -> None:
        world_size = ranks.world_size()
        message = None
        if world_size > 1:
            message = self._first_failure()
        if self.error is not None:
            raise _with_context(self.error, self.where)
        if message is not None:
            raise RuntimeError(f"MiLoRA init stopped: {message}")

    def _first_failure(self) -> Optional[str]:
        """All-gather every rank's message (fixed-size byte buffers) and return the lowest failed rank's."""
        buf = torch.zeros(_MESSAGE_BYTES + 1, dtype=torch.uint8)
        if self.error is not None:
            text = self.describe().encode("utf-8")[:_MESSAGE_BYTES]
            buf[0] = 1
            buf[1 : 1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        device = ranks.comm_device()
        parts = [torch.empty_like(buf, device=device) for _ in range(ranks.world_size())]
        dist.all_gather(parts, buf.to(device))
        for rank, part in enumerate(parts):
            part = part.cpu()
            if int(part[0]):
                text = bytes(part[1:].tolist()).rstrip(b"\0").decode("utf-8", errors="replace")
                return f"rank {rank} failed: {text}"
        return None


def _with_context(exc: BaseException, where: str) -> BaseException:
    """The same exception type with `where` (the target's name) in front of its message where the type allows
    it (ValueError, LinAlgError, OutOfMemoryError ...), else the original with a note."""
    text = f"{where}: {exc}"
    try:
        new = type(exc)(text)
    except Exception:  # noqa: BLE001  exception types with other constructors
        new = None
    if new is None or str(new) != text:
        exc.add_note(where)
        return exc
    new.__cause__ = exc
    return new


def compute_initial_factors(targets: list[Target], config) -> tuple[Factors, InitReport]:
    """{name: (A0, B0)} for every target, identical on every rank, with `config` a MiLoRAConfig (init != 'lora')."""
    t0 = time.perf_counter()
    rank, world_size = ranks.rank(), ranks.world_size()
    report = InitReport(total=len(targets), world_size=world_size)
    errors = RankErrors()
    use_cache = config.cache_dir is not None

    settings = key = None
    if use_cache:
        # One gather per weight under ZeRO-3, in module order on every rank, to fingerprint it for the key.
        fingerprints: dict[str, str] = {}
        for t in targets:
            with full_weight(t) as w:
                if errors.ok:
                    with errors.capture(f"target '{t.name}'"):
                        fingerprints[t.name] = cache_mod.weight_fingerprint(w)
        errors.check()
        settings = cache_mod.cache_settings(config, fingerprints)
        key = cache_mod.cache_key(settings)
        cached, problem = None, None
        with errors.capture("cache"):
            cached, problem = cache_mod.load_cached(config.cache_dir, key, {t.name: t.shape for t in targets}, config.r)
        errors.check()
        if ranks.all_ranks(cached is not None):  # no shared filesystem is assumed: all use it or all recompute
            factors, sigma_max = cached
            report.cache = "hit"
            logger.info("MiLoRA init: cache hit %s, %d matrices, no decomposition", cache_mod.cache_path(config.cache_dir, key), len(targets))
            _health(targets, factors, sigma_max, config, report)
            report.seconds = time.perf_counter() - t0
            return factors, report
        report.cache = "miss: " + (problem or cache_mod.explain_miss(config.cache_dir, settings))
        logger.info("MiLoRA init: cache miss (%s); decomposing", report.cache[6:])

    factors, sigma_max = _decompose_in_waves(targets, config, report, errors)
    report.seconds = time.perf_counter() - t0

    if use_cache:
        # one writer per node (its local rank 0): on node-local disks every node needs its own copy for the next
        # run to hit (all ranks must load it); on a shared disk the nodes' atomic writes of the same bytes are harmless
        if int(os.environ.get("LOCAL_RANK", rank)) == 0:
            with errors.capture("cache"):
                path = cache_mod.save_cached(config.cache_dir, key, settings, factors, sigma_max)
                if path is not None:
                    logger.info("MiLoRA init: factors cached at %s", path)
        errors.check()  # also the barrier: no rank reads the entry before it is written
    _health(targets, factors, sigma_max, config, report)
    logger.info(
        "MiLoRA init: %d matrices decomposed (%d on this rank of %d) in %.2f s, init=%s r=%d method=%s",
        len(targets), report.decomposed_here, world_size, report.seconds, config.init, config.r, config.method,
    )
    return factors, report


def _decompose_in_waves(
    targets: list[Target], config, report: InitReport, errors: RankErrors
) -> tuple[Factors, dict[str, float]]:
    rank, world_size = ranks.rank(), ranks.world_size()
    partitioned = any(is_partitioned(t.weight) for t in targets)
    factors: Factors = {}
    sigma_max: dict[str, float] = {}
    progress = tqdm(total=len(targets), desc=f"MiLoRA init ({config.init}, r={config.r})", disable=rank != 0)
    for wave in plan_waves([t.cost for t in targets], world_size):
        # Gather the wave's weights (collective under ZeRO-3: every rank, same order); owners keep their own.
        mine: dict[int, torch.Tensor] = {}
        for i, owner in wave:
            if owner != rank and not partitioned:
                continue
            with full_weight(targets[i]) as w:
                if owner == rank and errors.ok:
                    with errors.capture(f"target '{targets[i].name}'"):
                        mine[i] = w.detach().clone() if partitioned else w.detach()
        if partitioned:
            held = sum(w.numel() * w.element_size() for w in mine.values())
            report.peak_held_bytes = max(report.peak_held_bytes, held)
        local: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for i in list(mine):
            w = mine.pop(i)  # the copy is freed as soon as it is decomposed
            t = targets[i]
            if not errors.ok:
                continue
            with errors.capture(f"target '{t.name}'"):
                gen = _generator(config.seed, t.name) if INITS[config.init].needs_generator else None
                w = w.to(resolve_device(config.decompose_device, w))
                d = decompose(w, config.r, config.scaling, config.init, config.method, gen)
                local[i] = (d.A, d.B, d.sigma_max)
                report.decomposed_names.append(t.name)
            del w
        errors.check()
        for i, owner in wave:
            t = targets[i]
            A0, B0, smax = _share(t, owner, local.get(i), config.r) if world_size > 1 else local[i]
            factors[t.name], sigma_max[t.name] = (A0, B0), smax
        progress.update(len(wave))
    progress.close()
    report.decomposed_here = len(report.decomposed_names)
    return factors, sigma_max


def _share(t: Target, owner: int, mine, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The owner broadcasts one flat fp32 tensor [B0, A0, sigma_max]; every rank returns the same bits."""
    device = ranks.comm_device()
    m, n = t.shape
    if owner == ranks.rank():
        A0, B0, smax = mine
        flat = torch.cat([B0.reshape(-1).float(), A0.reshape(-1).float(), torch.tensor([smax], device=A0.device)]).to(device)
    else:
        flat = torch.empty(m * r + r * n + 1, dtype=torch.float32, device=device)
    dist.broadcast(flat, src=owner)
    return flat[m * r : m * r + r * n].view(r, n), flat[: m * r].view(m, r), float(flat[-1])


def _health(targets: list[Target], factors: Factors, sigma_max: dict[str, float], config, report: InitReport) -> None:
    """Per-matrix starting figures into the report; a warning per matrix whose adapter starts nearly dead."""
    rank = ranks.rank()
    for t in targets:
        A0, _ = factors[t.name]
        route = resolve_method(config.method, t.shape, resolve_device(config.decompose_device, t.weight))
        figures, warning = init_health(A0, sigma_max[t.name], config.scaling, route)
        report.matrices[t.name] = figures
        if warning is not None:
            report.warnings.append(f"target '{t.name}': {warning}")
            if rank == 0:
                logger.warning("MiLoRA init: target '%s': %s", t.name, warning)
