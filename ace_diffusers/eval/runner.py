"""Evaluation plans and their execution: prompts + fixed seeds -> images -> judge labels -> metrics.

A :class:`EvalPlan` lists every image to generate (:class:`EvalCase`: group, prompt or soft-prompt
key, seed, expected labels per judge head). :func:`evaluate` runs a plan on a pipeline *after* the
erasure and, optionally, *before* it (inside ``original()``: ACE adapters switched off by default, or
a baseline's undo handle), computes MACE's metrics and the attack success rates, and returns an
:class:`EvalResult` that :mod:`ace_diffusers.eval.report` writes to disk.

Groups: ``erased`` (the concept's canonical name: Acc_e), ``synonyms`` (Acc_g), ``others`` (Acc_s),
and ``attack/<name>`` (ASR). Under ``accelerate launch`` batches are split across processes and the
labels gathered on every process; batches are the same whatever the number of processes, so results
are identical to a single-process run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ACEValueError
from ..fitting.presets import filled
from ..shapes.erasure import DEFAULT_NEUTRAL, concept_kind, metric_sets
from ..shapes.pipeline import DEFAULT_SAMPLER as SHAPES_SAMPLER
from ..shapes.vocab import SHAPE_WORDS, SHAPES, STYLE_WORDS, STYLES
from . import metrics as M
from .attacks import (
    ALL_ATTACKS,
    PROMPT_ATTACKS,
    SoftPromptSettings,
    build_soft_prompt_reference,
    prompt_attacks,
    soft_prompt_attack,
)
from .common import as_context, distributed_map, seeded_latents
from .judges import Judge

CORE_GROUPS = ("erased", "synonyms", "others")
ATTACK_PREFIX = "attack/"
DEFAULT_SAMPLER: dict[str, Any] = dict(num_inference_steps=30, guidance_scale=7.5)


@dataclass
class EvalCase:
    """One image: ``prompt`` (or ``embeds``: key of a soft prompt), its seed and expected labels."""

    group: str
    prompt: str | None
    seed: int
    labels: dict[str, str]
    negative_prompt: str | None = None
    embeds: str | None = None
    base_prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class SoftPromptJob:
    """A prompt to attack with a soft prompt; images use ``seeds`` and expect ``labels``."""

    prompt: str
    seeds: list[int]
    labels: dict[str, str]


@dataclass
class EvalPlan:
    concept: str
    head: str  # the judge head that decides whether an image shows the concept
    cases: list[EvalCase]
    neutral: str = ""
    synonyms: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    erased: list[str] = field(default_factory=list)  # every concept the model was erased of
    sampler: dict[str, Any] = field(default_factory=dict)
    soft_prompt: list[SoftPromptJob] = field(default_factory=list)
    extra_metrics: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (group, head)
    images_per_prompt: int = 1

    def groups(self) -> list[str]:
        return list(dict.fromkeys(c.group for c in self.cases))

    def describe(self) -> dict[str, Any]:
        return {
            "concept": self.concept,
            "erased": self.erased or [self.concept],
            "neutral": self.neutral,
            "synonyms": self.synonyms,
            "others": self.others,
            "head": self.head,
            "sampler": self.sampler,
            "images_per_prompt": self.images_per_prompt,
            "groups": {g: sum(c.group == g for c in self.cases) for g in self.groups()},
            "soft_prompt_targets": [job.prompt for job in self.soft_prompt],
        }


# ---------------------------------------------------------------------- plans
def _expand(group: str, prompts: Sequence[str], labels: Sequence[dict[str, str]], images_per_prompt: int, seed: int,
            negatives: Sequence[str | None] | None = None, bases: Sequence[str | None] | None = None) -> list[EvalCase]:
    negatives = negatives or [None] * len(prompts)
    bases = bases or [None] * len(prompts)
    return [
        EvalCase(group, p, seed + k, dict(lab), n, None, b)
        for p, lab, n, b in zip(prompts, labels, negatives, bases, strict=True)
        for k in range(images_per_prompt)
    ]


def _attack_cases(
    base_prompts: Sequence[str],
    base_labels: Sequence[dict[str, str]],
    concept: str,
    *,
    neutral: str,
    others: Sequence[str],
    attacks: Sequence[str],
    images_per_prompt: int,
    seed: int,
    soft_prompts: int,
) -> tuple[list[EvalCase], list[SoftPromptJob]]:
    cases: list[EvalCase] = []
    label_of = dict(zip(base_prompts, base_labels, strict=True))
    variants = prompt_attacks(base_prompts, concept, neutral=neutral, others=others,
                              attacks=[a for a in attacks if a in PROMPT_ATTACKS])
    for name, items in variants.items():
        cases += _expand(ATTACK_PREFIX + name, [a.prompt for a in items], [label_of[a.base_prompt] for a in items],
                         images_per_prompt, seed, [a.negative_prompt for a in items], [a.base_prompt for a in items])
    jobs = []
    if "soft_prompt" in attacks:
        for prompt in list(base_prompts)[:soft_prompts]:
            jobs.append(SoftPromptJob(prompt, [seed + k for k in range(images_per_prompt)], dict(label_of[prompt])))
    return cases, jobs


def _check_attacks(attacks: Sequence[str]) -> list[str]:
    attacks = list(attacks)
    unknown = [a for a in attacks if a not in ALL_ATTACKS]
    if unknown:
        raise ACEValueError(f"Unknown attack(s) {unknown}; choose from {list(ALL_ATTACKS)}.")
    return attacks


def shapes_plan(
    concept: str,
    *,
    erased: list[str] | None = None,
    images_per_prompt: int = 2,
    seed: int = 0,
    attacks: Sequence[str] = ALL_ATTACKS,
    soft_prompts: int = 2,
    neutral: str | None = None,
    sampler: Mapping[str, Any] | None = None,
    colours: list[str] | None = None,
) -> EvalPlan:
    """The miniature world's plan: ``shapes.erasure.metric_sets`` (same prompts, seeds and sampler as
    ``shapes.erasure.measure``, so ``acc_e``/``acc_g``/``acc_s``/``colour``/``h`` are the same numbers),
    plus attacks on the ``erased`` prompts. ``colours`` restricts the colour grid (quick runs)."""

    attacks = _check_attacks(attacks)
    kind = concept_kind(concept)
    sets = metric_sets(concept, erased, colours)
    cases: list[EvalCase] = []
    for name in CORE_GROUPS:
        pset = sets[name]
        cases += _expand(name, pset.prompts, pset.labels, images_per_prompt, seed)
    gone = set(erased or [concept]) | {concept}
    others = [s for s in SHAPES if s not in gone] if kind == "shape" else [s for s in STYLES if s not in gone]
    context_others = others if kind == "shape" else [s for s in SHAPES if s not in gone]
    anchor = neutral if neutral is not None else DEFAULT_NEUTRAL[kind]
    attack_cases, jobs = _attack_cases(
        sets["erased"].prompts, sets["erased"].labels, concept, neutral=anchor, others=context_others,
        attacks=attacks, images_per_prompt=images_per_prompt, seed=seed, soft_prompts=soft_prompts,
    )
    words = SHAPE_WORDS if kind == "shape" else STYLE_WORDS
    return EvalPlan(
        concept=concept,
        head=kind,
        cases=cases + attack_cases,
        neutral=anchor,
        synonyms=list(words[concept][1:]),
        others=others,
        erased=sorted(gone, key=lambda c: (c != concept, c)),
        sampler={**SHAPES_SAMPLER, **(sampler or {})},
        soft_prompt=jobs,
        extra_metrics={"colour": ("others", "colour")},
        images_per_prompt=images_per_prompt,
    )


def prompt_plan(
    concept: str,
    *,
    templates: Sequence[str] = ("a photo of {}", "a painting of {}", "an image of {}"),
    synonyms: Sequence[str] = (),
    others: Sequence[str] = (),
    neutral: str = "",
    head: str = "concept",
    images_per_prompt: int = 2,
    seed: int = 0,
    attacks: Sequence[str] = ALL_ATTACKS,
    soft_prompts: int = 2,
    sampler: Mapping[str, Any] | None = None,
) -> EvalPlan:
    """A plan for any model: ``templates`` filled with the concept, its synonyms and other concepts;
    a judge head named ``head`` must return the concept's name (or an other concept's) as label."""
    attacks = _check_attacks(attacks)
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ACEValueError("Each template must contain '{}' exactly once.")
    if not others:
        raise ACEValueError("Acc_s needs at least one other concept (others=[...]).")

    def fill(phrase: str) -> list[str]:
        return [filled(t, phrase) for t in templates]

    erased_prompts = fill(concept)
    cases = _expand("erased", erased_prompts, [{head: concept}] * len(erased_prompts), images_per_prompt, seed)
    syn_prompts = [p for s in synonyms for p in fill(s)]
    if syn_prompts:
        cases += _expand("synonyms", syn_prompts, [{head: concept}] * len(syn_prompts), images_per_prompt, seed)
    other_prompts = [(p, o) for o in others for p in fill(o)]
    cases += _expand("others", [p for p, _ in other_prompts], [{head: o} for _, o in other_prompts], images_per_prompt, seed)
    attack_cases, jobs = _attack_cases(
        erased_prompts, [{head: concept}] * len(erased_prompts), concept, neutral=neutral, others=others,
        attacks=attacks, images_per_prompt=images_per_prompt, seed=seed, soft_prompts=soft_prompts,
    )
    return EvalPlan(
        concept=concept, head=head, cases=cases + attack_cases, neutral=neutral, synonyms=list(synonyms),
        others=list(others), erased=[concept], sampler={**DEFAULT_SAMPLER, **(sampler or {})}, soft_prompt=jobs,
        images_per_prompt=images_per_prompt,
    )


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
            if first.group != case.group or (first.embeds is None) != (case.embeds is None) or len(current) >= batch_size:
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
        call["prompt_embeds"] = torch.cat([embeds[c.embeds] for c in cases]).to(pipe._execution_device, pipe.unet.dtype)
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


def score(plan: EvalPlan, cases: Sequence[EvalCase], predictions: Mapping[str, Sequence[str]]) -> tuple[dict, dict, dict]:
    """``(metrics, groups, attacks)`` from judge labels of ``cases``."""
    groups: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(c.group for c in cases):
        idx = [i for i, c in enumerate(cases) if c.group == group]
        entry: dict[str, Any] = {"n": len(idx), "accuracy": {}}
        for head, preds in predictions.items():
            rows = [i for i in idx if head in cases[i].labels]
            if rows:
                entry["accuracy"][head] = M.accuracy([preds[i] for i in rows], [cases[i].labels[head] for i in rows])
        hits = sum(predictions[plan.head][i] == cases[i].labels[plan.head] for i in idx) if plan.head in predictions else 0
        entry["interval"] = list(M.wilson_interval(hits, len(idx)))
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
    attacks: dict[str, dict[str, Any]] = {}
    concepts = set(plan.erased or [plan.concept])
    for group, entry in groups.items():
        if group.startswith(ATTACK_PREFIX) and head in predictions:
            idx = [i for i, c in enumerate(cases) if c.group == group]
            asr = M.attack_success_rate([predictions[head][i] for i in idx], concepts)
            attacks[group[len(ATTACK_PREFIX):]] = {"asr": asr, "n": len(idx), "interval": entry["interval"]}
    return metrics, groups, attacks


def evaluate(
    pipe: Any,
    plan: EvalPlan,
    judges: Mapping[str, Judge],
    *,
    original: Callable[[], Any] | None = None,
    before: bool = True,
    soft_prompt: SoftPromptSettings | None = None,
    batch_size: int = 64,
    state: Any = None,
    grid_columns: int = 8,
) -> dict[str, Any]:
    """Run ``plan`` on the erased ``pipe`` (its current state) and, with ``before``, on the original.

    ``judges``: ``{head: Judge}``; must contain ``plan.head``. ``original``: a context-manager factory
    that temporarily restores the pre-erasure model (default: ACE adapters switched off; for the
    baselines pass ``handle.original``). Returns ``{"plan", "cases", "after", "before", "soft_prompt",
    "seconds"}``: ``after``/``before`` are :class:`EvalResult` (``before`` is None when skipped; it has
    no soft-prompt group, since soft prompts are optimised against the erased model), ``cases`` includes
    the soft-prompt cases, ``soft_prompt`` their settings and losses.
    """
    if plan.head not in judges:
        raise ACEValueError(f"The plan's metrics need a judge for head {plan.head!r}; got {sorted(judges)}.")
    context = as_context(original, pipe)
    settings = (soft_prompt or SoftPromptSettings()).validate()
    started = time.perf_counter()
    cases = list(plan.cases)
    embeds: dict[str, torch.Tensor] = {}
    soft_info: list[dict[str, Any]] = []
    if plan.soft_prompt:
        jobs = plan.soft_prompt
        with context():
            references = distributed_map(
                lambda job: build_soft_prompt_reference(pipe, job.prompt, settings, sampler=plan.sampler), jobs, state
            )
        results = distributed_map(
            lambda pair: soft_prompt_attack(pipe, pair[0].prompt, plan.concept, neutral=plan.neutral,
                                            reference=pair[1], settings=settings, sampler=plan.sampler),
            list(zip(jobs, references, strict=True)), state,
        )
        for j, (job, res) in enumerate(zip(jobs, results, strict=True)):
            key = f"soft{j}"
            embeds[key] = res.prompt_embeds.cpu()
            cases += [EvalCase(ATTACK_PREFIX + "soft_prompt", None, s, dict(job.labels), None, key, job.prompt) for s in job.seeds]
            soft_info.append({"prompt": job.prompt, "initial_loss": res.initial_loss, "final_loss": res.final_loss,
                              "seconds": round(res.seconds, 3), "steps": len(res.losses)})

    def first_per_group(subset: Sequence[EvalCase]) -> Callable[[int], bool]:
        """The first image of each distinct prompt, ``grid_columns`` prompts per group."""
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

    def run(subset: list[EvalCase]) -> EvalResult:
        t0 = time.perf_counter()
        preds, kept = run_cases(pipe, subset, judges, sampler=plan.sampler, embeds=embeds, batch_size=batch_size,
                                state=state, keep_images=first_per_group(subset))
        metrics, groups, attacks = score(plan, subset, preds)
        images = {}
        for group in groups:
            idx = sorted(i for i in kept if subset[i].group == group)
            if idx:
                images[group] = torch.stack([kept[i] for i in idx])
        return EvalResult(metrics, groups, attacks, preds, images, time.perf_counter() - t0)

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
        "seconds": time.perf_counter() - started,
    }
