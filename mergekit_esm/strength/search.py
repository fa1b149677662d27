"""Golden-section search for the best α: the paper's strategy (tolerance 0.01, ≤ 15 steps)."""

import math
from collections.abc import Callable

INVERSE_PHI = (math.sqrt(5) - 1) / 2


def golden_section_max(
    score: Callable[[float], float],
    low: float,
    high: float,
    tolerance: float = 0.01,
    max_evaluations: int = 15,
) -> tuple[float, dict[float, float]]:
    """The x in [low, high] with the highest score(x) for a unimodal score, and every
    evaluation made (x → score). Each step keeps the bracket holding the better point and
    reuses the other interior point, so every step costs one evaluation."""
    seen: dict[float, float] = {}

    def f(x: float) -> float:
        x = round(x, 6)
        if x not in seen:
            seen[x] = score(x)
        return seen[x]

    a, b = low, high
    c, d = b - INVERSE_PHI * (b - a), a + INVERSE_PHI * (b - a)
    while b - a > tolerance and len(seen) < max_evaluations:
        if f(c) >= f(d):
            b, d = d, c
            c = b - INVERSE_PHI * (b - a)
        else:
            a, c = c, d
            d = a + INVERSE_PHI * (b - a)
    best = max(seen, key=seen.get) if seen else (a + b) / 2
    return best, seen
