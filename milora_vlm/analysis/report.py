"""A SubspaceReport: the figures of every analysed module of one checkpoint (from deltas or from a checkpoint
directory), its Markdown table, and `write_report` (JSON, Markdown and plots in one folder)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from milora_vlm.analysis.maths import METRICS, DeltaAnalysis, analyze_delta, delta_similarity_grids
from milora_vlm.analysis.plots import plot_module_heatmaps, plot_similarity_grids
from milora_vlm.analysis.walk import (
    DEFAULT_FULL_TARGETS,
    ModuleDelta,
    iter_full_deltas,
    iter_lora_deltas,
    module_location,
    name_filter,
)
from milora_vlm.model.load import ADAPTER_KINDS, checkpoint_kind, load_adapter, load_base


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
                grids[d.name] = delta_similarity_grids(dec, r)
        component, layer, module = module_location(d.name)
        results.append(ModuleResult(d.name, component, layer, module, d.weight.shape[0], d.weight.shape[1], res))
    if not results:
        raise ValueError(f"{label}: no module to analyse (check the module / layer filters and the adapter's targets)")
    if keep_all:
        chosen = default_grid_module([r.name for r in results])
        grids = {n: g for n, g in grids.items() if n == chosen}
    return SubspaceReport(label, results, grids, list(skipped or []), dict(meta or {}))


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
    # float32: the update of a bf16 model is computed exactly in float32 / float64
    base = load_base(base_path, torch.float32).eval()
    full = kind not in ADAPTER_KINDS
    meta = {"base": os.fspath(base_path), "checkpoint": os.fspath(path), "kind": "full" if full else kind}
    skipped: list[str] = []
    if full:
        if rank is None:
            raise ValueError(f"{path} is a fully finetuned model: give the rank r of dW's directions to compare (e.g. the adapters' r)")
        finetuned = load_base(path, torch.float32, kind).eval()
        include = name_filter(targets if targets is not None else DEFAULT_FULL_TARGETS, layers)
        deltas = iter_full_deltas(finetuned, base, include, rank)
    else:
        model = load_adapter(base, path, residual="offset")  # MiLoRA: offset form, so the base stays the original W
        if kind == "milora":
            meta["milora"] = dataclasses.asdict(model.milora_config)
        model.eval()
        include = name_filter(targets, layers) if (targets is not None or layers is not None) else None
        deltas = iter_lora_deltas(model, include=include, skipped=skipped)
    return analyze_deltas(deltas, label, rank=rank, grid_modules=grid_modules, dtype=dtype, device=device,
                          skipped=skipped, meta=meta)


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
