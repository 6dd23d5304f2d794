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

One module per concept: `maths` (tensors in, figures out), `walk` (which weights of a model and what their
update is), `report` (a checkpoint's SubspaceReport, its table and files), `seeds` (mean and spread over seeds),
`plots` (PNG files) and `forgetting`; their public names are importable from here. All decompositions are plain
`torch.linalg.svd` in float64 by default: this is analysis, it needs the full U and V of W (top and bottom)
and of dW, not the minor factors that the init's decomposition helper returns, and it runs once per
module, so a plain SVD is the simple correct choice. For 7B-size models restrict the modules analysed
(`layers` / `modules` filters) or run on a GPU (`device`).
"""

from milora_vlm.analysis.forgetting import Forgetting, forgetting_ce, forgetting_stats
from milora_vlm.analysis.maths import (
    GRID_KEYS,
    METRICS,
    DeltaAnalysis,
    DeltaDecomposition,
    analyze_delta,
    delta_similarity_grids,
    projection_norm,
    random_frame,
    random_frame_norm,
    sample_random_frame_norm,
    similarity_grid,
    subspace_similarity,
    svd,
    top_r_norm,
)
from milora_vlm.analysis.plots import (
    HEATMAP_PANELS,
    plot_comparison,
    plot_module_heatmaps,
    plot_similarity_grids,
    safe_name,
)
from milora_vlm.analysis.report import (
    TABLE_COLUMNS,
    TABLE_LEGEND,
    ModuleResult,
    SubspaceReport,
    analyze_checkpoint,
    analyze_deltas,
    default_grid_module,
    format_value,
    json_safe,
    markdown_table,
    write_report,
)
from milora_vlm.analysis.seeds import Spread, comparison_table, mean_and_spread, summarize_over_seeds
from milora_vlm.analysis.walk import (
    DEFAULT_FULL_TARGETS,
    ModuleDelta,
    init_offset,
    iter_full_deltas,
    iter_lora_deltas,
    module_location,
    name_filter,
)
# the label value that forgetting_stats does not score (tests build labels with it)
from milora_vlm.data.templates import IGNORE_INDEX

__all__ = [
    "DEFAULT_FULL_TARGETS",
    "DeltaAnalysis",
    "DeltaDecomposition",
    "Forgetting",
    "GRID_KEYS",
    "HEATMAP_PANELS",
    "IGNORE_INDEX",
    "METRICS",
    "ModuleDelta",
    "ModuleResult",
    "Spread",
    "SubspaceReport",
    "TABLE_COLUMNS",
    "TABLE_LEGEND",
    "analyze_checkpoint",
    "analyze_delta",
    "analyze_deltas",
    "comparison_table",
    "default_grid_module",
    "delta_similarity_grids",
    "forgetting_ce",
    "forgetting_stats",
    "format_value",
    "init_offset",
    "iter_full_deltas",
    "iter_lora_deltas",
    "json_safe",
    "markdown_table",
    "mean_and_spread",
    "module_location",
    "name_filter",
    "plot_comparison",
    "plot_module_heatmaps",
    "plot_similarity_grids",
    "projection_norm",
    "random_frame",
    "random_frame_norm",
    "safe_name",
    "sample_random_frame_norm",
    "similarity_grid",
    "subspace_similarity",
    "summarize_over_seeds",
    "svd",
    "top_r_norm",
    "write_report",
]
