"""What the efficacy benchmark measures (:mod:`.efficacy` runs it): the methods and attacks it compares,
the quick and full plans, what each erasure is fitted on, and the evaluation plans of each erasure.

Pure planning: nothing here loads a model or generates an image, so the plans' sizes (images per model
state) are known, and tested, before a run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..eval.attacks import PROMPT_ATTACKS
from ..eval.plans import shapes_plan
from ..shapes.erasure import concept_kind, erase_arguments, fit_templates
from ..shapes.vocab import SHAPES, STYLES

# The suite's attacks: the prompt attacks and the soft prompt. The discrete-token attack
# (``ace-diffusers eval --attacks discrete_tokens``) is not part of this benchmark yet (issue #23).
BENCH_ATTACKS = PROMPT_ATTACKS + ("soft_prompt",)

METHODS: dict[str, str] = {
    "base": "base model",
    "ace_cf": "ACE closed form",
    "ace_full": "ACE full",
    "uce": "UCE",
    "esd_x": "ESD-x",
}
ERASERS = ("ace_cf", "ace_full", "uce", "esd_x")
ATTACK_NAMES: dict[str, str] = {
    "misspelling": "misspelling",
    "weighting": "weighting / repetition",
    "context": "concept in a longer prompt",
    "negative": "negative-prompt trick",
    "soft_prompt": "soft-prompt attack",
}
# Multi-concept adapters: shapes first, then a fill style, so every size adds concepts to the last.
# Shapes whose neutral floor is high are left out here (the empty anchor "a red" is itself drawn as a
# hexagon, circle or star at times: ``shapes.erasure.neutral_floor``); they are measured alone.
MULTI_CONCEPTS: dict[int, list[str]] = {
    1: ["square"],
    3: ["square", "triangle", "heart"],
    5: ["square", "triangle", "heart", "cross", "striped"],
}


@dataclass
class EfficacyPlan:
    """What the efficacy section measures, and at which cost (see :data:`QUICK` and :data:`FULL`)."""

    shapes: list[str]  # each erased alone
    # adapter size -> its concepts; a 1-concept entry equal to a single run reuses it
    multi: dict[int, list[str]]
    colours: list[str] | None  # colour grid of the prompt sets (None: all 8)
    images_per_prompt: int
    ace_steps: int | None  # ACETrainer fine-tuning steps (None: the trainer's default for the concept count)
    esd_steps: int  # ESD-x steps per erased concept (a joint multi-concept run gets n times as many)
    esd_trajectories: int  # ESD-x frozen-model trajectories per prompt
    esd_prompts: int  # ESD-x prompts per concept (the first fit templates filled with the concept)
    soft_prompts: int  # prompts per concept attacked with a soft prompt
    soft_steps: int
    seed: int = 0
    batch_size: int = 64
    sampler: dict[str, Any] = field(default_factory=dict)  # overrides of the world's sampler (tests only)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["multi"] = {str(k): v for k, v in self.multi.items()}
        return out


QUICK = EfficacyPlan(
    shapes=["square", "circle"],
    multi=dict(MULTI_CONCEPTS),
    colours=["red", "green", "blue", "yellow"],
    images_per_prompt=1,
    ace_steps=None,  # the trainer's default: the quick bench measures ACE as users get it
    esd_steps=60,
    esd_trajectories=2,
    esd_prompts=4,
    soft_prompts=1,
    soft_steps=20,
)
FULL = EfficacyPlan(
    shapes=["circle", "square", "triangle", "star", "heart", "cross", "hexagon", "diamond"],
    multi=dict(MULTI_CONCEPTS),
    colours=None,
    images_per_prompt=2,
    ace_steps=None,
    esd_steps=200,
    esd_trajectories=4,
    esd_prompts=8,
    soft_prompts=2,
    soft_steps=40,
)


# ---------------------------------------------------------------------- what each erasure is fitted on
def _mentions(template: str, words: list[str]) -> bool:
    return any(re.search(r"(?<![\w-])" + re.escape(w) + r"(?![\w-])", template) for w in words)


def erasure_arguments(concepts: list[str]) -> dict[str, Any]:
    """``concepts``/``neutral``/``preserve``/``templates`` for ``fit_adapter``/``ACETrainer``/the baselines.

    One concept: the world's standard arguments (:func:`ace_diffusers.shapes.erasure.erase_arguments`).
    Several: every concept not erased is preserved, and every template (of an erased or a preserved
    concept) that mentions an erased concept is dropped — otherwise "preserve dotted" would be taught
    on "a dotted red circle" while "circle" is being erased, and the two objectives would fight.
    """

    if len(concepts) == 1:
        args = erase_arguments(concepts[0])
        return {**args, "concepts": [concepts[0]], "neutral": [args["neutral"]]}
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"duplicate concepts in {concepts}")
    kept = [c for c in SHAPES + STYLES if c not in concepts]
    templates = {}
    for c in concepts + kept:
        usable = [t for t in fit_templates(concept_kind(c)) if not _mentions(t, concepts)]
        if not usable:
            raise ValueError(f"every fit template of {c!r} mentions an erased concept of {concepts}")
        templates[c] = usable
    return {
        "concepts": list(concepts),
        "neutral": [erase_arguments(c)["neutral"] for c in concepts],
        "preserve": kept,
        "templates": templates,
    }


def templates_of(args: dict[str, Any], concept: str) -> list[str]:
    templates = args["templates"]
    return list(templates[concept] if isinstance(templates, dict) else templates)


# ---------------------------------------------------------------------- planning
@dataclass
class Erasure:
    """One erasure experiment: its concepts and one evaluation plan per concept."""

    label: str
    kind: str  # "single" | "multi"
    concepts: list[str]
    plans: dict[str, Any]  # concept -> EvalPlan


def label_of(concepts: list[str]) -> str:
    return "+".join(concepts)


def experiments(plan: EfficacyPlan) -> tuple[list[Erasure], dict[str, str]]:
    """The erasures to run (singles first) and ``{adapter size: label of the erasure measuring it}``."""

    def make(concepts: list[str], kind: str) -> Erasure:
        plans = {
            c: shapes_plan(c, erased=list(concepts), images_per_prompt=plan.images_per_prompt, seed=plan.seed,
                           soft_prompts=plan.soft_prompts, colours=plan.colours, sampler=plan.sampler,
                           attacks=BENCH_ATTACKS)
            for c in concepts
        }
        return Erasure(label_of(concepts), kind, list(concepts), plans)

    out = [make([s], "single") for s in plan.shapes]
    sizes: dict[str, str] = {}
    for n in sorted(plan.multi):
        concepts = plan.multi[n]
        if len(concepts) != n:
            raise ValueError(f"multi-concept size {n} lists {len(concepts)} concepts: {concepts}")
        label = label_of(concepts)
        if not any(e.label == label for e in out):
            out.append(make(concepts, "multi"))
        sizes[str(n)] = label
    return out, sizes


def case_key(case: Any) -> tuple:
    """Two cases with equal keys produce the same image (same prompt, negative prompt, seed, soft prompt)."""
    return (case.prompt, case.negative_prompt or "", case.seed, case.embeds)


def plan_images(plan: EfficacyPlan) -> dict[str, int]:
    """Images generated per model state: ``{erasure label: images}`` plus ``"base"`` (all erasures)."""
    erasures, _ = experiments(plan)
    out = {}
    base: set[tuple] = set()
    for e in erasures:
        keys = {case_key(c) for p in e.plans.values() for c in p.cases}
        base |= keys
        out[e.label] = len(keys) + sum(len(p.soft_prompt) * plan.images_per_prompt for p in e.plans.values())
    out["base"] = len(base)
    return out
