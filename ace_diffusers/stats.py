"""Binomial statistics for every rate the project reports (ground layer: used by the world and eval).

Erasure figures rest on a few dozen images per cell, so each rate is printed with its 95 % interval.
"""

from __future__ import annotations

import math

from .errors import ACEValueError


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default); ``(0, 1)`` when ``total`` is 0.

    Benchmarks here use a few dozen images per set, so every rate comes with its uncertainty.
    """
    if total < 0 or successes < 0 or successes > total:
        raise ACEValueError(f"Need 0 <= successes <= total, got {successes}/{total}.")
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
