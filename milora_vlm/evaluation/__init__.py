"""Scoring model answers exactly as the published benchmarks score them, and generating those answers.

One module per benchmark family; `tasks.TASKS` maps a task name (`eval/score.py --task NAME`) to its scorer.
Every scorer returns the same JSON-able shape (see `inputs.make_result`): a headline `score` in 0-100, the
task's own `metrics`, and `counts` saying how many gold items there were and how many predictions were
missing or unparsable (both scored as wrong).
"""

from .inputs import EvalInputError

__all__ = ["EvalInputError"]
