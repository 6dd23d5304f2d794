"""Results over seeds: the mean and spread of every figure, and the table that compares runs by them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from milora_vlm.analysis.report import SubspaceReport


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


def comparison_table(summaries: Mapping[str, Mapping[str, Spread]], figures: Sequence[tuple[str, str]]) -> str:
    """Markdown: one row per run label, one column per (figure name, header), cells "mean ± std"."""
    lines = ["| run | " + " | ".join(h for _, h in figures) + " |", "|" + "---|" * (len(figures) + 1)]
    for label, summ in summaries.items():
        lines.append(f"| {label} | " + " | ".join(summ[n].fmt() if n in summ else "n/a" for n, _ in figures) + " |")
    return "\n".join(lines) + "\n"
