"""The seeded "subset in file order" that the demo, its report and the inits comparison draw their questions with."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def seeded_subset(items: Sequence[T], n: int | None, rng: random.Random | int | str = 0) -> list[T]:
    """At most `n` of `items`, drawn with `rng` (a random.Random, advanced in place, or a seed), kept in their order.

    n None or n >= len(items): all of them, and nothing is drawn from `rng`. The same seed and items give the
    same subset, whatever n is used for, so every model is evaluated on the same questions.
    """
    if n is None or n >= len(items):
        return list(items)
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    keep = set(rng.sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]
