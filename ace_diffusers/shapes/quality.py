"""Measure how well the miniature-world pipeline draws what it is asked for, against the world's bars.

    HF_HUB_OFFLINE=1 ace-diffusers shapes quality

Generates images with fixed seeds and ``DEFAULT_SAMPLER`` and judges them with the bundled classifier.
Each *cell* (one bar) rests on at least 32 images (64 for the neutral prompts) and is printed with its
95 % Wilson interval:

* **neutral** — ``""``, the package's default anchor of kind ``object`` in that kind's templates, and
  every anchor prompt a shape erasure targets (the world's fitting templates with the shape left out):
  the classifier must see *nothing* (``none``) >= 90 %;
* **shapes** — ``a {colour} {shape}``: each shape's canonical word >= 95 %;
* **synonyms** — ``a {colour} {synonym}``: each trained synonym >= 85 %;
* **colour** — the canonical prompts judged for colour: each colour >= 90 %;
* **style** — ``a {style} {colour} {shape}``: each style >= 85 %;
* **pairs** — ``a {colour} {shape} and a {colour} {shape}``: each named object at its position >= 85 %.

Prints the table and (unless ``--no-docs``) writes it into ``docs/miniature_world.md``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from .. import helptext
from ..fitting.presets import fill_phrase, load_presets
from ..stats import wilson_interval
from .classifier import load_shapes_classifier
from .erasure import DEFAULT_NEUTRAL, fit_templates
from .pipeline import DEFAULT_SAMPLER, generate, load_shapes_pipeline
from .quality_report import format_table, write_docs, write_figure
from .vocab import COLOURS, NONE, SHAPE_WORDS, SHAPES, STYLE_WORDS, STYLES, article_fix, pair_prompt

BARS = {"neutral": 0.90, "shape": 0.95, "synonym": 0.85, "colour": 0.90, "style": 0.85, "pair": 0.85}
NEUTRAL_IMAGES = 64
CELL_IMAGES = 32


@dataclass
class Cell:
    """One bar: images of ``prompts`` (each with expected labels) judged on ``head``; ``bar`` or None."""

    group: str
    name: str
    head: str
    bar: float | None
    items: list[tuple[str, str]] = field(default_factory=list)  # (prompt, expected label)
    hits: int = 0
    n: int = 0

    @property
    def accuracy(self) -> float:
        return self.hits / max(1, self.n)

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.hits, self.n)

    @property
    def passed(self) -> bool | None:
        return None if self.bar is None else self.accuracy >= self.bar


def neutral_prompts() -> list[str]:
    """``""``, the object kind's default anchor in its templates, and the world's shape anchor prompts,
    each exactly as the fitter writes it (``fill_phrase``)."""
    preset = load_presets()["kinds"]["object"]
    prompts = [""] + [fill_phrase(t, preset["neutral"])[0] for t in preset["templates"]]
    prompts += [fill_phrase(t, DEFAULT_NEUTRAL["shape"])[0] for t in fit_templates("shape")]
    return list(dict.fromkeys(prompts))


def quality_cells() -> list[Cell]:
    """Every bar of ``docs/miniature_world.md`` with the prompts (and per-prompt images) it rests on."""
    cells = [Cell("neutral", repr(p), "shape", BARS["neutral"], [(p, NONE)]) for p in neutral_prompts()]
    for s in SHAPES:
        cells.append(
            Cell("shape", s, "shape", BARS["shape"], [(article_fix(f"a {c} {s}"), s) for c in COLOURS])
        )
    for s in SHAPES:
        for w in SHAPE_WORDS[s][1:]:
            cells.append(
                Cell(
                    "synonym", w, "shape", BARS["synonym"], [(article_fix(f"a {c} {w}"), s) for c in COLOURS]
                )
            )
    for c in COLOURS:
        cells.append(
            Cell("colour", c, "colour", BARS["colour"], [(article_fix(f"a {c} {s}"), c) for s in SHAPES])
        )
    for st in STYLES:
        items = [(article_fix(f"a {st} {COLOURS[i]} {s}"), st) for i, s in enumerate(SHAPES)]
        cells.append(Cell("style", st, "style", BARS["style"], items))
        for w in STYLE_WORDS[st][1:]:
            items = [(article_fix(f"a {w} {COLOURS[-1 - i]} {s}"), st) for i, s in enumerate(SHAPES)]
            cells.append(Cell("style synonym", w, "style", None, items))
    pairs = [(SHAPES[i], COLOURS[i], SHAPES[(i + 3) % 8], COLOURS[(i + 5) % 8]) for i in range(8)]
    pairs += [(SHAPES[i], COLOURS[(i + 2) % 8], SHAPES[(i + 6) % 8], COLOURS[(i + 7) % 8]) for i in range(8)]
    prompts = [
        pair_prompt(article_fix(f"a {c1} {s1}"), article_fix(f"a {c2} {s2}")) for s1, c1, s2, c2 in pairs
    ]
    for slot, k in (("left", 0), ("right", 2)):
        cells.append(
            Cell(
                "pair",
                f"{slot} shape",
                f"{slot}_shape",
                BARS["pair"],
                [(p, q[k]) for p, q in zip(prompts, pairs, strict=True)],
            )
        )
        cells.append(
            Cell(
                "pair",
                f"{slot} colour",
                f"{slot}_colour",
                None,
                [(p, q[k + 1]) for p, q in zip(prompts, pairs, strict=True)],
            )
        )
    return cells


def images_per_prompt(cell: Cell) -> int:
    want = NEUTRAL_IMAGES if cell.group == "neutral" else CELL_IMAGES
    return -(-want // len(cell.items))


@torch.no_grad()
def evaluate(pipe, classifier, cells: list[Cell], seed: int = 0, batch_size: int = 128, **sampler) -> dict:
    """Judge every cell (in place); each distinct prompt is generated once. Returns {prompt: images}."""
    needed: dict[str, int] = {}
    for cell in cells:
        for prompt, _ in cell.items:
            needed[prompt] = max(needed.get(prompt, 0), images_per_prompt(cell))
    prompts = [p for p, k in needed.items() for _ in range(k)]
    seeds = [seed + i for p, k in needed.items() for i in range(k)]
    images = generate(pipe, prompts, seeds=seeds, batch_size=batch_size, **{**DEFAULT_SAMPLER, **sampler})
    pred = classifier.predict(images)
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        rows.setdefault(p, []).append(i)
    for cell in cells:
        k = images_per_prompt(cell)
        for prompt, expected in cell.items:
            labels = [pred[cell.head][i] for i in rows[prompt][:k]]
            cell.hits += sum(label == expected for label in labels)
            cell.n += len(labels)
    return {p: images[idx] for p, idx in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = helptext.parser("shapes quality", __doc__, first_paragraph=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weights-dir", default=None, help="weights directory (default: bundled)")
    p.add_argument("--guidance", type=float, default=None, help="override guidance_scale (not for the docs)")
    p.add_argument("--rescale", type=float, default=None, help="override guidance_rescale (not for the docs)")
    p.add_argument("--groups", default=None, help="comma-separated subset of cell groups (not for the docs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-docs", action="store_true", help="do not write docs/miniature_world.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sampler = dict(DEFAULT_SAMPLER)
    if args.guidance is not None:
        sampler["guidance_scale"] = args.guidance
    if args.rescale is not None:
        sampler["guidance_rescale"] = args.rescale
    t0 = time.time()
    pipe = load_shapes_pipeline(weights_dir=args.weights_dir)
    classifier = load_shapes_classifier(weights_dir=args.weights_dir)
    cells = quality_cells()
    if args.groups:
        keep = {g.strip() for g in args.groups.split(",")}
        cells = [c for c in cells if c.group in keep]
    images = evaluate(pipe, classifier, cells, args.seed, args.batch_size, **sampler)
    cmd = "HF_HUB_OFFLINE=1 ace-diffusers shapes quality " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    table = format_table(cells, cmd.strip(), sampler, time.time() - t0)
    print(table)
    overrides = (args.guidance, args.rescale, args.groups, args.weights_dir)
    custom = any(v is not None for v in overrides) or args.seed
    if not args.no_docs and not custom:
        print(f"wrote {write_docs(table)} and {write_figure(cells, images)}")
    elif not args.no_docs:
        print("(non-default settings: docs not updated)")
    return 0 if all(c.passed is not False for c in cells) else 1
