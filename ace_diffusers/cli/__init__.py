"""The ``ace-diffusers`` command: a thin dispatcher to each command's ``main(argv)``.

One module per command of the stack lives here (:mod:`.erase`, :mod:`.export`, :mod:`.eval`, :mod:`.demo`);
the benchmark and miniature-world commands live with their packages (``bench``, ``shapes``). A command's
module is imported only when it runs, so ``ace-diffusers --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys

from ..version import __version__

# name -> (module, help). Modules are imported only when their command runs (fast --help).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "ace_diffusers.cli.demo",
        "erase a concept from the bundled miniature world; writes a before/after PNG",
    ),
    "erase": ("ace_diffusers.cli.erase", "fit an erasure adapter (closed form + fine-tuning), save/push it"),
    "export": (
        "ace_diffusers.cli.export",
        "export an adapter as a plain diffusers or kohya LoRA file (no plugin needed to load)",
    ),
    "eval": (
        "ace_diffusers.cli.eval",
        "measure an erasure: MACE metrics, attack success rates, images, plots",
    ),
    "bench": (
        "ace_diffusers.bench.suite",
        "run every benchmark and write docs/benchmarks.md (--quick: ~15 min)",
    ),
    "bench closed-form": ("ace_diffusers.bench.closed_form", "closed-form fit speed at SD1.5 shape"),
    "bench mass": ("ace_diffusers.bench.mass", "1,000 words and two shapes erased at once, miniature world"),
    "bench inference": (
        "ace_diffusers.bench.inference",
        "operations per attention call, denoising-step overhead and adapter size at SD1.5/SDXL shape",
    ),
    "bench trainer": (
        "ace_diffusers.bench.trainer",
        "ACE efficacy on the miniature world: closed form vs full",
    ),
    "bench attacks": (
        "ace_diffusers.bench.attacks",
        "every attack against ACE, UCE and ESD-x on the miniature world; writes docs/robustness.md",
    ),
    "bench deploy": (
        "ace_diffusers.bench.deploy",
        "gated vs fused vs exported LoRA on the miniature world; writes docs/deploy.md",
    ),
    "shapes train": ("ace_diffusers.shapes.train", "re-train the miniature world (about 100 min on 2 cores)"),
    "shapes quality": ("ace_diffusers.shapes.quality", "check the miniature world against its bars"),
    "shapes heldout": ("ace_diffusers.shapes.heldout", "sweep the text encoder for held-out shape words"),
    "figures": (
        "ace_diffusers.bench.method_figure",
        "regenerate docs/images/method.png (gate and K change, computed)",
    ),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: ace-diffusers COMMAND [options]   (COMMAND --help for its options)",
        "       ace-diffusers --version",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"ace-diffusers {__version__}")
        return 0
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            module = importlib.import_module(COMMANDS[name][0])
            return int(module.main(argv[words:]) or 0)
    print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
