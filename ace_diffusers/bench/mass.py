"""Mass erasure on the miniature world: ``ace-diffusers bench mass``.

One closed-form adapter erases a thousand unrelated words and two shapes at once. Does it still erase the
two shapes as well as the closed form must for one (the bars of the "erasure that holds" issue), and
leave the other shapes alone (Acc_s at least the base model's minus 2 points)? The fit is given what a
user would give: the 1,002 concepts, the empty anchor, the other shapes and the fill styles to
preserve, the shape templates — nothing of the world's vocabulary. The *benchmark* picks the thousand
words knowing the world: a seeded sample of the text encoder's whole vocabulary words that no training
caption contains and that the base model does not draw as a shape (the held-out words). Fits of more
than 16 concepts mine no neighbours, so the two shapes' synonyms are erased only as far as the closed
form generalises by itself. Every cell rests on at least 32 images, with its 95 % interval.

The fit's speed at SD1.5 shape, from nothing cached, is ``ace-diffusers bench closed-form --counts 1000``.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import helptext
from .._io import atomic_write_json
from ..fitting.closed_form import fit_adapter
from ..fitting.data import FitSettings
from ..fitting.presets import resolve_spec
from ..shapes.classifier import load_shapes_classifier
from ..shapes.erasure import DEFAULT_NEUTRAL, fit_templates, image_counts, measure
from ..shapes.heldout import candidate_words, heldout_words
from ..shapes.pipeline import load_shapes_pipeline
from ..shapes.vocab import SHAPES, STYLES
from .deploy import write_section
from .trainer_report import bar_failures, rate_cell

WORDS = 1000
ERASED = ("circle", "square")  # the demo's shapes, chosen before any run
SHOWN = [("acc_e", "erased"), ("acc_g", "synonyms"), ("acc_heldout", "heldout"), ("acc_s", "others"),
         ("in_context", "pairs")]


def unrelated_words(pipe: Any, count: int, seed: int = 0) -> list[str]:
    """``count`` whole vocabulary words (seeded sample) that no caption of the world contains and that
    the base model does not draw as a shape."""
    drawn = {w for words in heldout_words().values() for w in words}
    pool = [w for w in candidate_words(pipe.tokenizer) if w not in drawn]
    if count > len(pool):
        raise ValueError(f"only {len(pool)} unrelated words in this vocabulary, {count} asked for")
    return sorted(random.Random(seed).sample(pool, count))


def run(words: int = WORDS, erased: tuple[str, ...] = ERASED, images_per_prompt: int = 4,
        seed: int = 0) -> dict[str, Any]:
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = load_shapes_classifier()
    extra = unrelated_words(pipe, words, seed)
    concepts = list(erased) + extra
    kept = [c for c in SHAPES + STYLES if c not in erased]
    spec = resolve_spec(concepts, neutral=DEFAULT_NEUTRAL["shape"], preserve=kept,
                        templates=fit_templates("shape"))
    measured = {"images_per_prompt": images_per_prompt, "seed": seed, "erased": list(erased)}
    base = {c: measure(pipe, classifier, c, **measured)[0] for c in erased}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    adapter = fit_adapter(pipe, spec, FitSettings(), progress=True)
    seconds = time.perf_counter() - started
    peak_extra_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    name = pipe.load_ace_adapter(adapter, adapter_name="mass")
    try:
        after = {c: measure(pipe, classifier, c, **measured)[0] for c in erased}
    finally:
        pipe.unload_ace_adapter(name)
    rows = []
    for c in erased:
        counts = image_counts(c, list(erased), images_per_prompt)
        rows.append({"concept": c, "method": "closed form", "counts": counts, **after[c],
                     **{f"base_{k}": v for k, v in base[c].items()}})
    return {
        "words": words,
        "concepts": len(concepts),
        "sample": extra[:12],
        "rank": adapter.rank,
        "fit_seconds": round(seconds, 2),
        "peak_extra_rss_mb": round(peak_extra_mb, 1),
        "torch_threads": torch.get_num_threads(),
        "images_per_prompt": images_per_prompt,
        "rows": rows,
    }


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"# mass erasure on the miniature world: {result['concepts']} concepts in one closed-form adapter "
        f"({result['words']} unrelated words, e.g. {', '.join(result['sample'][:6])}, and the shapes below)",
        "",
        f"fit {result['fit_seconds']:.1f} s, rank {result['rank']}, peak extra memory "
        f"{result['peak_extra_rss_mb']:.0f} MB, {result['torch_threads']} torch threads (wall seconds of "
        "this run; the speed target is checked by `bench closed-form --counts 1000`)",
        "",
        "| concept | model | " + " | ".join(key for key, _ in SHOWN) + " |",
        "|---|---|" + "---|" * len(SHOWN),
    ]
    for row in result["rows"]:
        for label, prefix in (("base", "base_"), ("mass closed form", "")):
            cells = [rate_cell(row.get(prefix + key), row["counts"].get(images)) for key, images in SHOWN]
            lines.append(f"| {row['concept']} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for row in result["rows"]:
        failed = bar_failures(row)
        verdict = "met" if not failed else "NOT MET: " + "; ".join(failed)
        lines.append(f"- {row['concept']}: closed-form bars (Acc_s >= base - 2 pts, in context >= base - 5 "
                     f"pts): {verdict}")
    return "\n".join(lines)


SECTION = ("<!-- mass:start -->", "<!-- mass:end -->")
HEADING = "Mass erasure (bench mass)"


def main(argv: list[str] | None = None) -> int:
    parser = helptext.parser("bench mass", __doc__)
    parser.add_argument("--words", type=int, default=WORDS, help="unrelated words erased with the shapes")
    parser.add_argument("--shapes", nargs="+", default=list(ERASED), choices=SHAPES)
    parser.add_argument("--images-per-prompt", type=int, default=4,
                        help="4: every cell rests on >= 32 images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the raw figures to this JSON file")
    parser.add_argument("--docs", default="docs/benchmarks.md", help="page whose mass section is rewritten")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not update the page")
    parser.add_argument("--from-json", metavar="JSON", help="write the report of a run saved with --json")
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
    else:
        started = time.perf_counter()
        result = run(args.words, tuple(args.shapes), args.images_per_prompt, args.seed)
        result.update(seconds=round(time.perf_counter() - started, 1),
                      command=helptext.command_line("ace-diffusers bench mass",
                                                    argv if argv is not None else sys.argv[1:]))
    if args.json:
        atomic_write_json(args.json, result)
    report = format_report(result)
    print(report)
    if not args.no_docs:
        body = f"Command: `{result['command']}` ({result['seconds']:.0f} s)\n\n" + report.replace("# ", "", 1)
        write_section(args.docs, body, markers=SECTION, heading=HEADING)
        print(f"wrote the mass-erasure section of {args.docs}")
    return 0
