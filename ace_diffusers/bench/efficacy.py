"""Efficacy on the miniature world: base model, ACE closed form, ACE full, UCE and ESD-x side by side.

For every *erasure* (one shape alone, or one multi-concept adapter) each method is fitted on the same
data, then judged on the same images: MACE's Acc_e / Acc_s / Acc_g / H (``shapes.erasure`` prompt
sets) and the attack success rate of every attack of :mod:`ace_diffusers.eval.attacks` (misspelling,
weighting/repetition, concept in a longer prompt, negative-prompt trick, soft-prompt attack), with
the bundled classifier as judge. Plans come from :func:`ace_diffusers.eval.shapes_plan` and scores
from :func:`ace_diffusers.eval.runner.score`, so the numbers mean what ``ace-diffusers eval`` reports.

Unlike ``bench trainer`` (which returns rows), this keeps each fitted model in hand while it is
attacked, and saves generation time three ways: the images of all concepts of one erasure are
generated in shared batches of 64 (groups mixed; every image keeps its own seed), images several
concepts' plans share (the "other concepts" of a multi-concept adapter) are generated once, and the
base model's images are generated once for the whole benchmark. What is measured (methods, attacks,
plans, each erasure's fit data) is :mod:`.efficacy_plans`; its names are importable from here too.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..eval.baselines import esd_x_erase, uce_erase
from ..eval.judges import shapes_judges
from ..eval.plans import ATTACK_PREFIX, EvalCase
from ..eval.runner import run_cases, score
from ..eval.soft_prompt import SoftPromptSettings, build_soft_prompt_reference, soft_prompt_attack
from ..fitting.closed_form import fit_adapter
from ..fitting.data import FitSettings
from ..fitting.presets import filled, resolve_spec
from ..fitting.trainer import ACETrainer
from ..shapes.classifier import load_shapes_classifier
from ..shapes.pipeline import DEFAULT_SAMPLER, load_shapes_pipeline
from .efficacy_plans import (
    ATTACK_NAMES,
    ERASERS,
    FULL,
    METHODS,
    MULTI_CONCEPTS,
    QUICK,
    EfficacyPlan,
    Erasure,
    case_key,
    erasure_arguments,
    experiments,
    label_of,
    plan_images,
    templates_of,
)

# Importable from here as before the plans got their own module (:mod:`.efficacy_plans`).
__all__ = [
    "ATTACK_NAMES",
    "ERASERS",
    "FULL",
    "METHODS",
    "MULTI_CONCEPTS",
    "QUICK",
    "EfficacyPlan",
    "Erasure",
    "case_key",
    "erasure_arguments",
    "experiments",
    "plan_images",
    "pool_attacks",
    "run",
    "summarize",
]


# ---------------------------------------------------------------------- running
def _judge_cases(
    pipe: Any, cases: list[Any], judges: dict[str, Any], plan: EfficacyPlan,
    embeds: dict[str, torch.Tensor] | None = None, state: Any = None,
) -> dict[tuple, dict[str, str]]:
    """Generate each distinct case once, in batches that mix groups; ``{case key: {head: label}}``."""

    unique: dict[tuple, Any] = {}
    for case in sorted(cases, key=lambda c: c.embeds is not None):  # prompt batches first, soft prompts after
        unique.setdefault(case_key(case), case)
    if not unique:
        return {}
    flat = [dataclasses.replace(c, group="bench") for c in unique.values()]
    predictions, _ = run_cases(pipe, flat, judges, sampler=_sampler(plan), embeds=embeds,
                               batch_size=plan.batch_size, state=state)
    return {key: {head: labels[i] for head, labels in predictions.items()} for i, key in enumerate(unique)}


def _sampler(plan: EfficacyPlan) -> dict[str, Any]:
    return {**DEFAULT_SAMPLER, **plan.sampler}


def _score(eval_plan: Any, cases: list[Any], labels: dict[tuple, dict[str, str]]) -> dict[str, Any]:
    heads = next(iter(labels.values())).keys()
    predictions = {h: [labels[case_key(c)][h] for c in cases] for h in heads}
    metrics, _, attacks = score(eval_plan, cases, predictions)
    return {
        "metrics": metrics,
        "attacks": {name: {"asr": a["asr"], "n": a["n"], "hits": round(a["asr"] * a["n"])}
                    for name, a in attacks.items()},
    }


def summarize(per_concept: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over an erasure's concepts; attack images pooled (hits / images)."""
    metrics: dict[str, float] = {}
    names = [k for k in next(iter(per_concept.values()))["metrics"]]
    for name in names:
        values = [v["metrics"][name] for v in per_concept.values() if name in v["metrics"]]
        metrics[name] = statistics.fmean(values)
    return {"metrics": metrics, "attacks": pool_attacks(entry["attacks"] for entry in per_concept.values())}


def pool_attacks(attack_sets: Iterable[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per attack: hits and images summed over ``attack_sets``, ASR = hits / images (None if no image)."""
    pooled: dict[str, dict[str, Any]] = {}
    for attacks in attack_sets:
        for name, a in attacks.items():
            total = pooled.setdefault(name, {"hits": 0, "n": 0})
            total["hits"] += a["hits"]
            total["n"] += a["n"]
    for total in pooled.values():
        total["asr"] = total["hits"] / total["n"] if total["n"] else None
    return pooled


def _soft_cases(eval_plan: Any, embeds: dict[str, torch.Tensor], pipe: Any, references: dict[str, Any],
                settings: Any) -> list[Any]:
    """Run the soft-prompt attack on the current (erased) ``pipe`` for each job of ``eval_plan``."""

    cases = []
    for j, job in enumerate(eval_plan.soft_prompt):
        result = soft_prompt_attack(pipe, job.prompt, eval_plan.concept, neutral=eval_plan.neutral,
                                    reference=references[job.prompt], settings=settings,
                                    sampler=eval_plan.sampler)
        key = f"{eval_plan.concept}/soft{j}"
        embeds[key] = result.prompt_embeds.detach().cpu()
        cases += [EvalCase(ATTACK_PREFIX + "soft_prompt", None, s, dict(job.labels), None, key, job.prompt)
                  for s in job.seeds]
    return cases


def _fit(
    method: str, pipe: Any, args: dict[str, Any], plan: EfficacyPlan
) -> tuple[Callable[[], None], float, dict]:
    """Apply ``method`` to ``pipe``; returns ``(undo, fit seconds, details)``."""
    spec_args = {k: args[k] for k in ("neutral", "preserve", "templates")}
    concepts = args["concepts"]
    if method in ("ace_cf", "ace_full"):
        t0 = time.perf_counter()
        if method == "ace_cf":
            adapter = fit_adapter(pipe, resolve_spec(concepts, **spec_args), FitSettings())
            details = {"rank": adapter.rank}
        else:
            trainer = ACETrainer(pipe, concepts, steps=plan.ace_steps, seed=plan.seed, progress=False,
                                 **spec_args)
            adapter = trainer.fit()
            details = {"rank": adapter.rank, "steps": trainer.steps, "initial_loss": trainer.initial_loss,
                       "final_loss": trainer.final_loss}
        seconds = time.perf_counter() - t0
        name = pipe.load_ace_adapter(adapter, adapter_name="bench")
        return (lambda: pipe.unload_ace_adapter(name)), seconds, details

    if method == "uce":
        edit = uce_erase(pipe, concepts, spec_args["neutral"], spec_args["preserve"])
    elif method == "esd_x":
        prompts = [filled(t, c) for c in concepts for t in templates_of(args, c)[: plan.esd_prompts]]
        edit = esd_x_erase(pipe, label_of(concepts), prompts=prompts, steps=plan.esd_steps * len(concepts),
                           trajectories=plan.esd_trajectories, height=DEFAULT_SAMPLER["height"],
                           width=DEFAULT_SAMPLER["width"],
                           num_inference_steps=DEFAULT_SAMPLER["num_inference_steps"], seed=plan.seed)
    else:
        raise ValueError(f"unknown method {method!r}")
    details = {k: v for k, v in edit.to_dict().items() if k in ("stats", "mean_relative_change")}
    return edit.restore, edit.seconds, details


def _soft_prompt_references(pipe: Any, erasures: list[Erasure], settings: SoftPromptSettings,
                            log: Callable[[str], None]) -> dict[str, Any]:
    """One soft-prompt reference per attacked prompt, built on ``pipe`` as it is (the original model)."""
    references = {}
    t0 = time.perf_counter()
    for e in erasures:
        for p in e.plans.values():
            for job in p.soft_prompt:
                if job.prompt not in references:
                    references[job.prompt] = build_soft_prompt_reference(pipe, job.prompt, settings,
                                                                         sampler=p.sampler)
    log(f"[bench] soft-prompt references for {len(references)} prompts in {time.perf_counter() - t0:.0f} s")
    return references


def _measure_method(method: str, e: Erasure, args: dict[str, Any], pipe: Any, plan: EfficacyPlan,
                    judges: dict[str, Any], references: dict[str, Any], settings: SoftPromptSettings,
                    state: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """Fit ``method`` for the erasure ``e``, attack and judge it, undo it: the method's result entry."""
    t0 = time.perf_counter()
    undo, seconds, details = _fit(method, pipe, args, plan)
    log(f"[bench] {e.label}: {METHODS[method]} fitted in {seconds:.1f} s")
    try:
        embeds: dict[str, torch.Tensor] = {}
        soft = {c: _soft_cases(p, embeds, pipe, references, settings) for c, p in e.plans.items()}
        cases = [c for p in e.plans.values() for c in p.cases] + [c for s in soft.values() for c in s]
        labels = _judge_cases(pipe, cases, judges, plan, embeds, state=state)
    finally:
        undo()
    per_concept = {c: _score(p, list(p.cases) + soft[c], labels) for c, p in e.plans.items()}
    summary = summarize(per_concept)
    entry = {"seconds": seconds, "details": details, "concepts": per_concept, **summary}
    m = summary["metrics"]
    log(f"[bench] {e.label}: {METHODS[method]} Acc_e {m['acc_e']:.2f} Acc_s {m['acc_s']:.2f} "
        f"Acc_g {m['acc_g']:.2f} H {m['h']:.3f}; ASR "
        + " ".join(f"{k} {v['asr']:.2f}" for k, v in summary["attacks"].items())
        + f" ({len(labels)} images, {time.perf_counter() - t0:.0f} s)")
    return entry


def run(plan: EfficacyPlan, *, methods: tuple[str, ...] = ERASERS, log: Callable[[str], None] = print,
        pipe: Any = None, classifier: Any = None, state: Any = None) -> dict[str, Any]:
    """Run every erasure of ``plan`` with every method; the JSON-ready result (:mod:`.report` renders it).

    ``pipe`` / ``classifier``: the miniature world's (loaded when not given); every method is undone
    after its evaluation, so ``pipe`` is left as it came. ``state``: an accelerate ``PartialState``;
    under ``accelerate launch`` every process fits the same (seeded) models and the images are split
    across processes and gathered, so every process returns the same result.
    """

    started = time.perf_counter()
    pipe = pipe if pipe is not None else load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = classifier if classifier is not None else load_shapes_classifier()
    judges = shapes_judges(classifier)
    erasures, sizes = experiments(plan)
    counts = plan_images(plan)
    log(f"[bench] efficacy: {len(erasures)} erasures x {len(methods)} methods; images per model state: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()))

    # The base model: every image once, and the soft-prompt references (they are built on the original model).
    t0 = time.perf_counter()
    base_labels = _judge_cases(pipe, [c for e in erasures for p in e.plans.values() for c in p.cases], judges,
                               plan, state=state)
    log(f"[bench] base model: {len(base_labels)} images in {time.perf_counter() - t0:.0f} s")
    settings = SoftPromptSettings(steps=plan.soft_steps, seed=plan.seed)
    references = _soft_prompt_references(pipe, erasures, settings, log)

    results = []
    for e in erasures:
        args = erasure_arguments(e.concepts)
        entry: dict[str, Any] = {"label": e.label, "kind": e.kind, "concepts": e.concepts,
                                 "arguments": {k: args[k] for k in ("neutral", "preserve", "templates")},
                                 "methods": {}}
        base = {c: _score(p, list(p.cases), base_labels) for c, p in e.plans.items()}
        entry["methods"]["base"] = {"seconds": None, "details": {}, "concepts": base, **summarize(base)}
        for method in methods:
            entry["methods"][method] = _measure_method(method, e, args, pipe, plan, judges, references,
                                                       settings, state, log)
        results.append(entry)
    return {
        "plan": plan.to_dict(),
        "methods": {k: METHODS[k] for k in ("base", *methods)},
        "sampler": _sampler(plan),
        "soft_prompt": settings.to_dict(),
        "images": counts,
        "erasures": results,
        "multi": sizes,
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
    }
