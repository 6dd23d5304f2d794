"""Where does finetuning move a weight? The LoRA paper's subspace analysis (Hu et al. 2021, section 7.3), as
the MiLoRA paper uses it, plus the MiLoRA paper's forgetting measure.

For a frozen weight W (out x in) and the learned update dW (the finetuned weight minus the ORIGINAL W):
- U, V = the top-r left / right singular vectors of dW. ||U^T W V||_F says how much of W lives in the
  directions the update uses. Next to it: W's own top-r value sqrt(sum of its r largest sigma^2) (the most
  any r-frame can get) and a random r-frame's (see `random_frame_norm`).
- amplification = ||dW||_F / ||U^T W V||_F: large when the update uses directions W barely uses
  (LoRA paper: "low-rank adaptation amplifies features not emphasised in W").
- phi(A, B, i, j) = ||A_i^T B_j||_F^2 / min(i, j): overlap of the spans of the first i columns of A and the
  first j columns of B (LoRA paper, eq. in section 7.2), 0 = orthogonal, 1 = one contains the other.
  Here: dW's top-i singular directions against W's top-j and bottom-j ones, left (U) and right (V).

The maths takes tensors (first section); the model walking takes a PeftModel or two models (second
section); tables, plots and the over-seeds summary follow. All decompositions are plain
`torch.linalg.svd` in float64 by default: this is analysis, it needs the full U and V of W (top and bottom)
and of dW, not the minor factors that the init's decomposition helper returns, and it runs once per
module, so a plain SVD is the simple correct choice. For 7B-size models restrict the modules analysed
(`layers` / `modules` filters) or run on a GPU (`device`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from milora_vlm.data.templates import IGNORE_INDEX

# ----------------------------------------------------------------------------------------------------------
# Maths on tensors
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Walking models: which weights, and what their update is
# ----------------------------------------------------------------------------------------------------------

_PEFT_PREFIX = "base_model.model."
_LAYER_RE = re.compile(r"^(?P<component>.*?)\.?layers\.(?P<layer>\d+)\.(?P<module>.+)$")


def module_location(name: str) -> tuple[str, int | None, str]:
    """(component, layer, module) of a module path, e.g. "model.language_model.layers.3.self_attn.q_proj" ->
    ("model.language_model", 3, "self_attn.q_proj"); a module outside any `layers.N` block gets layer None."""
    m = _LAYER_RE.match(name)
    if m:
        return m["component"], int(m["layer"]), m["module"]
    parent, _, leaf = name.rpartition(".")
    return parent, None, leaf


@dataclass
class ModuleDelta:
    """One weight to analyse: its path in the base model, the ORIGINAL weight W and the learned update dW."""

    name: str
    weight: torch.Tensor  # (out, in)
    delta: torch.Tensor  # (out, in): finetuned effective weight minus the original W
    rank: int | None  # the adapter's rank for this module; None for full finetuning


def _lora_factor_delta(layer, adapter: str) -> torch.Tensor:
    """s * B @ A in float64, (out, in) (PEFT's get_delta_weight without its round trip through the weight's
    dtype, and without its transpose to Conv1D's (in, out) storage)."""
    A = layer.lora_A[adapter].weight.detach().double()
    B = layer.lora_B[adapter].weight.detach().double()
    return layer.scaling[adapter] * (B @ A)


def iter_lora_deltas(
    peft_model: nn.Module,
    adapter: str | None = None,
    base_weights: Mapping[str, torch.Tensor] | None = None,
    include: Callable[[str], bool] | None = None,
    skipped: list[str] | None = None,
) -> Iterator[ModuleDelta]:
    """The update of every LoRA Linear layer of `peft_model` to its ORIGINAL weight, one module at a time.

    dW = s (B A - B0 A0) where the layer holds initial factors (MiLoRA / PiSSA, either residual mode; see
    `init_offset`), else s B A (plain LoRA: B0 A0 = 0); float64, CPU, (out, in) layout. The original W is
    `base_weights[name]` when given (a state dict of the untouched base, keys "<module>.weight"), else the
    layer's base weight with any subtracted initial part added back. Layers that are not LoRA Linear (embedding, conv) are reported
    in `skipped` (if a list is passed) rather than silently dropped.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    subtract_factors = getattr(peft_model, "milora_subtract_factors", None)
    config = getattr(peft_model, "milora_config", None)  # a MiLoRAConfig on models from apply/load_milora
    expects_factors = config is not None and config.init != "lora"
    for full_name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        name = full_name[len(_PEFT_PREFIX):] if full_name.startswith(_PEFT_PREFIX) else full_name
        if include is not None and not include(name):
            continue
        active = adapter or (layer.active_adapters[0] if layer.active_adapters else None)
        if active is None or active not in layer.lora_A:
            if skipped is not None:
                skipped.append(f"{name}: no LoRA adapter {active!r} on this layer")
            continue
        if not isinstance(layer, LoraLinear):
            if skipped is not None:
                skipped.append(f"{name}: {type(layer).__name__} is not a LoRA Linear layer; only Linear weights are analysed")
            continue
        if layer.use_dora.get(active, False):
            raise ValueError(f"{name}: DoRA layers rescale W's columns; their update is not s B A and is not analysed here")
        if getattr(layer, "merged", False):
            raise ValueError(f"{name}: adapter is merged into the base weight; analyse the unmerged PeftModel")
        delta = _lora_factor_delta(layer, active).cpu()
        offset, subtracted = init_offset(layer, active, name, subtract_factors)
        if offset is None and expects_factors:
            raise ValueError(
                f"{name}: the adapter was initialised from SVD factors (init={config.init!r}, residual="
                f"{config.residual!r}) but this layer carries none; its update cannot be told apart from W"
            )
        if offset is not None:
            delta = delta - offset
        if base_weights is not None:
            key = f"{name}.weight"
            if key not in base_weights:
                raise KeyError(f"{name}: the base model has no weight {key!r}; is it the adapter's base?")
            weight = base_weights[key].detach().double().cpu()
            if getattr(layer, "fan_in_fan_out", False):
                weight = weight.mT
        else:
            weight = layer.get_base_layer().weight.detach().double().cpu()
            if getattr(layer, "fan_in_fan_out", False):
                weight = weight.mT
            if subtracted and offset is not None:
                weight = weight + offset  # "subtract" residual: the layer stores W_res = W - s B0 A0
        yield ModuleDelta(name, weight, delta, int(layer.r[active]))


def init_offset(
    layer, adapter: str, name: str, subtract_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> tuple[torch.Tensor | None, bool]:
    """(s * B0 @ A0 in float64, (out, in) layout; whether it was subtracted from the stored base weight), or
    (None, False) for a layer without initial factors (plain LoRA).

    Where milora_vlm.milora keeps B0, A0: the "offset" residual registers them as buffers on the layer
    (milora.offset.frozen_factors); the "subtract" residual folds them into W and keeps them on the PeftModel
    as `milora_subtract_factors` {name: (A0, B0)}, passed here as `subtract_factors`.
    """
    from milora_vlm.milora.offset import frozen_factors, has_offset

    if has_offset(layer, adapter):
        A0, B0 = frozen_factors(layer, adapter)
        subtracted = False
    elif subtract_factors is not None and name in subtract_factors:
        A0, B0 = subtract_factors[name]
        subtracted = True
    else:
        return None, False
    offset = layer.scaling[adapter] * (B0.detach().double().to(A0.device) @ A0.detach().double())
    return offset.cpu(), subtracted


def iter_full_deltas(
    finetuned: nn.Module,
    base: nn.Module | Mapping[str, torch.Tensor],
    include: Callable[[str], bool],
    rank: int,
) -> Iterator[ModuleDelta]:
    """dW = W_finetuned - W_base for every nn.Linear of `finetuned` whose name `include` accepts (full
    finetuning as the reference; analysed with dW's top-`rank` directions)."""
    base_sd = base if isinstance(base, Mapping) else base.state_dict()
    found = False
    for name, module in finetuned.named_modules():
        if not isinstance(module, nn.Linear) or not include(name):
            continue
        key = f"{name}.weight"
        if key not in base_sd:
            raise KeyError(f"{name}: the base model has no weight {key!r}; is it the finetuned model's base?")
        found = True
        W = base_sd[key].detach().double()
        yield ModuleDelta(name, W, module.weight.detach().double() - W, rank)
    if not found:
        raise ValueError("no nn.Linear module of the finetuned model matched the module filter")


def name_filter(targets: str | Sequence[str] | None, layers: Sequence[int] | None = None) -> Callable[[str], bool]:
    """A module-name predicate: `targets` a regex (full match) or a list of name suffixes (PEFT's rule),
    `layers` a list of layer indices; None accepts everything."""

    def accept(name: str) -> bool:
        if targets is not None:
            if isinstance(targets, str):
                if not re.fullmatch(targets, name):
                    return False
            elif not any(name == t or name.endswith("." + t) for t in targets):
                return False
        if layers is not None:
            return module_location(name)[1] in set(layers)
        return True

    return accept


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A saved base or fully finetuned model: LLaVA (llava-hf format) or a causal LM, in eval mode.

    float32 by default: the update of a bf16 model is computed exactly in float32 / float64.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(path)
    cls = LlavaForConditionalGeneration if config.model_type == "llava" else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype).eval()


def checkpoint_kind(path: str | os.PathLike) -> str:
    """"milora" (save_milora's directory), "peft" (a plain PEFT LoRA adapter) or "full" (a finetuned model)."""
    from milora_vlm.milora.persist import META_FILE

    if os.path.exists(os.path.join(path, META_FILE)):
        return "milora"
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        return "peft"
    if os.path.exists(os.path.join(path, "config.json")):
        return "full"
    raise FileNotFoundError(
        f"{path}: neither a MiLoRA / PEFT adapter (adapter_config.json) nor a saved model (config.json)"
    )


# The language model's block projections (Llama naming; LLaVA or plain causal LM): what a full finetune is
# compared on when no targets are given. The vision tower is left out.
DEFAULT_FULL_TARGETS = r"(model\.language_model|model)\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"


def analyze_checkpoint(
    base_path: str | os.PathLike,
    path: str | os.PathLike,
    label: str | None = None,
    rank: int | None = None,
    targets: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    grid_modules: Sequence[str] | str | None = "default",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> SubspaceReport:
    """Load the base and one finetuned checkpoint (MiLoRA adapter, PEFT LoRA adapter or full model) and analyse it.

    MiLoRA adapters are restored with `load_milora(..., residual="offset")` whatever their residual form, so
    the base weights stay the original W. targets / layers restrict the modules (see `name_filter`); for a
    full finetune targets default to `DEFAULT_FULL_TARGETS` and `rank` is required.
    """
    kind = checkpoint_kind(path)
    label = label or os.path.basename(os.path.normpath(path))
    base = load_model(base_path)
    meta = {"base": os.fspath(base_path), "checkpoint": os.fspath(path), "kind": kind}
    skipped: list[str] = []
    if kind == "full":
        if rank is None:
            raise ValueError(f"{path} is a fully finetuned model: give the rank r of dW's directions to compare (e.g. the adapters' r)")
        finetuned = load_model(path)
        include = name_filter(targets if targets is not None else DEFAULT_FULL_TARGETS, layers)
        deltas = iter_full_deltas(finetuned, base, include, rank)
    else:
        if kind == "milora":
            from milora_vlm.milora.persist import load_milora

            model = load_milora(base, path, residual="offset")
            meta["milora"] = dataclasses.asdict(model.milora_config)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, os.fspath(path))
        model.eval()
        include = name_filter(targets, layers) if (targets is not None or layers is not None) else None
        deltas = iter_lora_deltas(model, include=include, skipped=skipped)
    return analyze_deltas(deltas, label, rank=rank, grid_modules=grid_modules, dtype=dtype, device=device,
                          skipped=skipped, meta=meta)


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModuleResult:
    name: str
    component: str
    layer: int | None
    module: str
    out_features: int
    in_features: int
    analysis: DeltaAnalysis

    def row(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "analysis"}
        d.update(asdict(self.analysis))
        return d


GRID_KEYS = ("left_top", "left_bottom", "right_top", "right_bottom")


@dataclass
class SubspaceReport:
    """The analysis of one finetuned model (adapter or full finetune) against its base."""

    label: str
    modules: list[ModuleResult]
    # phi(dW_i, W_j) grids for a few modules: name -> {GRID_KEYS: (r, r) tensor}, entry [i-1, j-1]
    grids: dict[str, dict[str, torch.Tensor]]
    skipped: list[str]
    meta: dict

    def module_mean(self) -> dict[str, float]:
        """Each metric averaged over the analysed modules (NaN if any module's value is NaN)."""
        return {m: float(sum(getattr(r.analysis, m) for r in self.modules) / len(self.modules)) for m in METRICS}

    def flat(self) -> dict[str, float]:
        """{"<module>/<metric>": value} for every module and {"mean/<metric>": ...}: what summarize_over_seeds reads."""
        out = {f"{r.name}/{m}": float(getattr(r.analysis, m)) for r in self.modules for m in METRICS}
        out.update({f"mean/{m}": v for m, v in self.module_mean().items()})
        return out

    def to_json(self) -> dict:
        return json_safe({
            "label": self.label,
            "meta": self.meta,
            "modules": [r.row() for r in self.modules],
            "mean_over_modules": self.module_mean(),
            "similarity_grids": {n: {k: g.tolist() for k, g in gs.items()} for n, gs in self.grids.items()},
            "skipped": self.skipped,
        })


def json_safe(obj):
    """NaN / inf -> None (recursively), so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def default_grid_module(names: Sequence[str]) -> str | None:
    """The module whose phi(i, j) grids get plotted by default: the middle layer's query projection, as the
    papers' layer-16 q_proj of a 32-layer model, else the middle layer's first module."""
    located = [(module_location(n), n) for n in names]
    layered = sorted((loc[1], loc[2], n) for loc, n in located if loc[1] is not None)
    if not layered:
        return names[0] if names else None
    layers = sorted({l for l, _, _ in layered})
    mid = layers[len(layers) // 2]
    at_mid = [(mod, n) for l, mod, n in layered if l == mid]
    for mod, n in at_mid:
        if mod.endswith("q_proj"):
            return n
    return at_mid[0][1]


def _similarity_grids(dec: DeltaDecomposition, r: int) -> dict[str, torch.Tensor]:
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


def analyze_deltas(
    deltas: Iterable[ModuleDelta],
    label: str,
    rank: int | None = None,
    grid_modules: Sequence[str] | str | None = "default",
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    skipped: list[str] | None = None,
    meta: dict | None = None,
) -> SubspaceReport:
    """Analyse every module of `deltas` (see `analyze_delta`) into a SubspaceReport.

    rank: r for every module (default: each module's adapter rank; required for full finetuning).
    grid_modules: modules whose phi(i, j) grids (i, j = 1..r) are kept for plotting: names, "default"
      (`default_grid_module`, decided after the walk) or None.
    """
    # "default" is only known once all names are seen: keep every module's grids (r x r each) and prune at the end,
    # rather than holding every module's (out x in) matrices in memory.
    keep_all = grid_modules == "default"
    grid_set = set() if keep_all else set(grid_modules or ())
    results, grids = [], {}
    for d in tqdm(deltas, desc=f"subspace analysis {label}", unit="module", leave=False):
        r = rank or d.rank
        if r is None:
            raise ValueError(f"{d.name}: no adapter rank to take dW's top-r directions from; pass rank=")
        want_grid = keep_all or d.name in grid_set
        res = analyze_delta(d.weight, d.delta, r, dtype=dtype, device=device, return_decomposition=want_grid)
        if want_grid:
            res, dec = res
            if dec.U_delta is not None:
                grids[d.name] = _similarity_grids(dec, r)
        component, layer, module = module_location(d.name)
        results.append(ModuleResult(d.name, component, layer, module, d.weight.shape[0], d.weight.shape[1], res))
    if not results:
        raise ValueError(f"{label}: no module to analyse (check the module / layer filters and the adapter's targets)")
    if keep_all:
        chosen = default_grid_module([r.name for r in results])
        grids = {n: g for n, g in grids.items() if n == chosen}
    return SubspaceReport(label, results, grids, list(skipped or []), dict(meta or {}))


# ----------------------------------------------------------------------------------------------------------
# Over seeds
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Spread:
    """Mean and spread of one figure over seeds: std is the sample standard deviation (n - 1; 0 for n = 1)."""

    mean: float
    std: float
    n: int
    min: float
    max: float

    def fmt(self, digits: int = 3) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        return f"{self.mean:.{digits}g}" if self.n == 1 else f"{self.mean:.{digits}g} ± {self.std:.2g}"


def mean_and_spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no values to summarise")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return Spread(float(t.mean()), std, len(values), float(t.min()), float(t.max()))


def summarize_over_seeds(results: Sequence[SubspaceReport | Mapping[str, float]]) -> dict[str, Spread]:
    """Mean and spread over seeds of every figure, by name.

    Each result is a SubspaceReport (read through `SubspaceReport.flat()`: "<module>/<metric>" and
    "mean/<metric>") or a plain {name: value} mapping (e.g. {"new_acc": 0.91, "forgetting_ce": 0.4}).
    All results must carry the same names: a seed that lacks one is an error naming it, not a silently
    shorter average.
    """
    if not results:
        raise ValueError("summarize_over_seeds: no results given")
    flats = [r.flat() if isinstance(r, SubspaceReport) else dict(r) for r in results]
    names = list(flats[0])
    for i, f in enumerate(flats[1:], start=1):
        if set(f) != set(names):
            missing, extra = sorted(set(names) - set(f)), sorted(set(f) - set(names))
            raise ValueError(f"result {i} differs from result 0 in its figures: missing {missing[:5]}, extra {extra[:5]}")
    return {n: mean_and_spread([f[n] for f in flats]) for n in names}


# ----------------------------------------------------------------------------------------------------------
# Tables and plots
# ----------------------------------------------------------------------------------------------------------

# (metric, column header) for the Markdown table
TABLE_COLUMNS = [
    ("weight_norm", "‖W‖"),
    ("delta_norm", "‖ΔW‖"),
    ("delta_proj_norm", "‖UᵀWV‖"),
    ("weight_top_norm", "W top-r"),
    ("random_proj_norm", "random"),
    ("amplification", "amplif."),
    ("sim_left_top", "φ_U top"),
    ("sim_left_bottom", "φ_U bottom"),
    ("sim_right_top", "φ_V top"),
    ("sim_right_bottom", "φ_V bottom"),
]

TABLE_LEGEND = (
    "U, V: the top-r singular vectors of ΔW (the learned update against the original W). ‖UᵀWV‖: how much of W "
    "lies in them; W top-r: the most any r-frame gets (W's own top-r singular vectors); random: random r-frames' "
    "root-mean-square value. amplif. = ‖ΔW‖ / ‖UᵀWV‖. φ = ‖A_rᵀB_r‖²/r (LoRA paper 7.2), ΔW's top-r left (U) "
    "or right (V) singular directions against W's top-r or bottom-r ones; 0 = orthogonal, 1 = same subspace."
)


def format_value(v: float | None, metric: str = "") -> str:
    """A table cell: similarities (metric "sim_*") with 3 decimals, other figures with 3 significant digits."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.3f}" if metric.startswith("sim") else f"{v:.3g}"


def markdown_table(report: SubspaceReport) -> str:
    """One row per module plus a mean row (a component column only when the report spans several)."""
    several = len({r.component for r in report.modules}) > 1
    head = (["component"] if several else []) + ["layer", "module", "r"] + [h for _, h in TABLE_COLUMNS]
    lines = [f"### {report.label}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.modules:
        cells = ([r.component] if several else []) + ["" if r.layer is None else str(r.layer), r.module, str(r.analysis.rank)]
        cells += [format_value(getattr(r.analysis, m), m) for m, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    mean = report.module_mean()
    pad = ["**mean**"] + [""] * (len(head) - len(TABLE_COLUMNS) - 1)
    lines.append("| " + " | ".join(pad + [format_value(mean[m], m) for m, _ in TABLE_COLUMNS]) + " |")
    if report.skipped:
        lines += ["", f"Skipped ({len(report.skipped)}): " + "; ".join(report.skipped)]
    return "\n".join(lines) + "\n"


def comparison_table(summaries: Mapping[str, Mapping[str, Spread]], figures: Sequence[tuple[str, str]]) -> str:
    """Markdown: one row per run label, one column per (figure name, header), cells "mean ± std"."""
    lines = ["| run | " + " | ".join(h for _, h in figures) + " |", "|" + "---|" * (len(figures) + 1)]
    for label, summ in summaries.items():
        lines.append(f"| {label} | " + " | ".join(summ[n].fmt() if n in summ else "n/a" for n, _ in figures) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: SubspaceReport, outdir: str) -> dict[str, str]:
    """subspace.json, subspace.md and the PNGs of one report in `outdir`; returns {kind: path}."""
    os.makedirs(outdir, exist_ok=True)
    paths = {"json": os.path.join(outdir, "subspace.json"), "markdown": os.path.join(outdir, "subspace.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report.to_json(), f, indent=1)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown_table(report) + "\n" + TABLE_LEGEND + "\n")
    paths.update(plot_module_heatmaps(report, outdir))
    paths.update(plot_similarity_grids(report, outdir))
    return paths


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def safe_name(name: str) -> str:
    """A file-name-safe version of a module or run name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


HEATMAP_PANELS = [
    ("amplification", "amplification ‖ΔW‖/‖UᵀWV‖"),
    ("sim_left_top", "φ(U_ΔW, U_W top-r)"),
    ("sim_left_bottom", "φ(U_ΔW, U_W bottom-r)"),
    ("sim_right_top", "φ(V_ΔW, V_W top-r)"),
    ("sim_right_bottom", "φ(V_ΔW, V_W bottom-r)"),
]


def plot_module_heatmaps(report: SubspaceReport, outdir: str) -> dict[str, str]:
    """Per component (e.g. the language model): layers x modules heat maps of amplification and of the four
    similarities. One PNG per component: heatmap_<component>.png."""
    plt = _plt()
    by_component: dict[str, list[ModuleResult]] = {}
    for r in report.modules:
        by_component.setdefault(r.component, []).append(r)
    paths = {}
    for component, rows in by_component.items():
        layers = sorted({r.layer for r in rows}, key=lambda l: -1 if l is None else l)
        modules = sorted({r.module for r in rows})
        panel_w, panel_h = 1.4 + 0.35 * len(modules), 1.6 + 0.3 * len(layers)
        fig, axes = plt.subplots(1, len(HEATMAP_PANELS), figsize=(panel_w * len(HEATMAP_PANELS), panel_h), squeeze=False)
        for ax, (metric, title) in zip(axes[0], HEATMAP_PANELS):
            grid = torch.full((len(layers), len(modules)), float("nan"))
            for r in rows:
                grid[layers.index(r.layer), modules.index(r.module)] = getattr(r.analysis, metric)
            kw = {"vmin": 0.0, "vmax": 1.0} if metric.startswith("sim") else {}
            im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", **kw)
            ax.set_title(title, fontsize=8)
            ax.set_xticks(range(len(modules)), [m.rpartition(".")[2] for m in modules], rotation=90, fontsize=7)
            ax.set_yticks(range(len(layers)), ["-" if l is None else str(l) for l in layers], fontsize=7)
            ax.set_ylabel("layer", fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.08)
        fig.suptitle(f"{report.label}: {component or 'model'}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(outdir, f"heatmap_{safe_name(component)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[f"heatmap:{component}"] = path
    return paths


def plot_similarity_grids(report: SubspaceReport, outdir: str) -> dict[str, str]:
    """For each module with kept grids: phi(dW top-i, W top-j) and phi(dW top-i, W bottom-j), i, j = 1..r,
    left and right singular vectors (the LoRA paper's figure 3 layout). similarity_<module>.png."""
    plt = _plt()
    paths = {}
    for name, grids in report.grids.items():
        fig, axes = plt.subplots(1, len(GRID_KEYS), figsize=(3.2 * len(GRID_KEYS), 3.2), squeeze=False)
        for ax, key in zip(axes[0], GRID_KEYS):
            side, which = key.split("_")
            g = grids[key]
            im = ax.imshow(g.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", origin="lower",
                           extent=(0.5, g.shape[1] + 0.5, 0.5, g.shape[0] + 0.5))
            ax.set_title(f"{'U' if side == 'left' else 'V'}: ΔW top-i vs W {which}-j", fontsize=8)
            ax.set_xlabel("j", fontsize=8)
            ax.set_ylabel("i", fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
        fig.suptitle(f"{report.label}: φ(i, j), {name}", fontsize=9)
        path = os.path.join(outdir, f"similarity_{safe_name(name)}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[f"similarity:{name}"] = path
    return paths


def plot_comparison(summaries: Mapping[str, Mapping[str, Spread]], figures: Sequence[tuple[str, str]], path: str) -> str:
    """Bars with error bars (mean ± std over seeds) of each figure, one group of bars per run label."""
    plt = _plt()
    labels = list(summaries)
    cols = min(5, len(figures))
    rows = math.ceil(len(figures) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(figures):]:
        ax.axis("off")
    for ax, (name, title) in zip(axes.flat, figures):
        means = [summaries[l][name].mean if name in summaries[l] else float("nan") for l in labels]
        stds = [summaries[l][name].std if name in summaries[l] else 0.0 for l in labels]
        ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# Forgetting (MiLoRA paper, analysis section)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Forgetting:
    ce: float  # forgetting_ce's figure
    agreement: float  # fraction of scored positions where the finetuned greedy token is the base's
    positions: int  # how many positions were scored


@torch.no_grad()
def forgetting_stats(finetuned: nn.Module, base: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> Forgetting:
    """How far the finetuned model's predictions moved from the base model's on held-out old-task text.

    Definition (the MiLoRA paper's "cross-entropy against the base model's predictions"): at every scored
    position t, the target is the base model's greedy next token argmax_v p_base(v | x_<=t), and `ce` is the
    finetuned model's cross-entropy -log p_ft(target | x_<=t), averaged over all scored positions of all
    batches (token-weighted). Scored positions: those whose next token is an answer token (labels[t+1] !=
    -100) when the batch has `labels`, else every position whose next token is attended (attention_mask[t+1]
    = 1). `ce` is 0 only if the finetuned model puts all its mass on the base's prediction; it mixes
    agreement with confidence (a finetuned model surer of the base's own answer scores lower than the base
    itself), so `agreement`, the share of positions where both greedy tokens are equal, is reported with it.

    Batches are model inputs (input_ids, attention_mask, pixel_values, ...) plus optional labels; both
    models must be on the batches' device and in eval mode (this function does not move or switch them).
    """
    total, agree, count = 0.0, 0, 0
    for batch in tqdm(batches, desc="forgetting CE", unit="batch", leave=False):
        labels = batch.get("labels")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if labels is not None:
            mask = labels[:, 1:] != IGNORE_INDEX
        elif "attention_mask" in batch:
            mask = batch["attention_mask"][:, 1:].bool()
        else:
            mask = torch.ones_like(batch["input_ids"][:, 1:], dtype=torch.bool)
        target = base(**inputs).logits[:, :-1].argmax(-1)
        logits = finetuned(**inputs).logits[:, :-1].float()
        if logits.shape[:2] != mask.shape:
            raise ValueError(f"logits cover {tuple(logits.shape[:2])} positions but the mask {tuple(mask.shape)}")
        total += float(torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum"))
        agree += int((logits[mask].argmax(-1) == target[mask]).sum())
        count += int(mask.sum())
    if count == 0:
        raise ValueError("forgetting_ce: no scored position in the batches (all labels are -100?)")
    return Forgetting(total / count, agree / count, count)


def forgetting_ce(finetuned: nn.Module, base: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """The MiLoRA paper's forgetting figure (lower = closer to the base); see `forgetting_stats`."""
    return forgetting_stats(finetuned, base, batches).ce
