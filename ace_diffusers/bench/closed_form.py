"""Closed-form fit speed at Stable Diffusion 1.5's real sizes (random weights: costs are real, outputs not).

``ace-diffusers bench closed-form`` builds an SD1.5-shaped pipeline from configs (CLIP ViT-L/14-sized
text encoder, 860 M-parameter UNet with 16 cross-attention layers of text width 768), then times
``erase_concept(..., load=False)`` for 1, 10 and 100 concepts, cold (first call in the process, every
preset prompt encoded) and warm (preset prompts cached), and reports peak extra memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from typing import Any

import torch

FIRST = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas"]
LAST = ["Varga", "Lindqvist", "Moreau", "Okafor", "Petrov", "Quintana", "Rossi", "Sato", "Tanaka", "Weber"]
TARGET_SECONDS_PER_CONCEPT = 0.5
TARGET_SECONDS_100 = 20.0


def concept_names(n: int) -> list[str]:
    """Deterministic made-up artist names (a random-weight encoder has no notion of fame anyway)."""
    names = [f"{first} {last}" for last in LAST for first in FIRST]
    if n > len(names):
        raise ValueError(f"at most {len(names)} concepts")
    return names[:n]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(counts: tuple[int, ...] = (1, 10, 100), threads: int | None = None) -> dict[str, Any]:
    from .. import erase_concept
    from ..closed_form import _cache
    from ..testing import sd15_shaped_pipeline

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    pipe = sd15_shaped_pipeline()
    build_seconds = time.perf_counter() - started
    baseline_rss = peak_rss_mb()
    rows = []
    for n in counts:
        concepts = concept_names(n)
        _cache.clear()  # cold: nothing cached
        t0 = time.perf_counter()
        adapter = erase_concept(pipe, concepts, kind="style", load=False)
        cold = time.perf_counter() - t0
        warm_concepts = [f"{c} Jr" for c in concepts]  # new concepts, but preset prompts already cached
        t0 = time.perf_counter()
        erase_concept(pipe, warm_concepts, kind="style", load=False)
        warm = time.perf_counter() - t0
        rows.append(
            {
                "concepts": n,
                "rank": adapter.rank,
                "cold_seconds": round(cold, 3),
                "cold_seconds_per_concept": round(cold / n, 3),
                "warm_seconds": round(warm, 3),
                "warm_seconds_per_concept": round(warm / n, 3),
                "adapter_mb_fp16": round(adapter.num_parameters() * 2 / 2**20, 2),
            }
        )
    return {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "model": "SD1.5-shaped (random weights): CLIP-L text encoder, 16 cross-attention layers, d_text 768",
        "build_seconds": round(build_seconds, 1),
        "peak_extra_rss_mb": round(peak_rss_mb() - baseline_rss, 1),
        "rows": rows,
    }


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"# closed-form erase_concept at SD1.5 shape ({result['model']})",
        f"# {result['machine']}; pipeline built in {result['build_seconds']} s",
        "concepts  rank  cold s  cold s/concept  warm s  warm s/concept  adapter MB (fp16)",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['concepts']:>8}  {r['rank']:>4}  {r['cold_seconds']:>6.2f}  {r['cold_seconds_per_concept']:>14.3f}  "
            f"{r['warm_seconds']:>6.2f}  {r['warm_seconds_per_concept']:>14.3f}  {r['adapter_mb_fp16']:>17.2f}"
        )
    lines.append(f"peak extra memory during the fits: {result['peak_extra_rss_mb']} MB (RSS above the loaded pipeline)")
    by_n = {r["concepts"]: r for r in result["rows"]}
    checks = []
    for r in result["rows"]:
        ok = r["cold_seconds_per_concept"] <= TARGET_SECONDS_PER_CONCEPT
        checks.append(f"{r['concepts']} concepts: {r['cold_seconds_per_concept']:.3f} s/concept cold "
                      f"(target <= {TARGET_SECONDS_PER_CONCEPT}) {'MET' if ok else 'NOT MET'}")
    if 100 in by_n:
        ok = by_n[100]["cold_seconds"] <= TARGET_SECONDS_100
        checks.append(f"100 concepts: {by_n[100]['cold_seconds']:.1f} s cold (target <= {TARGET_SECONDS_100}) "
                      f"{'MET' if ok else 'NOT MET'}")
    return "\n".join(lines + checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ace-diffusers bench closed-form", description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the raw figures to this JSON file")
    args = parser.parse_args(argv)
    result = run(tuple(args.counts), args.threads)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0
