"""``ace-diffusers demo``: erase a concept from the bundled miniature world and show what changed.

Loads the miniature SD pipeline and its classifier (offline, bundled weights), measures the
classifier's accuracy on the concept (canonical word), its held-out synonyms and the other concepts,
erases the concept with ``erase_concept`` given only the canonical word, measures again, and writes
a before/after image grid.

Examples::

    ace-diffusers demo
    ace-diffusers demo --concept striped --output striped.png
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .. import helptext
from .._io import atomic_write_bytes
from ..fitting.closed_form import erase_concept
from ..shapes.classifier import load_shapes_classifier
from ..shapes.erasure import concept_kind, erase_arguments, measure
from ..shapes.pipeline import load_shapes_pipeline
from ..stats import wilson_interval

ROWS = ("erased", "synonyms", "others", "pairs")


def _grid(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], columns: int, path: Path) -> None:
    """Two rows per prompt set (before, after); ``columns`` images each; saved as PNG."""
    scale, pad, label_w = 3, 2, 150
    tile_h, tile_w = (side * scale for side in next(iter(before.values())).shape[-2:])
    names = [name for name in ROWS if name in before]
    rows = [(f"{name} - {when}", images[name]) for name in names for when, images in (("before", before),
                                                                                     ("after", after))]
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


def _pick(images: dict[str, torch.Tensor], per_prompt: int) -> dict[str, torch.Tensor]:
    """First image of each prompt, so a row shows different prompts rather than seeds of one prompt."""
    return {name: imgs[::per_prompt] for name, imgs in images.items()}


# the image set each rate is counted on (H is a mean of rates: no interval)
METRIC_SETS = {"acc_e": "erased", "acc_g": "synonyms", "acc_s": "others", "colour": "others",
               "in_context": "pairs", "in_context_colour": "pairs", "erased_as_none": "erased",
               "erased_as_other": "erased"}


def _interval(rate: float, n: int) -> str:
    lo, hi = wilson_interval(round(rate * n), n)
    return f"{100 * lo:.0f}–{100 * hi:.0f}% of {n}"


def _print_table(
    concept: str, before: dict[str, float], after: dict[str, float], sizes: dict[str, int]
) -> None:
    print(f"{'metric':<44}{'before':>8}{'after':>8}   95 % interval after (images)")
    names = {
        "acc_e": f"Acc_e  '{concept}' still drawn (lower=better)",
        "acc_g": "Acc_g  held-out synonyms still drawn (lower=better)",
        "acc_s": "Acc_s  other concepts drawn right (higher=better)",
        "colour": "colour accuracy on other concepts",
        "h": "H (harmonic mean)",
        "in_context": "kept object beside it still drawn",
        "in_context_colour": "... in its colour",
        "erased_as_none": f"'{concept}' prompts that draw nothing",
        "erased_as_other": f"'{concept}' prompts that draw something else",
    }
    for key, label in names.items():
        interval = _interval(after[key], sizes[METRIC_SETS[key]]) if key in METRIC_SETS else ""
        print(f"{label:<44}{100 * before[key]:>7.1f}%{100 * after[key]:>7.1f}%   {interval}")


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--images-per-prompt", type=int, default=4, help="4: each figure on >= 32 images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
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

    before, before_images = measure(
        pipe, classifier, args.concept, images_per_prompt=args.images_per_prompt, seed=args.seed
    )
    t0 = time.perf_counter()
    adapter = erase_concept(pipe, **erase_arguments(args.concept, args.neutral))
    fit_seconds = time.perf_counter() - t0
    after, after_images = measure(
        pipe, classifier, args.concept, images_per_prompt=args.images_per_prompt, seed=args.seed
    )

    print(
        f"erased {adapter.concepts} -> {adapter.neutral} (closed form, rank {adapter.rank}) in "
        f"{fit_seconds:.2f} s"
    )
    _print_table(args.concept, before, after, {name: len(images) for name, images in after_images.items()})
    columns = 8
    _grid(
        _pick(before_images, args.images_per_prompt),
        _pick(after_images, args.images_per_prompt),
        columns,
        Path(args.output),
    )
    print(f"before/after grid written to {args.output}  (total {time.perf_counter() - started:.1f} s)")
    return 0
