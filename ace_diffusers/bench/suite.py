"""``ace-diffusers bench``: run every benchmark and write ``docs/benchmarks.md`` (tables never typed by hand).

Writes, next to the Markdown page, ``benchmarks.json`` (every number) and ``images/bench_*.png`` (plots).

* efficacy — the miniature world: base, ACE closed form, ACE full, UCE, ESD-x for each shape erased
  alone and for multi-concept adapters of 1, 3 and 5 concepts; Acc_e/Acc_s/Acc_g/H, fit seconds and
  ASR per attack (:mod:`.efficacy`);
* speed — closed-form seconds per concept at SD1.5 shape (:mod:`.closed_form`), and full-fit vs ESD-x
  seconds from the efficacy runs;
* inference — denoising-step overhead with 1/10/100 concepts and fused, interleaved (:mod:`.inference`),
  and adapter size per concept at SD1.5 and SDXL shape;
* a targets table, met / not met, computed from the measured numbers (:mod:`.report`).

``--quick`` (sized for about 15 minutes on a 2-core CPU with nothing else running) uses 2 shapes,
4 colours, 1 image per prompt, the trainer's default steps but fewer ESD-x / soft-prompt steps,
closed-form counts 1, 10 and 100 and 5 timing rounds; the full run (no flag) uses all 8 shapes, all
colours, 2 images per prompt and the methods' default step counts (an hour or more). ``--from-json``
re-renders a saved result. ``--update`` runs only ``--sections`` and keeps the other sections from the
page's ``benchmarks.json``; the page then names each run with the sections it measured. Runs
unchanged under ``accelerate launch`` (the efficacy images are split across processes; timings are taken
by the main process alone). Needs the ``bench`` extra
(matplotlib, the miniature world's text encoder).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .. import helptext
from ..eval.common import partial_state
from . import closed_form, efficacy, inference, ops
from .efficacy_plans import ERASERS, FULL, MULTI_CONCEPTS, QUICK
from .report import targets, write

DEFAULT_OUTPUT = Path("docs") / "benchmarks.md"
SECTIONS = ("efficacy", "speed", "inference")
QUICK_SETTINGS: dict[str, Any] = {"counts": (1, 10, 100), "rounds": 5, "latent": 16}
FULL_SETTINGS: dict[str, Any] = {"counts": (1, 10, 100), "rounds": 15, "latent": 16}


def _machine() -> str:
    cpus = os.cpu_count()
    return (f"{platform.system()} {platform.machine()}, {cpus} CPU cores, "
            f"Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def _state() -> Any:
    """accelerate's process state: one process normally, several under ``accelerate launch``."""

    return partial_state()


def _say(message: str) -> None:
    if _state().is_main_process:
        print(message, flush=True)


def efficacy_plan(quick: bool, overrides: dict[str, Any] | None = None) -> Any:
    """The quick or full :class:`~.efficacy_plans.EfficacyPlan`, with command-line overrides (None = keep)."""

    base = QUICK if quick else FULL
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "multi" in changes:
        sizes = changes["multi"]
        unknown = [n for n in sizes if n not in MULTI_CONCEPTS]
        if unknown:
            raise ValueError(f"multi-concept sizes must be among {sorted(MULTI_CONCEPTS)}, got {unknown}")
        changes["multi"] = {n: list(MULTI_CONCEPTS[n]) for n in sizes}
    if "inference_steps" in changes:
        changes["sampler"] = {"num_inference_steps": changes.pop("inference_steps")}
    return dataclasses.replace(base, **changes)


def _closed_form_in_fresh_process(counts: tuple[int, ...]) -> dict[str, Any]:
    """The closed-form timings from a new Python process: what a user's process pays, whatever memory,
    threads and caches the efficacy section left behind in this one."""
    with tempfile.TemporaryDirectory(prefix="ace-bench-speed-") as tmp:
        path = Path(tmp) / "closed_form.json"
        subprocess.run(
            [sys.executable, "-m", "ace_diffusers", "bench", "closed-form", "--counts", *map(str, counts),
             "--json", str(path)],
            check=True, stdout=subprocess.DEVNULL,
        )
        return json.loads(path.read_text())


def run(quick: bool, sections: list[str] | tuple[str, ...], *, plan: Any = None,
        settings: dict[str, Any] | None = None, methods: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the chosen sections; returns ``{"sections": {...}}`` (see :mod:`.report` for the layout)."""

    settings = {**(QUICK_SETTINGS if quick else FULL_SETTINGS), **(settings or {})}
    state = _state()
    out: dict[str, Any] = {}
    if "efficacy" in sections:  # under accelerate launch: images split across processes
        t0 = time.perf_counter()
        plan = plan or efficacy_plan(quick)
        _say(f"[bench] efficacy: {plan}")
        out["efficacy"] = efficacy.run(plan, methods=methods or ERASERS, log=_say, state=state)
        out["efficacy"]["processes"] = state.num_processes
        out["efficacy"]["seconds"] = time.perf_counter() - t0
        _say(f"[bench] efficacy done in {out['efficacy']['seconds']:.0f} s")
    if not state.is_main_process:  # timings are taken by the main process alone (others would skew them)
        state.wait_for_everyone()
        return {"sections": out}
    if "speed" in sections:
        t0 = time.perf_counter()
        _say(f"[bench] speed: closed form at SD1.5 shape for {list(settings['counts'])} concepts")
        result = _closed_form_in_fresh_process(tuple(settings["counts"]))
        out["speed"] = {"closed_form": result, "seconds": time.perf_counter() - t0}
        _say(closed_form.format_report(result))
    if "inference" in sections:
        t0 = time.perf_counter()
        _say(f"[bench] inference: {settings['rounds']} interleaved rounds at latent {settings['latent']}")
        over = inference.overhead(rounds=settings["rounds"], latent=settings["latent"], progress=True)
        out["inference"] = {"overhead": over, "sizes": inference.sizes(), "ops": ops.op_counts(64),
                            "seconds": time.perf_counter() - t0}
        _say(inference.format_report(over, out["inference"]["sizes"]))
    state.wait_for_everyone()
    return {"sections": out}


def updated(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``previous`` with ``new``'s sections in place of its own. ``runs`` lists every run whose sections
    the result still holds (command, date, those sections); the command line names them all, the time
    is their sum and the date the newest's."""
    kept = [s for s in previous.get("sections", {}) if s not in new["sections"]]
    runs = previous.get("runs") or [
        {"command": previous["command"], "date": previous.get("date"), "sections": list(previous["sections"])}
    ]
    runs = [{**r, "sections": [s for s in r["sections"] if s in kept]} for r in runs]
    runs = [r for r in runs if r["sections"]]
    runs.append({"command": new["command"], "date": new.get("date"), "sections": list(new["sections"])})
    merged = {**previous, **{k: v for k, v in new.items() if k != "sections"}}
    merged["sections"] = {**{s: previous["sections"][s] for s in kept}, **new["sections"]}
    merged["runs"] = runs
    merged["command"] = " + ".join(f"{r['command']} ({', '.join(r['sections'])}; {r['date']})" for r in runs)
    merged["seconds"] = previous["seconds"] + new["seconds"]
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = helptext.parser("bench", __doc__)
    parser.add_argument("--quick", action="store_true", help="the ~15-minute version")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help="Markdown page; JSON and images/ go beside it")
    parser.add_argument("--from-json",
                        help="re-render the page and plots from a saved benchmarks.json (no runs)")
    parser.add_argument("--update", action="store_true",
                        help="run only --sections; keep the page's other sections (from its JSON)")
    small = parser.add_argument_group("overrides of the quick/full plan (smaller smoke runs)")
    small.add_argument("--shapes", nargs="*", help="shapes erased alone")
    small.add_argument("--multi", nargs="*", type=int, help="multi-concept adapter sizes (of 1, 3, 5)")
    small.add_argument("--colours", nargs="+", help="colour grid of the prompt sets")
    small.add_argument("--images-per-prompt", type=int)
    small.add_argument("--ace-steps", type=int)
    small.add_argument("--esd-steps", type=int)
    small.add_argument("--esd-trajectories", type=int)
    small.add_argument("--esd-prompts", type=int)
    small.add_argument("--soft-prompts", type=int)
    small.add_argument("--soft-steps", type=int)
    small.add_argument("--inference-steps", type=int,
                       help="denoising steps of the miniature world (default 25)")
    small.add_argument("--counts", nargs="+", type=int, help="closed-form concept counts")
    small.add_argument("--rounds", type=int, help="interleaved inference timing rounds")
    small.add_argument("--latent", type=int, help="latent size of the inference timing")
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = helptext.command_line("ace-diffusers bench", given)

    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        started = time.perf_counter()
        plan = efficacy_plan(args.quick, {
            "shapes": args.shapes, "multi": args.multi, "colours": args.colours,
            "images_per_prompt": args.images_per_prompt, "ace_steps": args.ace_steps,
            "esd_steps": args.esd_steps, "esd_trajectories": args.esd_trajectories,
            "esd_prompts": args.esd_prompts, "soft_prompts": args.soft_prompts, "soft_steps": args.soft_steps,
            "inference_steps": args.inference_steps,
        })
        given_settings = (("counts", args.counts), ("rounds", args.rounds), ("latent", args.latent))
        settings = {k: v for k, v in given_settings if v is not None}
        result = run(args.quick, args.sections, plan=plan, settings=settings)
        result.update(command=command, machine=_machine(), quick=args.quick,
                      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      seconds=time.perf_counter() - started)
        if args.update:
            result = updated(json.loads(Path(args.output).with_suffix(".json").read_text()), result)
    if not _state().is_main_process:
        return 0

    paths = write(result, args.output)
    for t in targets(result):
        status = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        _say(f"[bench] target {t['target']}: {t['measured']} -> {status}")
    _say(f"[bench] wrote {', '.join(str(p) for p in paths.values())}")
    return 0
