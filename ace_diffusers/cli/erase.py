"""``ace-diffusers erase``: fit an erasure adapter for a model and save (and optionally publish) it.

Examples::

    ace-diffusers erase --model shapes --concept circle --output ./erase-circle
    ace-diffusers erase --model ./sd15 --concept "Van Gogh" --kind style --output ./erase-van-gogh
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from diffusers import DiffusionPipeline

from .. import helptext
from ..core.adapter import ACEAdapter
from ..fitting.pooled import describe_pooled_shift
from ..fitting.trainer import ACETrainer
from ..shapes.pipeline import load_shapes_pipeline

MINIATURE_NAMES = ("shapes", "miniature", "miniature-world")


def load_model(model: str) -> Any:
    """A pipeline from a Hub id or local folder; ``shapes`` names the bundled miniature world."""
    if model in MINIATURE_NAMES:
        return load_shapes_pipeline()
    return DiffusionPipeline.from_pretrained(model)


def build_parser() -> argparse.ArgumentParser:
    parser = helptext.parser("erase", __doc__)
    parser.add_argument(
        "--model",
        required=True,
        help=f"Hub id or local pipeline folder; {MINIATURE_NAMES[0]!r} = miniature world",
    )
    parser.add_argument(
        "--concept", required=True, action="append", help="concept to erase (repeat for several)"
    )
    parser.add_argument("--neutral", action="append", help="neutral anchor (one for all, or one per concept)")
    parser.add_argument("--kind", choices=["object", "style", "celebrity", "explicit"], default=None)
    parser.add_argument("--preserve", action="append", help="concept to keep intact (repeatable)")
    parser.add_argument(
        "--template", action="append", help="prompt template with '{}' for the concept (repeatable)"
    )
    parser.add_argument("--synonym", action="append", help="known synonym to erase too (repeatable)")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="fine-tuning steps (0 = closed form only; default 450, +50 per extra concept, at most 2000)",
    )
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for the whole fit")
    parser.add_argument("--no-adversarial", action="store_true", help="skip adversarial augmentation")
    parser.add_argument(
        "--no-dictionary",
        action="store_true",
        help="mine only the tokenizer's whole words, not the English words it splits (skips encoding "
        "those 100,000 words once per text encoder: minutes on a CPU for CLIP)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="folder to write the adapter to")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also publish to this Hub repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    pipe = load_model(args.model)
    neutral = args.neutral[0] if args.neutral and len(args.neutral) == 1 else args.neutral
    trainer = ACETrainer(
        pipe,
        args.concept,
        neutral=neutral,
        kind=args.kind,
        preserve=args.preserve,
        templates=args.template,
        synonyms=args.synonym,
        rank=args.rank,
        steps=args.steps,
        adversarial=not args.no_adversarial,
        dictionary=not args.no_dictionary,
        time_budget=args.time_budget,
        seed=args.seed,
        progress=True,
    )
    _finish(trainer.fit(), args, started)
    return 0


def _finish(adapter: ACEAdapter, args: argparse.Namespace, started: float) -> None:
    """Record the base model, save (and publish) ``adapter``, report."""
    if args.model not in MINIATURE_NAMES and not os.path.isdir(args.model):
        adapter.base_model = args.model
    folder = adapter.save_pretrained(args.output)
    print(f"{adapter!r} fitted in {adapter.fit['seconds']:.1f} s; saved to {folder}")
    if "pooled" in adapter.fit:
        print(describe_pooled_shift(adapter.fit["pooled"]))
    if args.push_to_hub:
        url = adapter.push_to_hub(args.push_to_hub, private=args.private)
        print(f"published: {url}")
    print(f"done in {time.perf_counter() - started:.1f} s")
