"""``ace-diffusers demo``: erase a concept from the bundled miniature world and show what changed.

Loads the miniature SD pipeline and its classifier (offline, bundled weights), measures the
classifier's accuracy on the concept (canonical word), its held-out synonyms and the other concepts,
erases the concept given only the canonical word — with the closed form (``erase_concept``, seconds)
and with fine-tuning (``erase_concept(..., method="ace")``) — measures each, prints one table and
writes one before / closed-form / fine-tuned image grid.

Examples::

    ace-diffusers demo
    ace-diffusers demo --concept striped --output striped.png
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .. import helptext
from .._io import atomic_write_bytes
from ..fitting.erase import erase_concept
from ..shapes.classifier import load_shapes_classifier
from ..shapes.erasure import concept_kind, erase_arguments, measure, metric_sets, per_prompt
from ..shapes.pipeline import load_shapes_pipeline
from ..stats import wilson_interval

ROWS = ("erased", "synonyms", "others", "pairs")
MIN_IMAGES = 32  # images per set by default: every rate of the table rests on at least this many


def _grid(columns_of: list[tuple[str, dict[str, torch.Tensor]]], columns: int, path: Path) -> None:
    """One row per prompt set and model (``columns_of``: (label, images per set)); saved as PNG."""
    scale, pad, label_w = 3, 2, 170
    first = columns_of[0][1]
    tile_h, tile_w = (side * scale for side in next(iter(first.values())).shape[-2:])
    names = [name for name in ROWS if name in first]
    rows = [(f"{name} - {when}", images[name]) for name in names for when, images in columns_of]
    width = label_w + columns * (tile_w + pad)
    height = len(rows) * (tile_h + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = r * (tile_h + pad)
        draw.text((6, y + tile_h // 2 - 6), label, fill="black")
        for c in range(min(columns, len(images))):
            array = (images[c].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(array).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (tile_w + pad), y))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _pick(images: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """First image of each prompt (``counts``: images per prompt of each set), so a row shows different
    prompts rather than seeds of one prompt."""
    return {name: imgs[:: counts[name]] for name, imgs in images.items()}


# the image set each rate is counted on (H is a mean of rates: no interval)
METRIC_SETS = {
    "acc_e": "erased",
    "acc_g": "synonyms",
    "acc_heldout": "heldout",
    "acc_s": "others",
    "colour": "others",
    "in_context": "pairs",
    "in_context_colour": "pairs",
    "erased_as_none": "erased",
    "erased_as_other": "erased",
}


def _interval(rate: float, n: int) -> str:
    lo, hi = wilson_interval(round(rate * n), n)
    return f"{100 * lo:.0f}–{100 * hi:.0f}% of {n}"


LABELS = {
    "acc_e": "Acc_e  '{concept}' still drawn (lower=better)",
    "acc_g": "Acc_g  held-out synonyms still drawn (lower=better)",
    "acc_heldout": "Acc_g  words no caption has (lower=better)",
    "acc_s": "Acc_s  other concepts drawn right (higher=better)",
    "colour": "colour accuracy on other concepts",
    "in_context": "kept object beside it still drawn",
    "in_context_colour": "... in its colour",
    "h": "H (harmonic mean)",
    "erased_as_none": "'{concept}' prompts that draw nothing",
}


def _print_table(
    concept: str, runs: list[tuple[str, dict[str, float], float | None]], sizes: dict[str, int]
) -> None:
    """One row per metric, one column per model; the 95 % interval of the last column."""
    print(f"{'metric':<52}" + "".join(f"{label:>13}" for label, _, _ in runs) + "   95 % interval, last")
    for key, label in LABELS.items():
        if any(key not in metrics for _, metrics, _ in runs):
            continue
        last = runs[-1][1][key]
        size = sizes.get(METRIC_SETS.get(key, ""), 0)
        interval = _interval(last, size) if size else ""
        if key == "h":  # a mean of rates, shown as the number it is
            values = "".join(f"{metrics[key]:>13.3f}" for _, metrics, _ in runs)
        else:
            values = "".join(f"{100 * metrics[key]:>12.1f}%" for _, metrics, _ in runs)
        print(f"{label.format(concept=concept):<52}{values}   {interval}")
    seconds = "".join(f"{'—' if s is None else f'{s:.1f}':>13}" for _, _, s in runs)
    print(f"{'fit seconds':<52}{seconds}")


def _parser() -> argparse.ArgumentParser:
    parser = helptext.parser("demo", __doc__)
    parser.add_argument(
        "--concept", default="circle", help="a shape (circle, square, ...) or a fill style (striped, ...)"
    )
    parser.add_argument(
        "--neutral",
        default=None,
        help="what the concept should turn into (default: nothing for a shape, 'plain' for a style)",
    )
    parser.add_argument("--output", default="ace_demo.png", help="where to write the before/after grid PNG")
    parser.add_argument(
        "--images-per-prompt",
        type=int,
        default=None,
        help=f"images per prompt of every set (default: just enough for {MIN_IMAGES} images per set)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the trainer's)")
    parser.add_argument("--threads", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        concept_kind(args.concept)
    except ValueError as err:
        parser.error(str(err))
    started = time.perf_counter()
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = load_shapes_classifier()
    print(f"loaded the miniature world in {time.perf_counter() - started:.1f} s")

    minimum = MIN_IMAGES if args.images_per_prompt is None else None
    measured = {"images_per_prompt": args.images_per_prompt or 1, "min_images": minimum, "seed": args.seed}
    counts = {
        name: per_prompt(pset, measured["images_per_prompt"], minimum)
        for name, pset in metric_sets(args.concept).items()
    }
    before, before_images = measure(pipe, classifier, args.concept, **measured)
    runs, grids = [("before", before, None)], [("before", _pick(before_images, counts))]
    arguments = erase_arguments(args.concept, args.neutral)
    for label, method in (("closed form", "closed-form"), ("fine-tuned", "ace")):
        t0 = time.perf_counter()
        tuning = {"seed": args.seed, **({"steps": args.steps} if args.steps is not None else {})}
        extra = {"fine_tuning": tuning, "progress": False} if method == "ace" else {}
        adapter = erase_concept(pipe, **arguments, method=method, adapter_name="demo", **extra)
        seconds = time.perf_counter() - t0
        after, after_images = measure(pipe, classifier, args.concept, **measured)
        pipe.unload_ace_adapter("demo")
        print(
            f"{label}: erased {adapter.concepts} -> {adapter.neutral} (rank {adapter.rank}) "
            f"in {seconds:.1f} s"
        )
        runs.append((label, after, seconds))
        grids.append((label, _pick(after_images, counts)))
    _print_table(args.concept, runs, {name: len(images) for name, images in after_images.items()})
    _grid(grids, 8, Path(args.output))
    print(
        f"before / closed form / fine-tuned grid written to {args.output}  "
        f"(total {time.perf_counter() - started:.1f} s)"
    )
    return 0
