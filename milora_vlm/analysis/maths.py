"""The subspace analysis on tensors: SVDs, projection norms, random baselines, the LoRA paper's phi similarity,
and `analyze_delta`, every figure of one weight W and its update dW (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


def _as_matrix(M: torch.Tensor, name: str) -> torch.Tensor:
    if M.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {tuple(M.shape)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return M


def svd(M: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD M = U diag(S) V^T, singular values descending; returns (U, S, V) with V = Vh^T."""
    U, S, Vh = torch.linalg.svd(_as_matrix(M, "matrix").to(dtype), full_matrices=False)
    return U, S, Vh.mT


def top_r_norm(S: torch.Tensor, r: int) -> float:
    """||U_r^T W V_r||_F for W's own top-r singular vectors = sqrt(sum of the r largest sigma^2)."""
    return float(S[:r].pow(2).sum().sqrt())


def projection_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """||U^T W V||_F: the part of W inside the left frame U (out x r) and right frame V (in x r)."""
    if U.shape[0] != W.shape[0] or V.shape[0] != W.shape[1]:
        raise ValueError(f"frames {tuple(U.shape)}, {tuple(V.shape)} do not fit W {tuple(W.shape)}")
    return float(torch.linalg.matrix_norm(U.mT @ W.to(U.dtype) @ V))


def random_frame_norm(W: torch.Tensor, r: int) -> float:
    """The random baseline: sqrt(E ||U^T W V||_F^2) for U, V independent uniformly random orthonormal r-frames.

    Closed form, because E[U U^T] = (r / m) I for a uniform r-frame in R^m:
    E ||U^T W V||_F^2 = tr(E[U U^T] W E[V V^T] W^T) = r^2 ||W||_F^2 / (m n).
    (LLaMA-2-7B layer-16 q_proj, ||W||_F = 97.4, with r = 64 (the paper's math-setting rank): 1.52, next to the
    1.50 the MiLoRA paper quotes for "random"; E ||.||_F is a little below this root-mean-square.)
    `sample_random_frame_norm` draws frames instead; tests check that both agree.
    """
    m, n = W.shape
    return r * float(torch.linalg.matrix_norm(W.double())) / math.sqrt(m * n)


def random_frame(dim: int, r: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
    """A uniformly random orthonormal r-frame in R^dim (QR of a Gaussian matrix, signs fixed by R's diagonal)."""
    G = torch.randn(dim, r, generator=generator, dtype=dtype)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


def sample_random_frame_norm(W: torch.Tensor, r: int, draws: int = 32, seed: int = 0) -> tuple[float, float]:
    """Monte Carlo mean and standard deviation of ||U^T W V||_F over `draws` random r-frame pairs."""
    g = torch.Generator().manual_seed(seed)
    W64 = W.double()
    vals = torch.tensor([projection_norm(W64, random_frame(W.shape[0], r, g), random_frame(W.shape[1], r, g)) for _ in range(draws)])
    return float(vals.mean()), float(vals.std()) if draws > 1 else 0.0


def subspace_similarity(A: torch.Tensor, B: torch.Tensor, i: int, j: int) -> float:
    """phi(A, B, i, j) = ||A_i^T B_j||_F^2 / min(i, j) for orthonormal columns (LoRA paper, section 7.2).

    A_i = the first i columns of A. Symmetric (phi(A, B, i, j) = phi(B, A, j, i)), in [0, 1].
    """
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"subspaces live in different spaces: {A.shape[0]} vs {B.shape[0]} rows")
    if not (1 <= i <= A.shape[1] and 1 <= j <= B.shape[1]):
        raise ValueError(f"need 1 <= i <= {A.shape[1]} and 1 <= j <= {B.shape[1]}, got i={i}, j={j}")
    dtype = torch.promote_types(A.dtype, B.dtype)
    return float(torch.linalg.matrix_norm(A[:, :i].to(dtype).mT @ B[:, :j].to(dtype)).pow(2) / min(i, j))


def similarity_grid(A: torch.Tensor, B: torch.Tensor, max_i: int, max_j: int) -> torch.Tensor:
    """phi(A, B, i, j) for all i in 1..max_i, j in 1..max_j as a (max_i, max_j) tensor (entry [i-1, j-1]).

    One product and a 2-D cumulative sum instead of max_i * max_j products: ||A_i^T B_j||_F^2 is the sum of
    the squared entries of the top-left i x j block of A^T B.
    """
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"subspaces live in different spaces: {A.shape[0]} vs {B.shape[0]} rows")
    max_i, max_j = min(max_i, A.shape[1]), min(max_j, B.shape[1])
    dtype = torch.promote_types(A.dtype, B.dtype)
    sq = (A[:, :max_i].to(dtype).mT @ B[:, :max_j].to(dtype)).pow(2)
    cum = sq.cumsum(0).cumsum(1)
    i = torch.arange(1, max_i + 1, dtype=dtype).unsqueeze(1)
    j = torch.arange(1, max_j + 1, dtype=dtype).unsqueeze(0)
    return cum / torch.minimum(i, j)


@dataclass
class DeltaAnalysis:
    """The section 7.3 figures for one weight and its update (all Frobenius norms)."""

    rank: int  # r: how many of dW's top singular directions are used
    weight_norm: float  # ||W||_F
    delta_norm: float  # ||dW||_F
    delta_proj_norm: float  # ||U^T W V||_F, U, V = dW's top-r singular vectors
    weight_top_norm: float  # ||U_W^T W V_W||_F = sqrt(sum of W's r largest sigma^2)
    random_proj_norm: float  # random r-frames' value, `random_frame_norm`
    amplification: float  # ||dW||_F / ||U^T W V||_F
    sim_left_top: float  # phi(U_dW, U_W, r, r): dW's top-r left directions vs W's top-r
    sim_left_bottom: float  # ... vs W's bottom-r (the r smallest singular values)
    sim_right_top: float  # same with the right singular vectors V
    sim_right_bottom: float


METRICS = [f.name for f in fields(DeltaAnalysis) if f.name != "rank"]


@dataclass
class DeltaDecomposition:
    """What `analyze_delta` computed on the way, for plots that need more than the summary numbers."""

    U_delta: torch.Tensor  # (out, r)
    V_delta: torch.Tensor  # (in, r)
    U_weight: torch.Tensor  # (out, k), k = min(out, in), descending singular values
    V_weight: torch.Tensor  # (in, k)


def analyze_delta(
    W: torch.Tensor,
    dW: torch.Tensor,
    r: int,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    return_decomposition: bool = False,
) -> DeltaAnalysis | tuple[DeltaAnalysis, DeltaDecomposition]:
    """Section 7.3 figures of the update dW to the original weight W, with dW's top-r singular directions.

    A zero dW (e.g. an untrained plain-LoRA adapter, B = 0) has no directions: its direction-dependent
    figures are NaN. If rank(dW) < r, the extra singular vectors are an arbitrary basis of dW's null space,
    as in the LoRA paper's own analysis; choose r <= rank(dW) (MiLoRA's offset update has rank <= 2r).
    """
    _as_matrix(W, "W")
    _as_matrix(dW, "dW")
    if W.shape != dW.shape:
        raise ValueError(f"W {tuple(W.shape)} and dW {tuple(dW.shape)} differ in shape")
    k = min(W.shape)
    if not 1 <= r <= k:
        raise ValueError(f"rank r={r} must be between 1 and min(out, in) = {k}")
    W = W.to(device=device, dtype=dtype)
    dW = dW.to(device=device, dtype=dtype)
    U_w, S_w, V_w = svd(W, dtype)
    delta_norm = float(torch.linalg.matrix_norm(dW))
    if delta_norm == 0.0:
        nan = float("nan")
        U_d = V_d = None
        proj, amp, sims = nan, nan, (nan, nan, nan, nan)
    else:
        U_d, _, V_d = svd(dW, dtype)
        U_d, V_d = U_d[:, :r], V_d[:, :r]
        proj = projection_norm(W, U_d, V_d)
        amp = delta_norm / proj if proj > 0 else float("inf")
        # bottom-r: W's r smallest singular directions (of the reduced SVD, as MiLoRA's minor part)
        sims = (
            subspace_similarity(U_d, U_w[:, :r], r, r),
            subspace_similarity(U_d, U_w[:, k - r :], r, r),
            subspace_similarity(V_d, V_w[:, :r], r, r),
            subspace_similarity(V_d, V_w[:, k - r :], r, r),
        )
    result = DeltaAnalysis(
        rank=r,
        weight_norm=float(S_w.pow(2).sum().sqrt()),
        delta_norm=delta_norm,
        delta_proj_norm=proj,
        weight_top_norm=top_r_norm(S_w, r),
        random_proj_norm=random_frame_norm(W, r),
        amplification=amp,
        sim_left_top=sims[0],
        sim_left_bottom=sims[1],
        sim_right_top=sims[2],
        sim_right_bottom=sims[3],
    )
    if return_decomposition:
        return result, DeltaDecomposition(U_d, V_d, U_w, V_w)
    return result


GRID_KEYS = ("left_top", "left_bottom", "right_top", "right_bottom")


def delta_similarity_grids(dec: DeltaDecomposition, r: int) -> dict[str, torch.Tensor]:
    """phi(dW's top-i, W's top-j / bottom-j) for i, j = 1..r, left and right; "bottom" columns run from W's
    smallest singular value up (column j = the (j+1)-th smallest)."""
    k = dec.U_weight.shape[1]
    grids = {
        "left_top": similarity_grid(dec.U_delta, dec.U_weight[:, :r], r, r),
        "left_bottom": similarity_grid(dec.U_delta, dec.U_weight[:, k - r:].flip(1), r, r),
        "right_top": similarity_grid(dec.V_delta, dec.V_weight[:, :r], r, r),
        "right_bottom": similarity_grid(dec.V_delta, dec.V_weight[:, k - r:].flip(1), r, r),
    }
    return {key: g.float().cpu() for key, g in grids.items()}
