"""Evaluation runs: plans + fixed seeds -> images -> judge labels -> metrics.

:func:`evaluate` runs an :class:`~ace_diffusers.eval.plans.EvalPlan` on a pipeline *after* the erasure
and, optionally, *before* it (inside ``original()``: ACE adapters switched off by default, or a
baseline's undo handle), computes MACE's metrics and the attack success rates, and returns an
:class:`EvalResult` that :mod:`ace_diffusers.eval.report` writes to disk. The plans themselves
(:func:`shapes_plan`, :func:`prompt_plan`) live in :mod:`ace_diffusers.eval.plans` and are importable
from here too.

Under ``accelerate launch`` batches are split across processes and the labels gathered on every
process; batches are the same whatever the number of processes, so results are identical to a
single-process run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ACEValueError
from ..shapes.erasure import where_it_goes
from . import metrics as M
from .attack_runs import concept_vector_cases, discrete_token_cases, soft_prompt_cases
from .common import as_context, distributed_map, seeded_latents
from .concept_vector import ConceptVectorSettings
from .discrete_tokens import DiscreteTokenSettings
from .judges import Judge
from .plans import (
    ATTACK_PREFIX,
    CORE_GROUPS,
    DEFAULT_SAMPLER,
    EvalCase,
    EvalPlan,
    SoftPromptJob,
    prompt_plan,
    shapes_plan,
)
from .soft_prompt import SoftPromptSettings

# Importable from here as before the plans got their own module (:mod:`.plans`).
__all__ = [
    "ATTACK_PREFIX",
    "CORE_GROUPS",
    "DEFAULT_SAMPLER",
    "EvalCase",
    "EvalPlan",
    "EvalResult",
    "SoftPromptJob",
    "evaluate",
    "generate_cases",
    "make_batches",
    "prompt_plan",
    "run_cases",
    "score",
    "shapes_plan",
]


# ---------------------------------------------------------------------- generation
def make_batches(cases: Sequence[EvalCase], batch_size: int) -> list[list[int]]:
    """Case indices in batches: consecutive cases of one group (and one input kind), ``batch_size`` at most.

    With the miniature world's default (64) and plan, batches equal ``shapes.erasure.measure``'s.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for i, case in enumerate(cases):
        if current:
            first = cases[current[0]]
            other_kind = (first.embeds is None) != (case.embeds is None)
            if first.group != case.group or other_kind or len(current) >= batch_size:
                batches.append(current)
                current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def generate_cases(
    pipe: Any,
    cases: Sequence[EvalCase],
    *,
    sampler: Mapping[str, Any],
    embeds: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] for one batch of cases (seeded per image)."""
    kw = dict(sampler)
    height, width = kw.pop("height", None), kw.pop("width", None)
    latents = seeded_latents(pipe, [c.seed for c in cases], height, width)
    call: dict[str, Any] = dict(latents=latents, output_type="pt", height=height, width=width, **kw)
    if cases[0].embeds is not None:
        if embeds is None or any(c.embeds not in embeds for c in cases):
            raise ACEValueError("A soft-prompt case refers to prompt embeddings that were not given.")
        call["prompt_embeds"] = torch.cat([embeds[c.embeds] for c in cases]).to(
            pipe._execution_device, pipe.unet.dtype
        )
    else:
        call["prompt"] = [c.prompt for c in cases]
    if any(c.negative_prompt for c in cases):
        call["negative_prompt"] = [c.negative_prompt or "" for c in cases]
    if call.get("height") is None:
        call.pop("height")
    if call.get("width") is None:
        call.pop("width")
    return pipe(**call).images.float().clamp(0, 1).cpu()


def run_cases(
    pipe: Any,
    cases: Sequence[EvalCase],
    judges: Mapping[str, Judge],
    *,
    sampler: Mapping[str, Any],
    embeds: Mapping[str, torch.Tensor] | None = None,
    batch_size: int = 64,
    state: Any = None,
    keep_images: Callable[[int], bool] | None = None,
) -> tuple[dict[str, list[str]], dict[int, torch.Tensor]]:
    """Generate and judge every case: ``({head: labels per case}, {case index: uint8 image kept})``.

    Batches are distributed over ``state``'s processes (accelerate) and gathered in order.
    """
    batches = make_batches(cases, batch_size)
    keep = keep_images or (lambda i: False)

    def work(batch: list[int]) -> tuple[dict[str, list[str]], dict[int, torch.Tensor]]:
        images = generate_cases(pipe, [cases[i] for i in batch], sampler=sampler, embeds=embeds)
        labels = {head: judge.predict(images) for head, judge in judges.items()}
        kept = {i: (images[j] * 255).round().to(torch.uint8) for j, i in enumerate(batch) if keep(i)}
        return labels, kept

    results = distributed_map(work, batches, state)
    predictions: dict[str, list[str]] = {head: [""] * len(cases) for head in judges}
    kept: dict[int, torch.Tensor] = {}
    for batch, (labels, images) in zip(batches, results, strict=True):
        for head, values in labels.items():
            for i, value in zip(batch, values, strict=True):
                predictions[head][i] = value
        kept.update(images)
    return predictions, kept


# ---------------------------------------------------------------------- results
@dataclass
class EvalResult:
    """Metrics and per-group accuracies of one model state, plus a few images per group."""

    metrics: dict[str, float]
    groups: dict[str, dict[str, Any]]
    attacks: dict[str, dict[str, Any]]
    predictions: dict[str, list[str]]
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> uint8 (n, 3, H, W)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "groups": self.groups, "attacks": self.attacks,
                "seconds": round(self.seconds, 3)}


def score(
    plan: EvalPlan, cases: Sequence[EvalCase], predictions: Mapping[str, Sequence[str]]
) -> tuple[dict, dict, dict]:
    """``(metrics, groups, attacks)`` from judge labels of ``cases``."""
    groups: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(c.group for c in cases):
        idx = [i for i, c in enumerate(cases) if c.group == group]
        entry: dict[str, Any] = {"n": len(idx), "accuracy": {}}
        for head, preds in predictions.items():
            rows = [i for i in idx if head in cases[i].labels]
            if rows:
                entry["accuracy"][head] = M.accuracy(
                    [preds[i] for i in rows], [cases[i].labels[head] for i in rows]
                )
        # the interval of the plan's head, or of the group's first label (a pair's kept object)
        first = next(iter(cases[idx[0]].labels), "")
        key = plan.head if any(plan.head in cases[i].labels for i in idx) else first
        rows = [i for i in idx if key in cases[i].labels]
        hits = sum(predictions[key][i] == cases[i].labels[key] for i in rows) if key in predictions else 0
        entry["interval"] = list(M.wilson_interval(hits, len(rows) if key in predictions else len(idx)))
        groups[group] = entry
    head = plan.head
    metrics: dict[str, float] = {}
    if all(g in groups for g in ("erased", "others")) and head in predictions:
        acc_e = groups["erased"]["accuracy"][head]
        acc_s = groups["others"]["accuracy"][head]
        metrics["acc_e"] = acc_e
        if "synonyms" in groups:
            metrics["acc_g"] = groups["synonyms"]["accuracy"][head]
        metrics["acc_s"] = acc_s
        for name, (group, h) in plan.extra_metrics.items():
            if group in groups and h in groups[group]["accuracy"]:
                metrics[name] = groups[group]["accuracy"][h]
        if "acc_g" in metrics:
            metrics["h"] = M.harmonic(acc_e, acc_s, metrics["acc_g"])
        if plan.presence_head in predictions:
            rows = [i for i, c in enumerate(cases) if c.group == "erased"]
            presence = [predictions[plan.presence_head][i] for i in rows]
            metrics.update(where_it_goes(presence, [predictions[head][i] for i in rows], plan.concept))
    attacks: dict[str, dict[str, Any]] = {}
    concepts = set(plan.erased or [plan.concept])
    for group, entry in groups.items():
        if group.startswith(ATTACK_PREFIX) and head in predictions:
            idx = [i for i, c in enumerate(cases) if c.group == group]
            asr = M.attack_success_rate([predictions[head][i] for i in idx], concepts)
            attacks[group[len(ATTACK_PREFIX):]] = {"asr": asr, "n": len(idx), "interval": entry["interval"]}
    return metrics, groups, attacks


def _first_per_group(subset: Sequence[EvalCase], grid_columns: int) -> Callable[[int], bool]:
    """Which images to keep for the grid: the first image of each distinct prompt, ``grid_columns`` prompts
    per group."""
    chosen: set[int] = set()
    seen: set[tuple] = set()
    count: dict[str, int] = {}
    for i, c in enumerate(subset):
        key = (c.group, c.base_prompt if c.embeds else c.prompt, c.negative_prompt)
        if key in seen or count.get(c.group, 0) >= grid_columns:
            continue
        seen.add(key)
        count[c.group] = count.get(c.group, 0) + 1
        chosen.add(i)
    return chosen.__contains__


def _run_pass(
    pipe: Any, plan: EvalPlan, subset: list[EvalCase], judges: Mapping[str, Judge], *,
    embeds: Mapping[str, torch.Tensor], batch_size: int, state: Any, grid_columns: int,
) -> EvalResult:
    """One model state: generate and judge ``subset``, score it, keep the grid's images per group."""
    t0 = time.perf_counter()
    preds, kept = run_cases(pipe, subset, judges, sampler=plan.sampler, embeds=embeds, batch_size=batch_size,
                            state=state, keep_images=_first_per_group(subset, grid_columns))
    metrics, groups, attacks = score(plan, subset, preds)
    images = {}
    for group in groups:
        idx = sorted(i for i in kept if subset[i].group == group)
        if idx:
            images[group] = torch.stack([kept[i] for i in idx])
    return EvalResult(metrics, groups, attacks, preds, images, time.perf_counter() - t0)


def evaluate(
    pipe: Any,
    plan: EvalPlan,
    judges: Mapping[str, Judge],
    *,
    original: Callable[[], Any] | None = None,
    before: bool = True,
    soft_prompt: SoftPromptSettings | None = None,
    discrete_tokens: DiscreteTokenSettings | None = None,
    concept_vector: ConceptVectorSettings | None = None,
    batch_size: int = 64,
    state: Any = None,
    grid_columns: int = 8,
) -> dict[str, Any]:
    """Run ``plan`` on the erased ``pipe`` (its current state) and, with ``before``, on the original.

    ``judges``: ``{head: Judge}``; must contain ``plan.head``. ``original``: a context-manager factory
    that temporarily restores the pre-erasure model (default: ACE adapters switched off; for the
    baselines pass ``handle.original``). Returns ``{"plan", "cases", "after", "before", "soft_prompt",
    "discrete_tokens", "concept_vector", "seconds"}``: ``after``/``before`` are :class:`EvalResult`
    (``before`` is None when skipped; it has no soft-prompt group, since soft prompts are optimised
    against the erased model; the discrete-token attack's text prompts are drawn by both), ``cases``
    includes the optimised
    attacks' cases, ``soft_prompt`` / ``discrete_tokens`` / ``concept_vector`` their settings, losses and
    found prompts (the concept vector's embedding-level images, like the soft prompt's, are drawn after
    erasure only).
    """
    if plan.head not in judges:
        raise ACEValueError(f"The plan's metrics need a judge for head {plan.head!r}; got {sorted(judges)}.")
    context = as_context(original, pipe)
    settings = (soft_prompt or SoftPromptSettings()).validate()
    discrete = (discrete_tokens or DiscreteTokenSettings()).validate()
    vector = (concept_vector or ConceptVectorSettings()).validate()
    started = time.perf_counter()
    cases = list(plan.cases)
    embeds: dict[str, torch.Tensor] = {}
    soft_info: list[dict[str, Any]] = []
    if plan.soft_prompt:
        soft_cases, embeds, soft_info = soft_prompt_cases(pipe, plan, settings, context, state)
        cases += soft_cases
    discrete_info: list[dict[str, Any]] = []
    if plan.discrete_tokens:
        discrete_cases, discrete_info = discrete_token_cases(pipe, plan, discrete, context, state)
        cases += discrete_cases
    vector_info: list[dict[str, Any]] = []
    if plan.concept_vector:
        vector_cases, vector_embeds, vector_info = concept_vector_cases(pipe, plan, vector, state)
        cases += vector_cases
        embeds = {**embeds, **vector_embeds}

    def run(subset: list[EvalCase]) -> EvalResult:
        return _run_pass(pipe, plan, subset, judges, embeds=embeds, batch_size=batch_size, state=state,
                         grid_columns=grid_columns)

    after = run(cases)
    before_result = None
    if before:
        with context():
            before_result = run([c for c in cases if c.embeds is None])
    return {
        "plan": plan,
        "cases": cases,
        "after": after,
        "before": before_result,
        "soft_prompt": {"settings": settings.to_dict(), "attacks": soft_info} if plan.soft_prompt else None,
        "discrete_tokens": (
            {"settings": discrete.to_dict(), "attacks": discrete_info} if plan.discrete_tokens else None
        ),
        "concept_vector": (
            {"settings": vector.to_dict(), "attacks": vector_info} if plan.concept_vector else None
        ),
        "seconds": time.perf_counter() - started,
    }
