"""``ace-diffusers bench``: run every benchmark and write ``docs/benchmarks.md`` (tables never typed by hand).

``--quick`` uses fewer concepts, images and rounds so the whole suite fits in ~15 minutes on a
2-core CPU; the full run measures everything the benchmark issue lists and takes longer.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUTPUT = Path("docs") / "benchmarks.md"


def _machine() -> str:
    cpus = os.cpu_count()
    return (f"{platform.system()} {platform.machine()}, {cpus} CPU cores, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def _block(title: str, command: str, body: str, seconds: float) -> str:
    return f"## {title}\n\nMeasured by `{command}` in {seconds:.0f} s.\n\n```\n{body}\n```\n"


def run(quick: bool, sections: list[str]) -> str:
    from . import closed_form, inference, trainer

    parts = []
    if "efficacy" in sections:
        t0 = time.perf_counter()
        shapes = ["circle", "square"] if quick else ["circle", "square", "triangle", "star"]
        multi = ["circle", "square", "triangle", "striped"]
        result = trainer.run(shapes, multi, images_per_prompt=1 if quick else 2, steps=300, baselines=True)
        args = f"--shapes {' '.join(shapes)} --multi {' '.join(multi)} --images-per-prompt {1 if quick else 2} --baselines"
        parts.append(_block("Efficacy on the miniature world: closed form vs ACE", f"ace-diffusers bench trainer {args}",
                            trainer.format_report(result), time.perf_counter() - t0))
    if "speed" in sections:
        t0 = time.perf_counter()
        counts = (1, 10) if quick else (1, 10, 100)
        result = closed_form.run(counts)
        parts.append(_block("Closed-form speed at SD1.5 shape", f"ace-diffusers bench closed-form --counts {' '.join(map(str, counts))}",
                            closed_form.format_report(result), time.perf_counter() - t0))
    if "inference" in sections:
        t0 = time.perf_counter()
        rounds = 5 if quick else 15
        over = inference.overhead(rounds=rounds)
        parts.append(_block("Inference overhead and adapter size", f"ace-diffusers bench inference --rounds {rounds}",
                            inference.format_report(over, inference.sizes()), time.perf_counter() - t0))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ace-diffusers bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the ~15-minute version")
    parser.add_argument("--sections", nargs="+", default=["efficacy", "speed", "inference"],
                        choices=["efficacy", "speed", "inference"])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    body = run(args.quick, args.sections)
    command = "ace-diffusers bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = (
        "# Benchmarks\n\n"
        "Written by the benchmark command; do not edit by hand. Random-weight models of real shapes measure "
        "costs only; erasure quality is measured on the miniature world (see miniature_world.md). Real "
        "SD/SDXL checkpoints need a GPU and Hub access and were not measured here.\n\n"
        f"- command: `{command}`\n- machine: {_machine()}\n- total time: {time.perf_counter() - started:.0f} s\n\n"
        + body
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, output)
    print(text)
    return 0
