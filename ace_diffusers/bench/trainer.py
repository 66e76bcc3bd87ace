"""ACE efficacy on the miniature world: base model vs closed form vs full ACE (closed form + fine-tuning).

Each shape is erased on its own, *given only its canonical word*; its trained synonyms are held out
(Acc_g). Then one multi-concept adapter erases three shapes and a fill style. Every figure is
measured by generating images with fixed seeds and classifying them with the bundled classifier.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import helptext
from .._io import atomic_write_json
from ..eval.baselines import esd_x_erase, uce_erase
from ..fitting.closed_form import fit_adapter
from ..fitting.data import FitSettings
from ..fitting.presets import resolve_spec
from ..fitting.trainer import ACETrainer
from ..shapes.classifier import load_shapes_classifier
from ..shapes.erasure import (
    concept_kind,
    erase_arguments,
    fit_templates,
    image_counts,
    measure,
    measure_erased,
    neutral_floor,
)
from ..shapes.pipeline import load_shapes_pipeline
from ..shapes.vocab import SHAPES, STYLES
from . import trainer_report, trainer_sd15
from .deploy import write_section

TARGETS = {"acc_e": 0.10, "acc_g": 0.15, "seconds": 60.0}


def _arguments(concepts: list[str]) -> dict[str, Any]:
    """What the fit is given: the world's standard arguments for one concept; for several, every other
    concept of the world is preserved and each concept keeps its own fit templates."""
    if len(concepts) == 1:
        return erase_arguments(concepts[0])
    kept = [c for c in SHAPES + STYLES if c not in concepts]
    return {
        "concepts": concepts,
        "neutral": [erase_arguments(c)["neutral"] for c in concepts],
        "preserve": kept,
        "templates": {c: fit_templates(concept_kind(c)) for c in concepts + kept},
    }


@dataclass
class _Erasure:
    """What every row of one erasure shares: the world, the concepts, the base model's figures."""

    pipe: Any
    classifier: Any
    label: str
    concepts: list[str]
    measured: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        ipp = self.measured["images_per_prompt"]
        self.base = {c: measure(self.pipe, self.classifier, c, **self.measured)[0] for c in self.concepts}
        self.floor = {c: neutral_floor(self.pipe, self.classifier, c, **self.measured) for c in self.concepts}
        self.counts = {c: image_counts(c, self.concepts, ipp) for c in self.concepts}

    def record(self, method: str, seconds: float) -> None:
        """Measure the pipeline as it is now: one row per concept."""
        for c in self.concepts:
            metrics = measure(self.pipe, self.classifier, c, **self.measured)[0]
            base = {f"base_{k}": v for k, v in self.base[c].items()}
            self.rows.append(
                {
                    "run": self.label,
                    "concept": c,
                    "method": method,
                    "seconds": round(seconds, 2),
                    "floor": self.floor[c],
                    "counts": self.counts[c],
                    **base,
                    **metrics,
                }
            )
            shown = "  ".join(
                f"{k} {100 * metrics[k]:.1f}%"
                for k in ("acc_e", "acc_g", "acc_s", "in_context")
                if k in metrics
            )
            print(f"{self.label:<34}{c:<10}{method:<13}{shown}  fit {seconds:.1f} s", flush=True)

    def record_edit(self, method: str, edit: Any) -> None:
        """Measure a baseline's weight edit, then undo it."""
        try:
            self.record(method, edit.seconds)
        finally:
            edit.restore()


def _measure_erasure(
    pipe: Any,
    classifier: Any,
    concepts: list[str],
    label: str,
    *,
    images_per_prompt: int,
    steps: int | None,
    seed: int,
    baselines: bool,
) -> list[dict[str, Any]]:
    """Erase ``concepts`` with the closed form and with ACE (full) (and, with ``baselines``, UCE and ESD-x),
    measuring each: one row per concept and method, each with the base model's figures and the floor."""
    arguments = _arguments(concepts)
    measured = {"images_per_prompt": images_per_prompt, "seed": seed, "erased": concepts}
    erasure = _Erasure(pipe, classifier, label, concepts, measured)
    spec_args = {k: arguments[k] for k in ("neutral", "preserve", "templates")}
    t0 = time.perf_counter()
    closed = fit_adapter(pipe, resolve_spec(arguments["concepts"], **spec_args), FitSettings())
    closed_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = ACETrainer(pipe, arguments["concepts"], steps=steps, seed=seed, progress=False, **spec_args).fit()
    full_seconds = time.perf_counter() - t0
    for method, adapter, seconds in (
        ("closed form", closed, closed_seconds),
        ("ACE (full)", full, full_seconds),
    ):
        name = pipe.load_ace_adapter(adapter, adapter_name="bench")
        try:
            erasure.record(method, seconds)
        finally:
            pipe.unload_ace_adapter(name)
    for row in erasure.rows[-len(concepts) :]:  # the words the trainer mined from the model (never given)
        row["mined"] = list(full.fit["fine_tuning"]["mined_synonyms"])
        row["steps"] = full.fit["fine_tuning"]["steps"]
    if baselines:
        erasure.record_edit(
            "UCE", uce_erase(pipe, arguments["concepts"], spec_args["neutral"], spec_args["preserve"])
        )
        if len(concepts) == 1:
            ace = erasure.rows[-2]  # the ACE (full) row of this concept
            edit, stop = esd_x_matched(erasure, concepts[0], ace["acc_e"], 10 * full_seconds, seed)
            erasure.record_edit("ESD-x", edit)
            erasure.rows[-1].update(esd_steps=edit.settings["steps"], esd_stop=stop)
    return erasure.rows


ESD_FIRST_STEPS = 200  # ESD-x's published budget; doubled while it has not matched ACE


def esd_x_matched(
    erasure: _Erasure, concept: str, target: float, budget: float, seed: int
) -> tuple[Any, str]:
    """ESD-x run as issue #22 asks: its published loss and learning rate, from scratch with 200, 400, 800,
    ... steps until its Acc_e is at most ACE's (``target``) or the next run would pass ``budget`` seconds
    (10x ACE's fit). Returns the last edit, applied, and why it stopped ("matched ACE's Acc_e" or "time
    budget")."""
    steps, spent = ESD_FIRST_STEPS, 0.0
    while True:
        edit = esd_x_erase(erasure.pipe, concept, seed=seed, steps=steps)
        spent += edit.seconds
        acc_e = measure_erased(erasure.pipe, erasure.classifier, concept, **erasure.measured)
        if acc_e <= target:
            return edit, f"matched ACE's Acc_e at {steps} steps"
        if spent + 2 * edit.seconds > budget:
            return edit, f"time budget (10x ACE's fit) at {steps} steps"
        edit.restore()
        steps *= 2


def run(
    shapes: list[str],
    multi: list[str],
    *,
    images_per_prompt: int = 4,
    steps: int | None = None,
    seed: int = 0,
    baselines: bool = False,
) -> dict[str, Any]:
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = load_shapes_classifier()
    settings = {"images_per_prompt": images_per_prompt, "steps": steps, "seed": seed, "baselines": baselines}
    rows = []
    for shape in shapes:
        rows += _measure_erasure(pipe, classifier, [shape], shape, **settings)
    if multi:
        rows += _measure_erasure(pipe, classifier, multi, "multi: " + "+".join(multi), **settings)
    return {
        "torch_threads": torch.get_num_threads(),
        "images_per_prompt": images_per_prompt,
        "steps": steps,
        "rows": rows,
    }


def format_report(result: dict[str, Any]) -> str:
    head = (
        f"{'run':<34}{'concept':<10}{'method':<13}{'Acc_e':>7}{'Acc_g':>7}{'Acc_s':>7}{'colour':>7}"
        f"{'H':>7}{'ctx':>7}{'ctx col':>8}{'->none':>7}{'fit s':>8}   "
        "(base Acc_e/Acc_g/Acc_s/colour/ctx; floor)"
    )
    lines = [head]
    nan = float("nan")
    for r in result["rows"]:
        lines.append(
            f"{r['run']:<34}{r['concept']:<10}{r['method']:<13}{100 * r['acc_e']:>6.1f}%"
            f"{100 * r['acc_g']:>6.1f}%{100 * r['acc_s']:>6.1f}%{100 * r['colour']:>6.1f}%{r['h']:>7.3f}"
            f"{100 * r.get('in_context', nan):>6.1f}%{100 * r.get('in_context_colour', nan):>7.1f}%"
            f"{100 * r.get('erased_as_none', nan):>6.1f}%"
            f"{r['seconds']:>8.1f}   ({100 * r['base_acc_e']:.1f}/{100 * r['base_acc_g']:.1f}/"
            f"{100 * r['base_acc_s']:.1f}/{100 * r['base_colour']:.1f}/"
            f"{100 * r.get('base_in_context', nan):.1f};"
            f" {100 * r.get('floor', nan):.1f})"
        )
    lines.append("")
    for run_label in dict.fromkeys(r["run"] for r in result["rows"] if r.get("mined") is not None):
        mined = next(
            r["mined"] for r in result["rows"] if r["run"] == run_label and r.get("mined") is not None
        )
        lines.append(f"mined by the trainer for {run_label}: {', '.join(mined) or '(none)'}")
    lines.append(
        "floor: Acc_e of a perfect erasure, i.e. the base model on the same prompts with the "
        "concept replaced by its neutral anchor (shapes: the empty phrase, 'a red'); an erased "
        "concept cannot go below it. ctx / ctx col: the kept object of a two-object prompt still "
        "drawn (in its colour); ->none: erased-concept images that show nothing."
    )
    lines.append(
        "targets for ACE (full): Acc_e <= 10%, Acc_g <= 15%, Acc_s >= base - 2 pts, colour >= "
        "base - 2 pts, Acc_g below closed form (or both 0), fit <= 60 s per concept"
    )
    for r in result["rows"]:
        if r["method"] != "ACE (full)":
            continue
        closed = next(
            x
            for x in result["rows"]
            if x["run"] == r["run"] and x["concept"] == r["concept"] and x["method"] == "closed form"
        )
        checks = {
            "Acc_e": r["acc_e"] <= TARGETS["acc_e"],
            "Acc_g": r["acc_g"] <= TARGETS["acc_g"],
            "Acc_s": r["acc_s"] >= r["base_acc_s"] - 0.02,
            "colour": r["colour"] >= r["base_colour"] - 0.02,
            # lower than the closed form's; when that is already 0 there is nothing left to lower
            "Acc_g<closed": r["acc_g"] < closed["acc_g"] or r["acc_g"] == closed["acc_g"] == 0,
            "time": r["seconds"] <= TARGETS["seconds"] * max(1, len(r["run"].split("+"))),
        }
        lines.append(
            f"{r['run']:<34}{r['concept']:<10}"
            + "  ".join(f"{k}:{'met' if v else 'NOT MET'}" for k, v in checks.items())
        )
    return "\n".join(lines)


def merged(paths: list[str]) -> dict[str, Any]:
    """One result from runs saved with ``--json`` (the same settings; their rows in the order given)."""
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    if len({(r["images_per_prompt"], r["steps"]) for r in runs}) != 1:
        raise SystemExit("bench trainer --from-json: the runs used different --images-per-prompt or --steps")
    return {
        **runs[0],
        "rows": [row for r in runs for row in r["rows"]],
        "seconds": sum(r.get("seconds", 0) for r in runs),
        "command": " + ".join(r.get("command", "?") for r in runs),
    }


def _parser() -> Any:
    parser = helptext.parser("bench trainer", __doc__)
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=list(SHAPES) + list(STYLES),
        help="concepts erased one at a time (default: the 8 shapes and the 3 fill styles)",
    )
    parser.add_argument(
        "--multi",
        nargs="*",
        default=["circle", "star", "hexagon", "diamond"],
        help="concepts of the one multi-concept adapter (none: skip it)",
    )
    parser.add_argument(
        "--images-per-prompt",
        type=int,
        default=4,
        help="images per prompt and colour (4: every cell rests on >= 32 images)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="fine-tuning steps (default: the trainer's default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shape",
        choices=["world", "sd15"],
        default="world",
        help="sd15: time one default fit at SD1.5 shape, phase by phase (random weights), instead",
    )
    parser.add_argument("--baselines", action="store_true", help="also run UCE and ESD-x (slower)")
    parser.add_argument("--json", help="also write the raw figures to this JSON file")
    parser.add_argument(
        "--docs", default="docs/benchmarks.md", help="page whose trainer section is rewritten"
    )
    parser.add_argument("--no-docs", action="store_true", help="print only; do not update the page")
    parser.add_argument(
        "--from-json",
        nargs="+",
        metavar="JSON",
        help="write the report from runs saved with --json (e.g. shapes split over processes)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.from_json:
        _report(merged(args.from_json), args)
        return 0
    if args.shape == "sd15":
        timing = trainer_sd15.run(steps=args.steps, seed=args.seed)
        print(trainer_sd15.format_report(timing))
        if args.json:
            atomic_write_json(args.json, timing)
        return 0
    started = time.perf_counter()
    result = run(
        args.shapes,
        args.multi,
        images_per_prompt=args.images_per_prompt,
        steps=args.steps,
        seed=args.seed,
        baselines=args.baselines,
    )
    result.update(
        seconds=round(time.perf_counter() - started, 1),
        command=helptext.command_line(
            "ace-diffusers bench trainer", argv if argv is not None else sys.argv[1:]
        ),
    )
    if args.json:
        atomic_write_json(args.json, result)
    _report(result, args)
    return 0


def _report(result: dict[str, Any], args: Any) -> None:
    """Print the report and (unless ``--no-docs``) rewrite the trainer section of the page."""
    print(format_report(result))
    if not args.no_docs:
        body = trainer_report.markdown(result)
        write_section(args.docs, body, markers=trainer_report.SECTION, heading=trainer_report.HEADING)
        print(f"wrote the trainer section of {args.docs}")
