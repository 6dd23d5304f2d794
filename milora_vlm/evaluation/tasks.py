"""The task registry behind `eval/score.py --task NAME`: which scorer, and which of the CLI's inputs it needs.

Adding a benchmark is adding a module with a `score_*` function and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .commonsense import score_commonsense
from .exact import score_exact
from .gqa import score_gqa
from .gsm8k import score_gsm8k
from .inputs import EvalInputError, Result
from .math_equivalence import score_math
from .mme import score_mme
from .pope import score_pope
from .scienceqa import score_scienceqa
from .vqa import score_textvqa, score_vizwiz, score_vqav2


@dataclass(frozen=True)
class Task:
    fn: Callable[..., Result]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    summary: str = ""


_VQA_OPTIONAL = ("questions", "allow_unknown", "answer_processing")
TASKS: dict[str, Task] = {
    "vqav2": Task(score_vqav2, ("predictions", "annotations"), _VQA_OPTIONAL, "official VQA accuracy"),
    "vizwiz": Task(score_vizwiz, ("predictions", "annotations"), _VQA_OPTIONAL, "official VizWiz accuracy"),
    "textvqa": Task(score_textvqa, ("predictions", "annotations"), _VQA_OPTIONAL, "LLaVA/m4c TextVQA accuracy"),
    "gqa": Task(score_gqa, ("predictions", "questions"), ("allow_unknown",), "GQA testdev-balanced exact match"),
    "pope": Task(score_pope, ("predictions", "questions"), ("annotation_dir", "allow_unknown"), "POPE acc/P/R/F1"),
    "scienceqa": Task(score_scienceqa, ("predictions", "problems"), ("split", "split_file", "allow_unknown"),
                      "ScienceQA(-IMG) letter accuracy"),
    "mme": Task(score_mme, ("predictions", "questions"), ("mme_root", "allow_unknown"), "MME perception/cognition"),
    "commonsense": Task(score_commonsense, ("predictions", "questions"), ("dataset", "allow_unknown"),
                        "LLM-Adapters commonsense accuracy"),
    "gsm8k": Task(score_gsm8k, ("predictions", "questions"), ("allow_unknown", "protocol"),
                  "GSM8K accuracy (strict: MetaMath; --protocol milora: the MiLoRA paper's grader)"),
    "math": Task(score_math, ("predictions", "questions"), ("time_limit", "allow_unknown", "protocol"),
                 "MATH accuracy (strict default; --protocol milora: the MiLoRA paper's grader)"),
    "exact": Task(score_exact, ("predictions", "questions"), ("allow_unknown",), "normalised exact match"),
}


def run_task(name: str, **inputs) -> Result:
    """Score one task from keyword inputs (None = not given); errors name what is missing or not used."""
    if name not in TASKS:
        raise EvalInputError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    task = TASKS[name]
    missing = [k for k in task.required if inputs.get(k) is None]
    if missing:
        raise EvalInputError(f"task {name!r} needs " + ", ".join("--" + k.replace("_", "-") for k in missing))
    given = {k for k, v in inputs.items() if v is not None and v is not False}
    unused = sorted(given - set(task.required) - set(task.optional))
    if unused:
        raise EvalInputError(f"task {name!r} does not use " + ", ".join("--" + k.replace("_", "-") for k in unused))
    kwargs = {k: inputs[k] for k in task.required + task.optional if inputs.get(k) is not None}
    return task.fn(**kwargs)
