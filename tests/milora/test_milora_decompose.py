"""minor_factors against a direct fp64 SVD on matrices with known, gapped spectra."""

from __future__ import annotations

import pytest
import torch

from milora_vlm.milora import minor_factors
from milora_vlm.milora.decompose import decompose, init_health, resolve_method, select_indices


def known_spectrum(m: int, n: int, seed: int = 0, cond: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """W = U diag(S) V^T with random orthonormal U, V and S log-spaced from 1 to 1/cond, times a factor-1.5 gap
    every 8 values (so every init's boundary sits on a gap for r = 8). Returns (W fp32, S descending fp64)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    S = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    S = S * 1.5 ** -(torch.arange(k) // 8).double()  # gaps between blocks of 8
    S = S / S[0]
    return ((U * S) @ V.T).float(), S


def exact_part(W: torch.Tensor, idx: torch.Tensor):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[:, idx] * S[idx]) @ Vh[idx], U[:, idx], Vh[idx].T


def max_principal_angle(X: torch.Tensor, Y: torch.Tensor) -> float:
    qx, _ = torch.linalg.qr(X.double())
    qy, _ = torch.linalg.qr(Y.double())
    cos = torch.linalg.svdvals(qx.T @ qy).clamp(max=1.0)
    return float(torch.arccos(cos.min()))


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)], ids=["tall", "wide"])
@pytest.mark.parametrize("init", ["minor", "principal", "middle", "random"])
@pytest.mark.parametrize("method", ["svd", "gram"])
@pytest.mark.parametrize("alpha", [4, 32])  # scaling 0.5 and 4
def test_reconstruction_matches_svd(shape, init, method, alpha):
    r = 8
    W, _ = known_spectrum(*shape)
    gen = torch.Generator().manual_seed(3) if init == "random" else None
    A, B = minor_factors(W, r, scaling=alpha / r, init=init, method=method, generator=gen)
    m, n = shape
    assert A.shape == (r, n) and B.shape == (m, r) and A.dtype == B.dtype == torch.float32
    idx = select_indices(min(shape), r, init, torch.Generator().manual_seed(3) if init == "random" else None)
    ref, _, _ = exact_part(W, idx)
    got = (alpha / r) * B.double() @ A.double()
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-4, f"{init}/{method}: relative reconstruction error {rel:.2e}"
    # B = U sqrt(S/s), A = sqrt(S/s) V^T: the two factors carry equal column / row norms
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(200, 120), (120, 200)], ids=["tall", "wide"])
@pytest.mark.parametrize("init", ["minor", "principal"])
@pytest.mark.parametrize("cond", [1e2, 1e3])  # overall condition numbers ~3e4 and ~3e5 with the gaps
def test_gram_subspace_within_1e4_of_exact(shape, init, cond):
    W, _ = known_spectrum(*shape, seed=1, cond=cond)
    A, B = minor_factors(W, 8, init=init, method="gram")
    idx = select_indices(min(shape), 8, init)
    _, U_ref, V_ref = exact_part(W, idx)
    assert max_principal_angle(A.T, V_ref) < 1e-4
    assert max_principal_angle(B, U_ref) < 1e-4


def test_gram_beats_fp32_svd_on_ill_conditioned_minor_part():
    # condition number ~3e6: the fp64 Gram route's error grows like 1e-16 kappa^2, fp32 SVD's like 6e-8 kappa
    W, _ = known_spectrum(200, 120, seed=1, cond=1e4)
    idx = select_indices(120, 8, "minor")
    _, U_ref, V_ref = exact_part(W, idx)
    angles = {}
    for method in ("gram", "svd"):
        A, B = minor_factors(W, 8, init="minor", method=method)
        angles[method] = max(max_principal_angle(A.T, V_ref), max_principal_angle(B, U_ref))
    assert angles["gram"] < 1e-3 < angles["svd"], angles


def test_minor_is_the_bottom_of_the_spectrum():
    W, S = known_spectrum(80, 48)
    A, B = minor_factors(W, 4, scaling=1.0, init="minor")
    # singular values of B A are the 4 smallest of W
    sv = torch.linalg.svdvals(B.double() @ A.double())[:4]
    torch.testing.assert_close(sv, S[-4:].to(sv.dtype), rtol=1e-4, atol=0)


def test_rank_deficient_weight_stays_finite():
    W, _ = known_spectrum(64, 48)
    W[:, :10] = 0  # 10 exact zero singular values: the minor factors are zero, never NaN
    for method in ("svd", "gram"):
        A, B = minor_factors(W, 8, method=method)
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        assert float((B @ A).abs().max()) < 1e-5


def test_bf16_and_fp16_weights_decompose_their_own_values():
    W, _ = known_spectrum(64, 64)
    for dtype in (torch.bfloat16, torch.float16):
        Wd = W.to(dtype)
        A, B = minor_factors(Wd, 8, init="principal")
        ref, _, _ = exact_part(Wd.float(), torch.arange(8))
        assert float((B.double() @ A.double() - ref).norm() / ref.norm()) < 1e-4


def test_random_mode_is_seeded_and_sorted():
    W, _ = known_spectrum(64, 64)
    a1 = minor_factors(W, 6, init="random", seed=5)[0]
    a2 = minor_factors(W, 6, init="random", generator=torch.Generator().manual_seed(5))[0]
    a3 = minor_factors(W, 6, init="random", seed=6)[0]
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    idx = select_indices(64, 6, "random", torch.Generator().manual_seed(5))
    assert torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == 6


def test_auto_method_choice():
    cpu = torch.device("cpu")
    assert resolve_method("auto", (4096, 4096), cpu) == "gram"
    assert resolve_method("auto", (64, 64), cpu) == "svd"
    assert resolve_method("auto", (4096, 4096), torch.device("mps")) == "svd"  # no fp64 there


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: torch.randn(8, 6), {"r": 0}, ValueError, "1 <= r"),
        (lambda: torch.randn(8, 6), {"r": 7}, ValueError, "min\\(out, in\\) = 6"),
        (lambda: torch.randn(8, 6), {"r": 2.0}, TypeError, "int"),
        (lambda: torch.randint(0, 5, (8, 6)), {"r": 2}, TypeError, "quantised"),
        (lambda: torch.randn(8, 6).to(torch.float8_e4m3fn), {"r": 2}, TypeError, "quantised"),
        (lambda: torch.randn(8, 6, 2), {"r": 2}, ValueError, "2-D"),
        (lambda: torch.empty(0, 6), {"r": 1}, ValueError, "GatheredParameters"),
        (lambda: torch.empty(0), {"r": 1}, ValueError, "GatheredParameters"),  # a ZeRO-3 shard placeholder
        (lambda: torch.empty(8, 6, device="meta"), {"r": 1}, ValueError, "meta"),
        (lambda: torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), {"r": 1}, ValueError, "NaN or inf"),
        (lambda: torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), {"r": 1}, ValueError, "NaN or inf"),
        (lambda: torch.randn(8, 6), {"r": 2, "init": "major"}, ValueError, "init"),
        (lambda: torch.randn(8, 6), {"r": 2, "method": "qr"}, ValueError, "method"),
        (lambda: torch.randn(8, 6), {"r": 2, "method": "gesvda"}, ValueError, "CUDA"),
        (lambda: torch.randn(8, 6), {"r": 2, "init": "random"}, ValueError, "seed"),
        (lambda: torch.randn(8, 6), {"r": 2, "scaling": 0.0}, ValueError, "scaling"),
        (lambda: [[1.0, 2.0]], {"r": 1}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        minor_factors(make(), **kwargs)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_init_health_flags_unresolvable_minor_part_with_numbers(method):
    # minor singular values ~1e-10 of the largest: beyond what either route separates from rounding
    W, S = known_spectrum(200, 120, seed=1, cond=1e7)
    d = decompose(W.double() if method == "gram" else W, 8, 2.0, "minor", method, None)
    figures, warning = init_health(d.A, d.sigma_max, 2.0, d.route)
    assert figures["sigma_max"] == pytest.approx(float(S[0]), rel=1e-4)
    assert figures["selected_min"] < 1e-6 * figures["sigma_max"]
    assert warning is not None and f"below what the {method} route resolves" in warning
    assert f"{figures['selected_min']:.2e}" in warning and "condition number" in warning


def test_init_health_flags_zero_singular_values_and_passes_healthy_ones():
    W, _ = known_spectrum(64, 48)
    W[:, :10] = 0  # rank 38: the 8 minor singular values are zero
    d = decompose(W, 8, 1.0, "minor", "auto", None)
    figures, warning = init_health(d.A, d.sigma_max, 1.0, d.route)
    assert figures["a0_vs_lora"] < 1e-3 and "smaller than LoRA's" in warning
    W, S = known_spectrum(64, 48, cond=1e2)
    for init in ("minor", "principal"):
        d = decompose(W, 8, 1.0, init, "auto", None)
        figures, warning = init_health(d.A, d.sigma_max, 1.0, d.route)
        assert warning is None, warning
        expected = S[-8:] if init == "minor" else S[:8]
        assert figures["selected_min"] == pytest.approx(float(expected.min()), rel=1e-4)
        assert figures["selected_max"] == pytest.approx(float(expected.max()), rel=1e-4)


@pytest.fixture
def scratch_inits(monkeypatch):
    """Inits registered by a test vanish after it."""
    from milora_vlm.milora import INITS

    monkeypatch.setattr(INITS, "_entries", dict(INITS._entries))


@pytest.mark.parametrize(
    "select, match",
    [
        (lambda k, r, g: torch.arange(k - r + 1, k), r"returned 3 indices for r = 4"),
        (lambda k, r, g: torch.tensor([0, 1, 1, 2]), "distinct indices in ascending order"),
        (lambda k, r, g: torch.arange(k - r + 1, k + 1), r"outside 0\.\.5"),
        (lambda k, r, g: torch.tensor([-1, 0, 1, 2]), r"outside 0\.\.5"),
        (lambda k, r, g: torch.arange(k - 1, k - r - 1, -1), "distinct indices in ascending order"),
        (lambda k, r, g: torch.arange(k - r, k).float(), "1-D integer tensor"),
        (lambda k, r, g: list(range(k - r, k)), "1-D integer tensor"),
        (lambda k, r, g: torch.tensor([True, True, False, True]), "1-D integer tensor"),  # would index as 0 / 1
    ],
    ids=["r-1", "duplicate", "past-k", "negative", "descending", "float", "list", "bool"],
)
def test_registered_init_breaking_the_index_contract_is_named(scratch_inits, select, match):
    """A custom init's bad indices fail in select_indices naming the init, not later as a PEFT shape error."""
    from milora_vlm.milora import register_init

    register_init("test_broken_init", "returns bad indices")(select)
    with pytest.raises(ValueError, match=rf"init 'test_broken_init'.*{match}"):
        select_indices(6, 4, "test_broken_init")
    with pytest.raises(ValueError, match="init 'test_broken_init'"):
        minor_factors(torch.randn(8, 6), 4, init="test_broken_init")


def test_well_behaved_custom_init_still_decomposes(scratch_inits):
    from milora_vlm.milora import register_init

    register_init("test_even_init", "every other triplet")(lambda k, r, g: torch.arange(0, 2 * r, 2, dtype=torch.int32))
    idx = select_indices(10, 4, "test_even_init")
    assert idx.tolist() == [0, 2, 4, 6] and idx.dtype == torch.long
    W = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    A, B = minor_factors(W, 4, init="test_even_init", method="svd")
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(B @ A, (U[:, idx] * S[idx]) @ Vh[idx], rtol=0, atol=1e-5)
