"""``ace-diffusers eval``: measure an erasure — MACE metrics, attack success rates, images and plots.

Examples::

    ace-diffusers eval --model shapes --adapter ./erase-circle --concept circle --output ./eval-circle
    ace-diffusers eval --model shapes --baseline uce --concept circle --output ./eval-uce
    ace-diffusers eval --model ./sd15 --adapter ./erase-vg --concept "Van Gogh" --judge clip \\
        --clip-model ./clip-vit-l14 --other Monet --other Picasso --synonym "Vincent van Gogh" \\
        --neutral art --template "a painting by {}" --output ./eval-vg

Runs unchanged under ``accelerate launch`` (e.g. ``accelerate launch --multi_gpu --num_processes 2 -m
ace_diffusers.cli eval ...``; on a CPU-only machine the group uses gloo): image batches are split
across processes, labels are gathered, and only the main process writes the report.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoProcessor, CLIPModel

from .. import helptext
from ..eval.attacks import ALL_ATTACKS
from ..eval.baselines import esd_x_erase, uce_erase
from ..eval.common import partial_state
from ..eval.concept_vector import ConceptVectorSettings
from ..eval.discrete_tokens import DiscreteTokenSettings
from ..eval.judges import CLIPZeroShotJudge, shapes_judges
from ..eval.plans import EvalPlan, prompt_plan, shapes_plan
from ..eval.report import write_report
from ..eval.runner import evaluate
from ..eval.soft_prompt import SoftPromptSettings
from ..fitting.presets import filled
from ..shapes.classifier import load_shapes_classifier
from ..shapes.erasure import concept_kind, erase_arguments
from ..shapes.pipeline import DEFAULT_SAMPLER
from ..shapes.vocab import SHAPES, STYLES
from .erase import MINIATURE_NAMES, load_model


def build_parser() -> argparse.ArgumentParser:
    p = helptext.parser("eval", __doc__)
    p.add_argument("--model", required=True,
                   help="'shapes' (the bundled miniature world), a local pipeline folder or a Hub id")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--adapter", help="ACE adapter folder or Hub id to evaluate")
    what.add_argument("--baseline", choices=["uce", "esd-x"],
                      help="fit and evaluate a baseline instead of an adapter")
    p.add_argument("--uce-tokens", choices=["last", "aligned"], default="last",
                   help="UCE: published last-token data or every aligned token")
    p.add_argument("--esd-steps", type=int, default=200, help="ESD-x fine-tuning steps")
    p.add_argument("--esd-lr", type=float, default=1e-4, help="ESD-x learning rate")
    p.add_argument("--concept", required=True, help="the erased concept to measure")
    p.add_argument("--output", required=True,
                   help="folder for results.json, report.md, grid.png, metrics.png, attacks.png")
    p.add_argument("--judge", choices=["shapes", "clip"], default=None,
                   help="default: shapes for the miniature world, else clip")
    p.add_argument("--clip-model",
                   help="local folder of a transformers CLIPModel + processor (for --judge clip)")
    p.add_argument("--label", action="append",
                   help="judge label (repeatable; default: concept, others, neutral)")
    p.add_argument("--neutral", default=None, help="neutral anchor (negative-prompt attack; CLIP label)")
    p.add_argument("--synonym", action="append", default=[],
                   help="synonym of the concept (repeatable; Acc_g)")
    p.add_argument("--other", action="append", default=[],
                   help="another concept that must survive (repeatable; Acc_s)")
    p.add_argument("--template", action="append", help="prompt template with '{}' (repeatable)")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: 25 miniature world, 30 otherwise)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--attacks", default=",".join(ALL_ATTACKS),
                   help=f"comma-separated subset of {','.join(ALL_ATTACKS)}, or 'none'")
    p.add_argument("--soft-prompts", type=int, default=2,
                   help="prompts attacked by each optimised attack (soft prompt, discrete tokens, concept "
                        "vector)")
    p.add_argument("--soft-steps", type=int, default=40)
    p.add_argument("--soft-objective", choices=["denoiser", "attention"], default="denoiser")
    p.add_argument("--discrete-steps", type=int, default=40, help="discrete-token attack: search steps")
    p.add_argument("--discrete-tokens", type=int, default=3, help="discrete-token attack: tokens searched")
    p.add_argument("--vector-strength", type=float, default=3.0,
                   help="concept-vector attack: how far along the concept's direction (Ring-A-Bell: ~3)")
    p.add_argument("--vector-steps", type=int, default=60, help="concept-vector attack: word-search steps")
    p.add_argument("--no-before", action="store_true", help="skip the original-model pass")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--colours", default=None,
                   help="miniature world: comma-separated colour subset (quick runs)")
    p.add_argument("--threads", type=int, default=None)
    return p


def _sampler(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.steps is not None:
        out["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        out["guidance_scale"] = args.guidance_scale
    if args.height is not None:
        out["height"] = args.height
    if args.width is not None:
        out["width"] = args.width
    return out


def _attacks(text: str, parser: argparse.ArgumentParser) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    names = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ALL_ATTACKS]
    if bad:
        parser.error(f"unknown attack(s) {bad}; choose from {list(ALL_ATTACKS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    attacks = _attacks(args.attacks, parser)
    miniature = args.model in MINIATURE_NAMES
    judge_kind = args.judge or ("shapes" if miniature else "clip")
    if judge_kind == "shapes" and not miniature:
        parser.error("--judge shapes judges the miniature world only (--model shapes)")
    if judge_kind == "clip" and not args.clip_model:
        parser.error("--judge clip needs --clip-model (a local CLIPModel folder)")
    if not miniature and not args.other:
        parser.error("give at least one --other concept (Acc_s) for models other than the miniature world")

    state = partial_state()
    say = print if state.is_main_process else (lambda *a, **k: None)
    started = time.perf_counter()
    pipe = load_model(args.model)
    pipe.set_progress_bar_config(disable=True)
    if state.device.type != "cpu":
        pipe.to(state.device)

    info: dict[str, Any] = {"model": args.model, "judge": judge_kind}
    original, erased = _erase(pipe, args, miniature, info)
    say(f"[eval] model ready ({info['method']}) in {time.perf_counter() - started:.1f} s")

    plan = _plan(args, parser, attacks, miniature, erased)
    judges = _judges(judge_kind, plan, args)
    settings = SoftPromptSettings(steps=args.soft_steps, objective=args.soft_objective, seed=args.seed)
    discrete = DiscreteTokenSettings(steps=args.discrete_steps, n_tokens=args.discrete_tokens, seed=args.seed,
                                     reference=SoftPromptSettings(seed=args.seed))
    vector = ConceptVectorSettings(strength=args.vector_strength, steps=args.vector_steps, seed=args.seed)
    say(f"[eval] {len(plan.cases)} images per pass on {state.num_processes} process(es)")
    evaluation = evaluate(pipe, plan, judges, original=original, before=not args.no_before,
                          soft_prompt=settings, discrete_tokens=discrete, concept_vector=vector,
                          batch_size=args.batch_size,
                          state=state)
    if state.is_main_process:
        paths = write_report(evaluation, args.output, {**info, "processes": state.num_processes})
        after = evaluation["after"].metrics
        say("[eval] " + ", ".join(f"{k}={v:.3f}" for k, v in after.items()))
        for name, row in evaluation["after"].attacks.items():
            say(f"[eval] ASR {name}: {row['asr']:.3f} ({row['n']} images)")
        say(f"[eval] report: {paths['markdown']} (done in {time.perf_counter() - started:.1f} s)")
    state.wait_for_everyone()
    return 0


def _erase(
    pipe: Any, args: argparse.Namespace, miniature: bool, info: dict[str, Any]
) -> tuple[Callable[[], Any] | None, list[str] | None]:
    """Load the adapter or fit the baseline of ``args`` (or neither: the base model); records what into
    ``info``. Returns ``(original, erased)``: the baseline's undo context (None for ACE: adapters are
    switched off) and the erased concepts (None for the base model)."""
    original = None
    erased: list[str] | None = None
    if args.adapter:
        name = pipe.load_ace_adapter(args.adapter)
        adapter = pipe.get_ace_adapter(name)
        info.update(method=f"ace ({adapter.method})", adapter=args.adapter, adapter_concepts=adapter.concepts,
                    adapter_fit_seconds=adapter.fit.get("seconds") if isinstance(adapter.fit, dict) else None)
        erased = list(adapter.concepts)
    elif args.baseline:
        edit = _fit_baseline(pipe, args, miniature)
        original = edit.original
        info.update(method=args.baseline, baseline=edit.to_dict())
        erased = [args.concept]
    else:
        info.update(method="none (base model)")
    return original, erased


def _plan(
    args: argparse.Namespace, parser: argparse.ArgumentParser, attacks: list[str], miniature: bool,
    erased: list[str] | None,
) -> EvalPlan:
    sampler = _sampler(args)
    if miniature:
        try:
            kind = concept_kind(args.concept)
        except ValueError as err:
            parser.error(str(err))
        world = [c for c in (erased or [args.concept]) if c in SHAPES + STYLES and concept_kind(c) == kind]
        return shapes_plan(args.concept, erased=sorted(set(world) | {args.concept}),
                           images_per_prompt=args.images_per_prompt, seed=args.seed, attacks=attacks,
                           soft_prompts=args.soft_prompts, neutral=args.neutral, sampler=sampler,
                           colours=args.colours.split(",") if args.colours else None)
    templates = args.template or ["a photo of {}", "a painting of {}", "an image of {}"]
    return prompt_plan(args.concept, templates=templates, synonyms=args.synonym, others=args.other,
                       neutral=args.neutral or "", images_per_prompt=args.images_per_prompt, seed=args.seed,
                       attacks=attacks, soft_prompts=args.soft_prompts, sampler=sampler)


def _fit_baseline(pipe: Any, args: argparse.Namespace, miniature: bool):
    if miniature:
        spec = erase_arguments(args.concept, args.neutral)
        neutral, preserve, templates = spec["neutral"], spec["preserve"], spec["templates"]
    else:
        neutral, preserve, templates = args.neutral or "", args.other, args.template or ["{}"]
    if args.baseline == "uce":
        return uce_erase(pipe, args.concept, neutral, preserve, templates=templates if miniature else ["{}"],
                         tokens=args.uce_tokens)
    kw: dict[str, Any] = {"seed": args.seed, "steps": args.esd_steps, "learning_rate": args.esd_lr}
    if miniature:
        kw.update(height=DEFAULT_SAMPLER["height"], width=DEFAULT_SAMPLER["width"],
                  num_inference_steps=DEFAULT_SAMPLER["num_inference_steps"],
                  prompts=[filled(t, args.concept) for t in templates])
    for key, value in (("height", args.height), ("width", args.width), ("num_inference_steps", args.steps)):
        if value is not None:
            kw[key] = value
    return esd_x_erase(pipe, args.concept, **kw)


def _judges(kind: str, plan: Any, args: argparse.Namespace) -> dict[str, Any]:
    if kind == "shapes":
        return shapes_judges(load_shapes_classifier())
    model = CLIPModel.from_pretrained(args.clip_model).eval()
    processor = AutoProcessor.from_pretrained(args.clip_model)
    defaults = [plan.concept, *plan.others] + ([plan.neutral] if plan.neutral else [])
    labels = args.label or list(dict.fromkeys(defaults))
    return {plan.head: CLIPZeroShotJudge(model, processor, labels)}

