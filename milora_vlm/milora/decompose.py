"""The project's one decomposition function: rank-r SVD factors of a frozen weight, in PEFT's LoRA layout.

For W (out x in) = U S V^T (singular values descending) and LoRA scaling s = alpha / r, the selected triplets
(U_k, S_k, V_k) give

    B0 = U_k sqrt(S_k / s)   (out x r),     A0 = sqrt(S_k / s) V_k^T   (r x in),     s * B0 @ A0 = U_k S_k V_k^T,

the PiSSA convention, valid for any alpha. MiLoRA (Wang et al., NAACL 2025) selects the r *minor* triplets.

Two routes compute the triplets:
- "svd": torch.linalg.svd in fp32, what the paper's code does.
- "gram": eigh of the fp64 Gram matrix of the smaller side, then a Rayleigh-Ritz step for the other side.
  Squaring W squares its condition number, which is what would make a Gram route lose the minor components;
  fp64 gives those digits back: subspace errors grow like 1e-16 * kappa^2 / (relative gap), against fp32 SVD's
  6e-8 * kappa / (relative gap), so the Gram route is the more accurate of the two up to kappa ~ 5e8 (tested:
  within 1e-4 rad of an fp64 SVD at kappa 3e5; at kappa 3e6, 1e-4 where fp32 SVD is off by >1e-3). The other side's vectors are not taken
  as W v / sigma, which blows up (or divides by zero) for tiny sigma: instead Y = W V_k is orthogonalised by a QR
  and the small r x r core re-diagonalised by an SVD, which gives orthonormal vectors for any sigma and refines
  the singular values from W itself rather than from their squares.
torch.linalg has no partial SVD for minor components, and PEFT's pissa_init only does principal (and only in the
weight's own layout), so this is written by hand on top of torch.linalg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from milora_vlm.registry import Registry

METHODS = ("auto", "svd", "gram", "gesvda")
# Up to this smaller side the fp32 LAPACK SVD is as fast as the Gram route on CPU, and it is the simpler one
# (BENCHMARKS.md, "Choosing the route").
_SMALL_SIDE = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Smallest sigma / sigma_max each route separates from rounding: the fp64 Gram route squares the spectrum (eigenvalue
# errors ~1e-16 sigma_max^2 leave a sigma below ~1e-7 sigma_max with under two correct digits), fp32 SVD has absolute
# errors ~6e-8 sigma_max. Below it, the selected "singular vectors" are arbitrary directions of a noise-level space.
RESOLUTION = {"gram": 1e-7, "svd": 1e-6, "gesvda": 1e-6}
# ||A0|| below this fraction of PEFT's Kaiming-uniform A makes B's step-0 gradients that much smaller than LoRA's.
WEAK_START = 1e-3


@dataclass(frozen=True)
class Decomposition:
    """minor_factors' result with what the init report needs: A (r x in), B (out x r) fp32, and W's largest
    singular value (the selected ones are scaling * ||A_i||^2, so need not be carried separately)."""

    A: torch.Tensor
    B: torch.Tensor
    sigma_max: float
    route: str


# (k, r, generator) -> the ascending indices (into W's k singular values, sorted descending) of the r triplets
Selection = Callable[[int, int, Optional[torch.Generator]], torch.Tensor]


@dataclass(frozen=True)
class Init:
    """One value of `adapter.init`: which singular triplets of W the adapter's A, B start from."""

    help: str
    select: Optional[Selection]  # None: PEFT's own LoRA init (Kaiming A, zero B), nothing is decomposed
    needs_generator: bool = False  # a seeded choice: every process draws with the same generator


INITS: Registry[Init] = Registry("init")


def register_init(name: str, help: str, needs_generator: bool = False) -> Callable[[Selection], Selection]:
    """Decorator: `select(k, r, generator)` becomes adapter.init `name` (recipes, --help, the cache key)."""
    def add(select: Selection) -> Selection:
        INITS.register(name, Init(help, select, needs_generator))
        return select

    return add


@register_init("minor", "MiLoRA: the r smallest singular triplets")
def _minor(k: int, r: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.arange(k - r, k)


@register_init("principal", "PiSSA: the r largest singular triplets")
def _principal(k: int, r: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.arange(0, r)


@register_init("middle", "the r triplets in the middle of the spectrum")
def _middle(k: int, r: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    start = (k - r) // 2
    return torch.arange(start, start + r)


@register_init("random", "r triplets drawn at random (seeded by adapter.seed)", needs_generator=True)
def _random(k: int, r: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.sort(torch.randperm(k, generator=generator)[:r]).values


INITS.register("lora", Init("PEFT's default LoRA init: Kaiming-uniform A, zero B; nothing to decompose", None))


def _selection(init: str, generator: Optional[torch.Generator]) -> Selection:
    entry = INITS[init]
    if entry.select is None:
        raise ValueError(f"init={init!r} selects no singular triplets (it is PEFT's own LoRA init); "
                         f"decomposing inits: {[n for n in INITS if INITS[n].select is not None]}")
    if entry.needs_generator and generator is None:
        raise ValueError(f"init={init!r} needs seed= or generator= so that every process picks the same triplets")
    return entry.select


def select_indices(k: int, r: int, init: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Indices (into singular values sorted descending, 0..k-1) of the r triplets that `init` selects, ascending.
    A registered init that breaks that contract is an error naming it (not a shape error later, in PEFT)."""
    idx = _selection(init, generator)(k, r, generator)
    if not (isinstance(idx, torch.Tensor) and idx.dim() == 1 and not idx.is_floating_point() and not idx.is_complex()
            and idx.dtype != torch.bool):
        raise ValueError(f"init {init!r} must return a 1-D integer tensor of indices, got "
                         f"{type(idx).__name__}{'' if not isinstance(idx, torch.Tensor) else f' {idx.dtype} {tuple(idx.shape)}'}")
    idx = idx.to("cpu", torch.long)
    if idx.numel() != r:
        raise ValueError(f"init {init!r} returned {idx.numel()} indices for r = {r}")
    if r and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise ValueError(f"init {init!r} returned indices outside 0..{k - 1} (the matrix has {k} singular values)")
    if r > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"init {init!r} must return distinct indices in ascending order, got {idx.tolist()[:8]}...")
    return idx


def resolve_method(method: str, shape: tuple[int, int], device: torch.device) -> str:
    """Pick the decomposition route: the fp64 Gram route wherever fp64 linear algebra exists and the matrix is not
    tiny, else the plain fp32 SVD (mps and other backends have no fp64)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if method == "gesvda" and device.type != "cuda":
        raise ValueError("method='gesvda' is cuSOLVER's and needs a CUDA tensor; use method='gram' or 'svd' on CPU")
    if method != "auto":
        return method
    if device.type not in ("cpu", "cuda"):
        return "svd"
    return "svd" if min(shape) <= _SMALL_SIDE else "gram"


def check_weight(weight: torch.Tensor, r: int, name: str = "weight") -> None:
    """Clear errors for everything minor_factors cannot decompose."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    cls = type(weight).__name__
    if cls in ("Params4bit", "Int8Params") or hasattr(weight, "quant_state") or weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: dtype {weight.dtype} ({cls}) is not a plain float16/bfloat16/float32/float64 weight; quantised "
            "weights (bitsandbytes, float8, int) cannot be decomposed: load the base model in bf16/fp32 for MiLoRA init"
        )
    if weight.numel() == 0 or weight.is_meta:
        raise ValueError(
            f"{name}: the weight is empty or on the meta device (shape {tuple(weight.shape)}); under DeepSpeed ZeRO-3 "
            "gather it first (deepspeed.zero.GatheredParameters) or use apply_milora, which does"
        )
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (out x in) matrix, got shape {tuple(weight.shape)}")
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {r!r}")
    k = min(weight.shape)
    if r < 1 or r > k:
        raise ValueError(f"{name}: r={r} must satisfy 1 <= r <= min(out, in) = {k} for shape {tuple(weight.shape)}")


def minor_factors(
    weight: torch.Tensor,
    r: int,
    scaling: float = 1.0,
    init: str = "minor",
    method: str = "auto",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return fp32 (A, B), A: r x in, B: out x r, with scaling * B @ A = the selected rank-r part of W's SVD.

    weight: (out x in) float tensor, any float dtype, on any device (the result is on the same device).
    init: a registered selection (INITS): "minor" (MiLoRA: last r triplets), "principal" (PiSSA: first r),
      "middle", "random" (r triplets drawn with `generator` or `seed`, kept in descending order of singular value).
    method: "svd" (fp32 torch.linalg.svd), "gram" (fp64 Gram + eigh + Rayleigh-Ritz), "gesvda" (cuSOLVER's
      approximate SVD, CUDA only, inaccurate for small singular values: not for minor components of
      ill-conditioned matrices), "auto" (gram unless the matrix is small or the device lacks fp64).
    """
    if generator is None and seed is not None and init in INITS and INITS[init].needs_generator:
        generator = torch.Generator().manual_seed(seed)
    d = decompose(weight, r, scaling, init, method, generator)
    return d.A, d.B


@torch.no_grad()
def decompose(
    weight: torch.Tensor, r: int, scaling: float, init: str, method: str, generator: Optional[torch.Generator]
) -> Decomposition:
    """minor_factors' work (same arguments, a generator for a seeded init such as 'random'), with W's largest singular value and
    the route taken, which the init report needs."""
    check_weight(weight, r)
    if not (isinstance(scaling, (int, float)) and scaling > 0 and scaling != float("inf")):
        raise ValueError(f"scaling={scaling!r} must be a positive finite number (LoRA's alpha / r)")
    _selection(init, generator)  # an unknown init or a missing generator fails before the finiteness pass
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or inf; fix the checkpoint before decomposing it")

    out_f, in_f = weight.shape
    k = min(out_f, in_f)
    idx = select_indices(k, r, init, generator)
    route = resolve_method(method, (out_f, in_f), weight.device)
    if route == "gram":
        U, S, V, sigma_max = _gram_triplets(weight, idx)
    else:
        driver = "gesvda" if route == "gesvda" else None
        U_all, S_all, Vh_all = torch.linalg.svd(weight.to(torch.float32), full_matrices=False, driver=driver)
        idx_d = idx.to(weight.device)
        U, S, V, sigma_max = U_all[:, idx_d], S_all[idx_d], Vh_all[idx_d].T, float(S_all[0])

    root = torch.sqrt(S / scaling)
    B = (U * root).to(torch.float32).contiguous()
    A = (root[:, None] * V.T).to(torch.float32).contiguous()
    return Decomposition(A, B, sigma_max, route)


def init_health(A0: torch.Tensor, sigma_max: float, scaling: float, route: str) -> tuple[dict, Optional[str]]:
    """Figures of one adapter's starting point, and a warning when it starts nearly dead.

    Returns ({"sigma_max", "selected_min", "selected_max", "a0_vs_lora"}, warning or None). The selected singular
    values are scaling * ||A0_i||^2 (A0's rows carry sqrt(sigma_i / s)); a0_vs_lora is ||A0||_F over the expected
    norm sqrt(r / 3) of PEFT's Kaiming-uniform A, i.e. how B's step-0 gradient compares with LoRA's.
    """
    r = A0.shape[0]
    selected = scaling * A0.detach().double().pow(2).sum(dim=1).cpu()
    smin, smax_sel = float(selected.min()), float(selected.max())
    a0_vs_lora = float(A0.detach().double().norm()) / math.sqrt(r / 3)
    figures = {"sigma_max": sigma_max, "selected_min": smin, "selected_max": smax_sel, "a0_vs_lora": a0_vs_lora}
    problems = []
    relative = smin / sigma_max if sigma_max > 0 else 0.0
    floor = RESOLUTION.get(route, RESOLUTION["svd"])
    if relative < floor:
        problems.append(
            f"selected singular values down to {smin:.2e} = {relative:.1e} x sigma_max {sigma_max:.2e} (condition "
            f"number {1 / relative if relative else float('inf'):.1e}), below what the {route} route resolves "
            f"(~{floor:.0e} x sigma_max): those directions are numerically zero or arbitrary"
        )
    if a0_vs_lora < WEAK_START:
        problems.append(
            f"||A0|| is {a0_vs_lora:.1e} of LoRA's Kaiming A, so B's gradients start "
            + (f"~{1 / a0_vs_lora:.0e}x smaller than LoRA's" if a0_vs_lora > 0 else "at zero")
        )
    if not problems:
        return figures, None
    return figures, "adapter starts nearly dead: " + "; ".join(problems) + " (init 'principal' or 'lora' avoids it)"


def _gram_triplets(weight: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Selected singular triplets (U: out x r, S: r, V: in x r), fp64, via the Gram matrix of the smaller side,
    and the largest singular value (from the largest eigenvalue, which the Gram route gets to full precision)."""
    W = weight.to(torch.float64)
    transposed = W.shape[0] < W.shape[1]
    if transposed:  # work on the tall orientation: the Gram matrix is then the small one
        W = W.T
    k = W.shape[1]
    evals, evecs = torch.linalg.eigh(W.T @ W)  # eigenvalues ascending: descending index i is column k-1-i
    cols = (k - 1 - idx).to(W.device)
    V_k = evecs[:, cols]  # right vectors of the selected triplets, accurate to fp64 / the spectral gap
    # Rayleigh-Ritz on the other side: W V_k = Q R, R = P diag(S) Z^T  =>  W (V_k Z) = (Q P) diag(S).
    Q, R = torch.linalg.qr(W @ V_k)
    P, S, Zt = torch.linalg.svd(R)
    U, V = Q @ P, V_k @ Zt.T
    if transposed:
        U, V = V, U
    return U, S, V, math.sqrt(max(float(evals[-1]), 0.0))
