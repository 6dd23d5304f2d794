"""Plots (PNG files) of subspace reports and of runs compared over seeds."""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from milora_vlm.analysis.maths import GRID_KEYS

if TYPE_CHECKING:  # annotations only: report.py imports this module
    from milora_vlm.analysis.report import ModuleResult, SubspaceReport
    from milora_vlm.analysis.seeds import Spread


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
