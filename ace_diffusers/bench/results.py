"""Reading a benchmark result (the JSON ``ace-diffusers bench`` writes): its erasures and methods, their
display labels, pooled attack success rates, and the targets the benchmark is checked against.

Shared by the Markdown page (:mod:`.report`) and the plots (:mod:`.plots`); pure functions of the dict.
"""

from __future__ import annotations

import statistics
from typing import Any

from .efficacy import pool_attacks
from .efficacy_plans import METHODS

TARGET_H = 0.90
TARGET_ASR = 0.20
TARGET_OVERHEAD_1 = 1.03
TARGET_OVERHEAD_100 = 1.10
TARGET_SPEEDUP = 10.0


def erasures_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The efficacy section's erasures (none when the section was not run)."""
    eff = result.get("sections", {}).get("efficacy")
    return eff["erasures"] if eff else []


def method_keys(result: dict[str, Any]) -> list[str]:
    """The methods the efficacy section measured, in its order."""
    eff = result["sections"]["efficacy"]
    return list(eff.get("methods", METHODS))


def display_label(label: str, erasure: dict[str, Any]) -> str:
    """An erasure's name in tables and plots: its label for one concept, ``"n concepts"`` for several."""
    n = len(erasure["concepts"])
    return label if n == 1 else f"{n} concepts"


def pooled_asr(result: dict[str, Any], method: str) -> dict[str, dict[str, Any]]:
    """ASR per attack for ``method``, pooling every attack image of every erasure:
    ``{attack: {asr, hits, n}}``."""
    return pool_attacks(
        e["methods"][method]["attacks"] for e in erasures_of(result) if e["methods"].get(method)
    )


def mean_h(group: list[dict[str, Any]], method: str) -> float | None:
    """Mean H of ``method`` over the erasures of ``group`` that measured it (None if none did)."""
    values = [e["methods"][method]["metrics"]["h"] for e in group if method in e["methods"]]
    return statistics.fmean(values) if values else None
