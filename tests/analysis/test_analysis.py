"""Subspace analysis (LoRA paper 7.3 in MiLoRA's use) on matrices and tiny models whose answers are known."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from milora_vlm import analysis as an
from tests.helpers import load_script


@pytest.fixture(autouse=True)
def one_thread():
    """These matrices are tiny: on a shared 2-core machine OpenMP's thread hand-off costs 100x the SVD itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def known_svd_matrix(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = U diag(S) V^T with random orthonormal U, V and well-separated singular values 10 > ... > 0.1."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = an.random_frame(m, k, g)
    V = an.random_frame(n, k, g)
    S = torch.logspace(1, -1, k, dtype=torch.float64)
    return U @ torch.diag(S) @ V.T, U, S, V


# ---------------------------------------------------------------- maths


def test_delta_in_bottom_subspace_is_orthogonal_to_top():
    W, U, S, V = known_svd_matrix(48, 32)
    r, k = 4, 32
    dW = U[:, k - r:] @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0], dtype=torch.float64)) @ V[:, k - r:].T
    res = an.analyze_delta(W, dW, r)
    assert res.sim_left_bottom == pytest.approx(1.0, abs=1e-9)
    assert res.sim_right_bottom == pytest.approx(1.0, abs=1e-9)
    assert res.sim_left_top == pytest.approx(0.0, abs=1e-9)
    assert res.sim_right_top == pytest.approx(0.0, abs=1e-9)
    # U^T W V picks W's r smallest singular values
    assert res.delta_proj_norm == pytest.approx(float(S[k - r:].pow(2).sum().sqrt()), rel=1e-9)
    assert res.delta_norm == pytest.approx(math.sqrt(25 + 16 + 9 + 4), rel=1e-12)
    assert res.amplification == pytest.approx(res.delta_norm / res.delta_proj_norm, rel=1e-12)
    assert res.amplification > 10  # the update amplifies directions W barely uses


def test_delta_in_top_subspace_gives_weights_top_value():
    W, U, S, V = known_svd_matrix(40, 56, seed=1)
    r = 5
    c = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0], dtype=torch.float64)
    dW = U[:, :r] @ torch.diag(c) @ V[:, :r].T
    res = an.analyze_delta(W, dW, r)
    assert res.delta_proj_norm == pytest.approx(res.weight_top_norm, rel=1e-9)
    assert res.weight_top_norm == pytest.approx(float(S[:r].pow(2).sum().sqrt()), rel=1e-12)
    assert res.amplification == pytest.approx(float(c.norm()) / res.weight_top_norm, rel=1e-9)
    assert res.sim_left_top == pytest.approx(1.0, abs=1e-9) and res.sim_right_top == pytest.approx(1.0, abs=1e-9)
    assert res.sim_left_bottom == pytest.approx(0.0, abs=1e-9) and res.sim_right_bottom == pytest.approx(0.0, abs=1e-9)
    assert res.weight_norm == pytest.approx(float(torch.linalg.matrix_norm(W)), rel=1e-12)


def test_random_delta_scores_the_random_baseline():
    W, *_ = known_svd_matrix(96, 64, seed=2)
    r = 8
    g = torch.Generator().manual_seed(3)
    values = [an.analyze_delta(W, torch.randn(96, 64, generator=g, dtype=torch.float64), r).delta_proj_norm for _ in range(20)]
    baseline = an.random_frame_norm(W, r)
    assert baseline == pytest.approx(r * float(torch.linalg.matrix_norm(W)) / math.sqrt(96 * 64))
    mean = sum(values) / len(values)
    # closed form is the root-mean-square; the mean of 20 draws lies within ~3 standard errors of it
    std = torch.tensor(values).std().item()
    assert abs(mean - baseline) < 3 * std / math.sqrt(len(values)) + 0.02 * baseline
    # and far below what the top directions give
    assert mean < 0.3 * an.top_r_norm(torch.linalg.svdvals(W), r)


def test_sampled_random_frames_agree_with_closed_form():
    W, *_ = known_svd_matrix(96, 64, seed=4)
    mean, std = an.sample_random_frame_norm(W, 6, draws=64, seed=0)
    rms = an.random_frame_norm(W, 6)
    assert abs(mean - rms) < 3 * std / 8 + 0.02 * rms
    assert mean <= rms * 1.05  # E|x| <= sqrt(E x^2), up to sampling noise


def test_subspace_similarity_properties():
    g = torch.Generator().manual_seed(0)
    A, B = an.random_frame(30, 8, g), an.random_frame(30, 6, g)
    for i in range(1, 9):
        for j in range(1, 7):
            phi = an.subspace_similarity(A, B, i, j)
            assert 0.0 <= phi <= 1.0 + 1e-12
            assert phi == pytest.approx(an.subspace_similarity(B, A, j, i), abs=1e-12)
    assert an.subspace_similarity(A, A, 8, 8) == pytest.approx(1.0, abs=1e-12)
    assert an.subspace_similarity(A, A, 3, 8) == pytest.approx(1.0, abs=1e-12)  # span(A_3) inside span(A_8)
    # a rotated basis of the same space is the same subspace
    Q = an.random_frame(8, 8, g)
    assert an.subspace_similarity(A, A @ Q, 8, 8) == pytest.approx(1.0, abs=1e-12)
    # orthogonal complements score 0
    full = an.random_frame(30, 30, g)
    assert an.subspace_similarity(full[:, :10], full[:, 10:], 10, 20) == pytest.approx(0.0, abs=1e-12)
    grid = an.similarity_grid(A, B, 8, 6)
    assert grid.shape == (8, 6)
    for i in range(1, 9):
        for j in range(1, 7):
            assert grid[i - 1, j - 1] == pytest.approx(an.subspace_similarity(A, B, i, j), abs=1e-12)
    with pytest.raises(ValueError, match="1 <= i"):
        an.subspace_similarity(A, B, 0, 1)
    with pytest.raises(ValueError, match="different spaces"):
        an.subspace_similarity(A, an.random_frame(31, 2, g), 1, 1)


def test_bad_inputs_are_rejected():
    W, *_ = known_svd_matrix(12, 10)
    with pytest.raises(ValueError, match="differ in shape"):
        an.analyze_delta(W, torch.zeros(10, 12), 2)
    with pytest.raises(ValueError, match="rank r=11"):
        an.analyze_delta(W, W, 11)
    with pytest.raises(ValueError, match="NaN"):
        an.analyze_delta(W, torch.full_like(W, float("nan")), 2)
    zero = an.analyze_delta(W, torch.zeros_like(W), 2)  # an untrained plain LoRA adapter: no directions
    assert zero.delta_norm == 0.0 and math.isnan(zero.amplification) and math.isnan(zero.sim_left_top)


def test_summarize_over_seeds_mean_and_std():
    runs = [{"acc": 0.5, "ce": 1.0}, {"acc": 0.7, "ce": 2.0}, {"acc": 0.9, "ce": 6.0}]
    s = an.summarize_over_seeds(runs)
    assert s["acc"].mean == pytest.approx(0.7) and s["acc"].std == pytest.approx(0.2)  # sample std (n - 1)
    assert s["ce"].mean == pytest.approx(3.0) and s["ce"].std == pytest.approx(math.sqrt(7.0))
    assert (s["ce"].min, s["ce"].max, s["ce"].n) == (1.0, 6.0, 3)
    assert an.summarize_over_seeds(runs[:1])["acc"].std == 0.0
    with pytest.raises(ValueError, match="missing \\['ce'\\]"):
        an.summarize_over_seeds([runs[0], {"acc": 0.1}])
    with pytest.raises(ValueError, match="no results"):
        an.summarize_over_seeds([])


def test_summarize_over_seeds_reads_reports():
    W, U, S, V = known_svd_matrix(20, 16)
    reports = []
    for scale in (1.0, 3.0):
        d = an.ModuleDelta("model.layers.0.self_attn.q_proj", W, scale * U[:, :2] @ V[:, :2].T, 2)
        reports.append(an.analyze_deltas([d], f"seed{scale}"))
    s = an.summarize_over_seeds(reports)
    norms = [math.sqrt(2), 3 * math.sqrt(2)]
    assert s["model.layers.0.self_attn.q_proj/delta_norm"].mean == pytest.approx(sum(norms) / 2)
    assert s["mean/delta_norm"].std == pytest.approx(abs(norms[1] - norms[0]) / math.sqrt(2))
    assert s["mean/sim_left_top"].mean == pytest.approx(1.0)


def test_module_location():
    assert an.module_location("model.language_model.layers.3.self_attn.q_proj") == ("model.language_model", 3, "self_attn.q_proj")
    assert an.module_location("model.layers.12.mlp.down_proj") == ("model", 12, "mlp.down_proj")
    assert an.module_location("model.multi_modal_projector.linear_1") == ("model.multi_modal_projector", None, "linear_1")


# ---------------------------------------------------------------- model walking


@pytest.fixture()
def tiny_lm(tiny_tokenizer):
    from milora_vlm.model.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tiny_tokenizer, hidden=32, layers=2, heads=4).eval()


def _set_lora_to(layer, adapter: str, dW: torch.Tensor) -> None:
    """Hand-set A, B so that s B A = dW (dW of rank <= r): B = U sqrt(S / s), A = sqrt(S / s) V^T."""
    r, s = layer.r[adapter], layer.scaling[adapter]
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    root = (S[:r] / s).sqrt()
    with torch.no_grad():
        layer.lora_B[adapter].weight.copy_((U[:, :r] * root).float())
        layer.lora_A[adapter].weight.copy_((root[:, None] * Vh[:r]).float())


def test_walker_on_peft_lora_with_hand_set_factors(tiny_lm):
    base_sd = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    r = 4
    model = get_peft_model(tiny_lm, LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    expected = {}
    for name, layer in model.named_modules():
        if not hasattr(layer, "lora_A") or "default" not in getattr(layer, "lora_A", {}):
            continue
        short = name.removeprefix("base_model.model.")
        W = layer.get_base_layer().weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = S.numel()
        # q_proj: update inside W's bottom directions; v_proj: inside its top directions
        idx = slice(k - r, k) if short.endswith("q_proj") else slice(0, r)
        dW = U[:, idx] @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ Vh[idx]
        _set_lora_to(layer, "default", dW)
        expected[short] = (W, dW, S, idx)
    skipped: list[str] = []
    report = an.analyze_deltas(an.iter_lora_deltas(model, skipped=skipped), "hand-set", grid_modules=None)
    assert sorted(m.name for m in report.modules) == sorted(expected)
    assert skipped == []
    for m in report.modules:
        W, dW, S, idx = expected[m.name]
        a = m.analysis
        assert a.rank == r and (m.out_features, m.in_features) == tuple(W.shape)
        assert a.delta_norm == pytest.approx(math.sqrt(30), rel=1e-5)  # fp32 LoRA factors
        assert a.delta_proj_norm == pytest.approx(float(S[idx].pow(2).sum().sqrt()), rel=1e-4)
        top = m.module.endswith("v_proj")
        assert a.sim_left_top == pytest.approx(1.0 if top else 0.0, abs=1e-4)
        assert a.sim_right_bottom == pytest.approx(0.0 if top else 1.0, abs=1e-4)
        assert m.layer in (0, 1) and m.component == "model"
    # the same answer with the original weights taken from a separate copy of the base
    again = an.analyze_deltas(an.iter_lora_deltas(model, base_weights=base_sd), "again", grid_modules=None)
    assert [m.analysis.delta_proj_norm for m in again.modules] == pytest.approx([m.analysis.delta_proj_norm for m in report.modules])


@pytest.mark.parametrize("residual", ["offset", "subtract"])
def test_walker_subtracts_milora_initial_factors(tiny_lm, residual):
    """MiLoRA init, then B = 2 B0, A = A0: dW = s (2 B0 A0 - B0 A0) = W's minor part, in either residual form."""
    from milora_vlm.milora.apply import apply_milora
    from milora_vlm.milora.config import MiLoRAConfig

    originals = {n: m.weight.detach().double().clone() for n, m in tiny_lm.named_modules() if n.endswith("k_proj")}
    r = 3
    model = apply_milora(tiny_lm, MiLoRAConfig(r=r, lora_alpha=6, target_modules=["k_proj"], init="minor", residual=residual))
    report_init = an.analyze_deltas(an.iter_lora_deltas(model), "init", grid_modules=None)
    assert all(m.analysis.delta_norm < 1e-6 for m in report_init.modules)  # step 0: no update yet
    for name, layer in model.named_modules():
        if name.endswith("k_proj") and hasattr(layer, "lora_B"):
            with torch.no_grad():
                layer.lora_B["default"].weight.mul_(2.0)
    report = an.analyze_deltas(an.iter_lora_deltas(model), "trained", grid_modules=None)
    assert len(report.modules) == len(originals) == 2
    for m in report.modules:
        S = torch.linalg.svdvals(originals[m.name])
        minor = float(S[-r:].pow(2).sum().sqrt())
        a = m.analysis
        assert a.weight_norm == pytest.approx(float(S.pow(2).sum().sqrt()), rel=1e-5)  # the ORIGINAL W
        assert a.delta_norm == pytest.approx(minor, rel=1e-4)
        assert a.delta_proj_norm == pytest.approx(minor, rel=1e-3)
        assert a.amplification == pytest.approx(1.0, rel=1e-3)
        assert a.sim_left_bottom == pytest.approx(1.0, abs=1e-3) and a.sim_left_top == pytest.approx(0.0, abs=1e-3)


def test_full_finetune_deltas(tiny_lm):
    import copy

    finetuned = copy.deepcopy(tiny_lm)
    W = tiny_lm.model.layers[1].mlp.up_proj.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    with torch.no_grad():
        finetuned.model.layers[1].mlp.up_proj.weight.add_((U[:, :2] @ Vh[:2]).float())
    include = an.name_filter(an.DEFAULT_FULL_TARGETS, layers=[1])
    report = an.analyze_deltas(an.iter_full_deltas(finetuned, tiny_lm, include, rank=2), "full", grid_modules=None)
    by_name = {m.name: m.analysis for m in report.modules}
    assert set(by_name) == {f"model.layers.1.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    up = by_name["model.layers.1.mlp.up_proj"]
    assert up.sim_left_top == pytest.approx(1.0, abs=1e-4) and up.delta_norm == pytest.approx(math.sqrt(2), rel=1e-4)
    assert by_name["model.layers.1.mlp.down_proj"].delta_norm == 0.0
    with pytest.raises(ValueError, match="no nn.Linear"):
        list(an.iter_full_deltas(finetuned, tiny_lm, an.name_filter(["nonexistent"]), rank=2))


def test_report_files(tmp_path):
    W, U, S, V = known_svd_matrix(24, 16)
    # dW's first direction is W's smallest singular direction, its second the second smallest
    bottom2 = U[:, -2:] @ torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)) @ V[:, -2:].T
    deltas = [an.ModuleDelta(f"model.layers.{l}.self_attn.{p}", W, bottom2 * (l + 1), 2)
              for l in range(3) for p in ("q_proj", "v_proj")]
    report = an.analyze_deltas(deltas, "demo adapter", meta={"kind": "test"})
    assert list(report.grids) == ["model.layers.1.self_attn.q_proj"]  # the middle layer's q_proj
    grid = report.grids["model.layers.1.self_attn.q_proj"]
    assert grid["left_bottom"][-1, -1] == pytest.approx(1.0, abs=1e-5) and grid["left_top"][-1, -1] == pytest.approx(0.0, abs=1e-5)
    # "bottom-j" counts from the smallest singular value: dW's top-1 direction is W's bottom-1
    assert grid["left_bottom"][0, 0] == pytest.approx(1.0, abs=1e-5) and grid["right_bottom"][0, 0] == pytest.approx(1.0, abs=1e-5)
    paths = an.write_report(report, str(tmp_path / "out"))
    pngs = [p for k, p in paths.items() if p.endswith(".png")]
    assert len(pngs) == 2  # one heat map (one component) + one similarity grid
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.loads(open(paths["json"]).read())
    assert len(data["modules"]) == 6 and data["meta"] == {"kind": "test"}
    assert data["modules"][0]["sim_left_bottom"] == pytest.approx(1.0, abs=1e-6)
    md = open(paths["markdown"]).read()
    assert "| 1 | self_attn.q_proj | 2 |" in md and "**mean**" in md


# ---------------------------------------------------------------- forgetting


def test_forgetting_ce_matches_a_direct_computation(tiny_lm):
    import copy

    finetuned = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        finetuned.lm_head.weight.add_(0.5 * torch.randn_like(finetuned.lm_head.weight))
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 100, (2, 7), generator=g)
    labels = torch.full_like(input_ids, an.IGNORE_INDEX)
    labels[0, 4:6] = input_ids[0, 4:6]
    labels[1, 6] = input_ids[1, 6]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    got = an.forgetting_ce(finetuned, tiny_lm, [batch])
    # by hand: positions t whose next token is an answer token, target = base argmax at t
    with torch.no_grad():
        bl, fl = tiny_lm(input_ids).logits, finetuned(input_ids).logits
    terms = []
    for b, t in [(0, 3), (0, 4), (1, 5)]:
        target = int(bl[b, t].argmax())
        terms.append(-torch.log_softmax(fl[b, t], -1)[target].item())
    assert got == pytest.approx(sum(terms) / 3, rel=1e-5)
    stats = an.forgetting_stats(finetuned, tiny_lm, [batch])
    assert stats.ce == got and stats.positions == 3
    same_token = [int(fl[b, t].argmax()) == int(bl[b, t].argmax()) for b, t in [(0, 3), (0, 4), (1, 5)]]
    assert stats.agreement == pytest.approx(sum(same_token) / 3)
    # unchanged model: full agreement, only the base's own uncertainty left
    same = an.forgetting_stats(tiny_lm, tiny_lm, [batch])
    assert same.agreement == 1.0 and same.ce < got
    with pytest.raises(ValueError, match="no scored position"):
        an.forgetting_ce(finetuned, tiny_lm, [{**batch, "labels": torch.full_like(labels, an.IGNORE_INDEX)}])


# ---------------------------------------------------------------- command line


def test_cli_on_milora_peft_and_full_checkpoints(tmp_path, tiny_causal_lm_dir):
    """scripts/analyze_subspace.py on three kinds of checkpoint of one base; each saved with its own library."""
    from milora_vlm.milora.apply import apply_milora
    from milora_vlm.milora.config import MiLoRAConfig
    from milora_vlm.milora.persist import save_milora
    from milora_vlm.model.load import load_base

    base = load_base(tiny_causal_lm_dir, torch.float32)
    W_k0 = base.model.layers[0].self_attn.k_proj.weight.detach().double().clone()
    # MiLoRA adapter, subtract form, then "trained": B = 2 B0  =>  dW = W's minor part (see the walker test)
    mil = apply_milora(base, MiLoRAConfig(r=2, lora_alpha=2, target_modules=["k_proj", "v_proj"], residual="subtract"))
    with torch.no_grad():
        for n, p in mil.named_parameters():
            if "lora_B" in n:
                p.mul_(2.0)
    save_milora(mil, tmp_path / "milora")
    # plain PEFT LoRA with a known update in layer 0's k_proj top directions
    peft_model = get_peft_model(load_base(tiny_causal_lm_dir, torch.float32), LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]))
    U, S, Vh = torch.linalg.svd(W_k0, full_matrices=False)
    _set_lora_to(peft_model.base_model.model.model.layers[0].self_attn.k_proj, "default", U[:, :2] @ Vh[:2])
    peft_model.save_pretrained(tmp_path / "lora")
    # full finetune: every k_proj moved along W's bottom direction
    full = load_base(tiny_causal_lm_dir, torch.float32)
    with torch.no_grad():
        full.model.layers[0].self_attn.k_proj.weight.add_((U[:, -1:] @ Vh[-1:]).float())
    full.save_pretrained(tmp_path / "full")

    cli = load_script("scripts/analyze_subspace.py", "analyze_subspace")
    out = tmp_path / "out"
    reports = cli.main(["--base", str(tiny_causal_lm_dir), "--output", str(out), "--adapter", str(tmp_path / "milora"),
                        "--adapter", str(tmp_path / "lora"), "--modules", "k_proj", "--layers", "0"])
    assert set(reports) == {"milora", "lora"}
    (mk,), (lk,) = reports["milora"].modules, reports["lora"].modules
    assert mk.name == lk.name == "model.layers.0.self_attn.k_proj"
    assert mk.analysis.delta_norm == pytest.approx(float(S[-2:].pow(2).sum().sqrt()), rel=1e-4)
    assert mk.analysis.sim_left_bottom == pytest.approx(1.0, abs=1e-3) and mk.analysis.amplification == pytest.approx(1.0, rel=1e-3)
    assert lk.analysis.delta_proj_norm == pytest.approx(float(S[:2].pow(2).sum().sqrt()), rel=1e-4)
    assert lk.analysis.sim_right_top == pytest.approx(1.0, abs=1e-4)
    for label in ("milora", "lora"):
        assert (out / label / "subspace.json").exists() and list((out / label).glob("heatmap_*.png"))
    assert (out / "comparison.png").exists() and "| milora |" in (out / "comparison.md").read_text()

    with pytest.raises(SystemExit, match="^error: .*full: .*give the rank"):  # one line, no traceback
        cli.main(["--base", str(tiny_causal_lm_dir), "--output", str(out), "--adapter", str(tmp_path / "full")])
    full_report = cli.main(["--base", str(tiny_causal_lm_dir), "--output", str(out), "--adapter", str(tmp_path / "full"),
                            "--rank", "1", "--modules", "k_proj"])["full"]
    by_layer = {m.layer: m.analysis for m in full_report.modules}
    assert by_layer[0].sim_left_bottom == pytest.approx(1.0, abs=1e-4) and by_layer[1].delta_norm == 0.0
    with pytest.raises(SystemExit, match="^error: .*neither"):
        cli.main(["--base", str(tiny_causal_lm_dir), "--output", str(out), "--adapter", str(tmp_path)])


def test_cli_names_an_adapter_whose_modules_the_base_lacks(tmp_path, tiny_causal_lm_dir):
    """An adapter trained on another model (its target modules are not in --base): one line naming both, not PEFT's
    bare NoMatchingPeftModuleError."""
    from milora_vlm.model.load import load_base

    peft_model = get_peft_model(load_base(tiny_causal_lm_dir, torch.float32), LoraConfig(r=2, target_modules=["k_proj"]))
    peft_model.save_pretrained(tmp_path / "lora")
    config = tmp_path / "lora" / "adapter_config.json"
    config.write_text(config.read_text().replace('"k_proj"', '"wk"'))  # as a GPT-NeoX-style model would name it
    cli = load_script("scripts/analyze_subspace.py", "analyze_subspace")
    with pytest.raises(SystemExit, match=rf"^error: .*lora: its adapter's modules are not in --base {tiny_causal_lm_dir}"):
        cli.main(["--base", str(tiny_causal_lm_dir), "--output", str(tmp_path / "out"), "--adapter", str(tmp_path / "lora")])
