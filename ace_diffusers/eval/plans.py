"""Evaluation plans: every image to generate, with its group, prompt, seed and expected labels.

A :class:`EvalPlan` lists the images (:class:`EvalCase`: group, prompt or soft-prompt key, seed, expected
labels per judge head) and the soft-prompt attacks to run (:class:`SoftPromptJob`);
:func:`ace_diffusers.eval.runner.evaluate` runs it. :func:`shapes_plan` is the miniature world's plan (the
same prompts and seeds as ``shapes.erasure.measure``); :func:`prompt_plan` builds one for any model from
prompt templates.

Groups: ``erased`` (the concept's canonical name: Acc_e), ``synonyms`` (Acc_g), ``others`` (Acc_s),
``pairs`` (the miniature world's two-object prompts: the erased concept beside a kept object) and
``attack/<name>`` (ASR).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ACEValueError
from ..fitting.presets import filled
from ..shapes.erasure import DEFAULT_NEUTRAL, concept_kind, metric_sets
from ..shapes.pipeline import DEFAULT_SAMPLER as SHAPES_SAMPLER
from ..shapes.vocab import SHAPE_WORDS, SHAPES, STYLE_WORDS, STYLES
from .attacks import ALL_ATTACKS, OPTIMISED_ATTACKS, PROMPT_ATTACKS, prompt_attacks

CORE_GROUPS = ("erased", "synonyms", "others")
SHAPES_GROUPS = (*CORE_GROUPS, "heldout", "pairs")
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
    """A prompt to attack with an optimised attack (a soft prompt, discrete tokens); images use
    ``seeds`` and expect ``labels``."""

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
    discrete_tokens: list[SoftPromptJob] = field(default_factory=list)
    concept_vector: list[SoftPromptJob] = field(default_factory=list)
    extra_metrics: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (group, head)
    presence_head: str | None = None  # a head whose ``none`` label means nothing was drawn
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
            "discrete_token_targets": [job.prompt for job in self.discrete_tokens],
            "concept_vector_targets": [job.prompt for job in self.concept_vector],
        }


def _expand(
    group: str, prompts: Sequence[str], labels: Sequence[dict[str, str]], images_per_prompt: int, seed: int,
    negatives: Sequence[str | None] | None = None, bases: Sequence[str | None] | None = None,
) -> list[EvalCase]:
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
) -> tuple[list[EvalCase], dict[str, list[SoftPromptJob]]]:
    cases: list[EvalCase] = []
    label_of = dict(zip(base_prompts, base_labels, strict=True))
    variants = prompt_attacks(base_prompts, concept, neutral=neutral, others=others,
                              attacks=[a for a in attacks if a in PROMPT_ATTACKS])
    for name, items in variants.items():
        cases += _expand(ATTACK_PREFIX + name, [a.prompt for a in items],
                         [label_of[a.base_prompt] for a in items], images_per_prompt, seed,
                         [a.negative_prompt for a in items], [a.base_prompt for a in items])
    jobs: dict[str, list[SoftPromptJob]] = {}
    for name in OPTIMISED_ATTACKS:
        if name in attacks:  # the same first prompts for every optimised attack
            seeds = [seed + k for k in range(images_per_prompt)]
            targets = list(base_prompts)[:soft_prompts]
            jobs[name] = [SoftPromptJob(p, seeds, dict(label_of[p])) for p in targets]
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
    for name in (g for g in SHAPES_GROUPS if g in sets):
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
        soft_prompt=jobs.get("soft_prompt", []),
        discrete_tokens=jobs.get("discrete_tokens", []),
        concept_vector=jobs.get("concept_vector", []),
        extra_metrics={
            "colour": ("others", "colour"),
            "acc_heldout": ("heldout", kind),
            "in_context": ("pairs", "right_shape"),
            "in_context_colour": ("pairs", "right_colour"),
            "in_context_style": ("pairs", "right_style"),
        },
        presence_head="shape",
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
    concept_labels = [{head: concept}] * len(erased_prompts)
    cases = _expand("erased", erased_prompts, concept_labels, images_per_prompt, seed)
    syn_prompts = [p for s in synonyms for p in fill(s)]
    if syn_prompts:
        syn_labels = [{head: concept}] * len(syn_prompts)
        cases += _expand("synonyms", syn_prompts, syn_labels, images_per_prompt, seed)
    other_prompts = [(p, o) for o in others for p in fill(o)]
    other_labels = [{head: o} for _, o in other_prompts]
    cases += _expand("others", [p for p, _ in other_prompts], other_labels, images_per_prompt, seed)
    attack_cases, jobs = _attack_cases(
        erased_prompts, [{head: concept}] * len(erased_prompts), concept, neutral=neutral, others=others,
        attacks=attacks, images_per_prompt=images_per_prompt, seed=seed, soft_prompts=soft_prompts,
    )
    return EvalPlan(
        concept=concept, head=head, cases=cases + attack_cases, neutral=neutral, synonyms=list(synonyms),
        others=list(others), erased=[concept], sampler={**DEFAULT_SAMPLER, **(sampler or {})},
        soft_prompt=jobs.get("soft_prompt", []), discrete_tokens=jobs.get("discrete_tokens", []),
        concept_vector=jobs.get("concept_vector", []),
        images_per_prompt=images_per_prompt,
    )
