"""Erasure experiments in the miniature world: what to fit on, and how to judge the result.

Erasing a shape (or a fill style) is *given only its canonical word*; its trained synonyms are held
out and measure generalisation (MACE's Acc_g). Metrics, all from the bundled classifier:

* ``acc_e``  — images of prompts naming the erased concept canonically that still show it (lower is better);
* ``acc_g``  — the same for prompts using its trained synonyms (lower is better);
* ``acc_s``  — images of the *other* concepts that show the right shape/style (higher is better);
* ``colour`` — colour accuracy on those other-concept images (higher is better);
* ``h``      — harmonic mean 3 / (1/(1-acc_e) + 1/acc_s + 1/(1-acc_g));
* ``acc_heldout`` — like ``acc_g``, for words no training caption contains (the held-out split);
* ``in_context`` (and ``in_context_colour`` / ``in_context_style``) — two-object prompts pairing the
  erased concept (left) with another object (right): how often the right object is still drawn right;
* ``erased_as_none`` / ``erased_as_other`` — where the erased concept goes: the share of its canonical
  prompts' images that show nothing, or something else.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from .heldout import heldout_words
from .pipeline import generate
from .vocab import COLOURS, NONE, SHAPE_WORDS, SHAPES, STYLE_WORDS, STYLES, article_fix, pair_prompt

# Anchors: an erased shape becomes "no particular shape" (the empty phrase: "a red" draws an empty,
# red-tinted canvas); an erased fill style becomes plain (solid) fill.
DEFAULT_NEUTRAL = {"shape": "", "style": "plain"}


def concept_kind(concept: str) -> str:
    if concept in SHAPES:
        return "shape"
    if concept in STYLES:
        return "style"
    raise ValueError(f"{concept!r} is not a miniature-world concept; choose from {SHAPES + STYLES}.")


def fit_templates(kind: str) -> list[str]:
    """Caption-like templates with canonical colour/style words; ``{}`` takes the concept word."""
    if kind == "shape":
        return [
            "a red {}",
            "a striped blue {}",
            "a picture of a green {}",
            "yellow {}, dotted",
            "an image showing a {} in purple",
            "a {}",
            "a solid orange {}",
            "a drawing of a dotted cyan {}",
        ]
    return [
        "a {} red circle",
        "a {} blue square",
        "a green triangle, {}",
        "a {} yellow star",
        "a picture of a {} purple heart",
        "a {} orange hexagon",
        "a drawing of a {} cyan diamond",
        "a {} pink cross",
    ]


def erase_arguments(concept: str, neutral: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``erase_concept`` / ``ACETrainer``: canonical word only, others preserved."""
    kind = concept_kind(concept)
    others = [c for c in (SHAPES if kind == "shape" else STYLES) if c != concept]
    return {
        "concepts": concept,
        "neutral": neutral if neutral is not None else DEFAULT_NEUTRAL[kind],
        "preserve": others,
        "templates": fit_templates(kind),
    }


HELDOUT_WORDS = 4  # held-out words per shape in the metric sets (each in half the colours)
PAIR_PROMPTS = 16  # two-object prompts per erased concept (x 2 images = 32 per cell)


@dataclass
class PromptSet:
    name: str
    prompts: list[str]
    labels: list[dict[str, str]]


def metric_sets(
    concept: str, erased: list[str] | None = None, colours: list[str] | None = None
) -> dict[str, PromptSet]:
    """``erased`` (canonical word), ``synonyms`` (held-out trained synonyms), ``others`` (concepts of
    the same kind that were not erased). ``erased`` lists every concept of a multi-concept adapter."""
    colours = colours or COLOURS
    kind = concept_kind(concept)
    gone = set(erased or [concept]) | {concept}
    sets: dict[str, PromptSet] = {}
    if kind == "shape":

        def prompt(shape_word: str, colour: str) -> str:
            return article_fix(f"a {colour} {shape_word}")

        sets["erased"] = PromptSet(
            "erased",
            [prompt(concept, c) for c in colours],
            [{"shape": concept, "colour": c} for c in colours],
        )
        syn = [(w, c) for i, w in enumerate(SHAPE_WORDS[concept][1:]) for c in colours[i::2]]
        sets["synonyms"] = PromptSet(
            "synonyms", [prompt(w, c) for w, c in syn], [{"shape": concept, "colour": c} for _, c in syn]
        )
        others = [
            (s, c) for i, s in enumerate(s for s in SHAPES if s not in gone) for c in colours[i % 2 :: 2]
        ]
        sets["others"] = PromptSet(
            "others", [prompt(s, c) for s, c in others], [{"shape": s, "colour": c} for s, c in others]
        )
        sets["pairs"] = pair_set(concept, gone, colours)
        if heldout_words().get(concept):
            sets["heldout"] = heldout_set(concept, colours)
        return sets

    def style_prompt(style_word: str, colour: str, shape: str) -> str:
        return article_fix(f"a {style_word} {colour} {shape}")

    kept_shapes = [s for s in SHAPES if s not in gone]
    grid = [(c, kept_shapes[i % len(kept_shapes)]) for i, c in enumerate(colours)]
    sets["erased"] = PromptSet(
        "erased",
        [style_prompt(concept, c, s) for c, s in grid],
        [{"style": concept, "colour": c, "shape": s} for c, s in grid],
    )
    syn = [(w, c, s) for w in STYLE_WORDS[concept][1:] for c, s in grid[::2]]
    sets["synonyms"] = PromptSet(
        "synonyms",
        [style_prompt(w, c, s) for w, c, s in syn],
        [{"style": concept, "colour": c, "shape": s} for _, c, s in syn],
    )
    others = [(st, c, s) for st in STYLES if st not in gone for c, s in grid]
    sets["others"] = PromptSet(
        "others",
        [style_prompt(st, c, s) for st, c, s in others],
        [{"style": st, "colour": c, "shape": s} for st, c, s in others],
    )
    sets["pairs"] = pair_set(concept, gone, colours)
    return sets


def heldout_set(concept: str, colours: list[str] | None = None) -> PromptSet:
    """``a {colour} {word}`` for the shape's held-out words (never trained; the base model draws them as
    the shape): Acc_g on words the erasure was never given and the world never saw."""
    colours = colours or COLOURS
    words = heldout_words().get(concept, [])[:HELDOUT_WORDS]
    grid = [(w, c) for i, w in enumerate(words) for c in colours[i % 2 :: 2]]
    return PromptSet(
        "heldout",
        [article_fix(f"a {c} {w}") for w, c in grid],
        [{"shape": concept, "colour": c} for _, c in grid],
    )


def pair_set(concept: str, gone: set[str], colours: list[str] | None = None) -> PromptSet:
    """Two-object prompts: the erased concept on the left, a kept object (shape, colour, style) right.

    Labels are per slot: ``left_<head>`` is the erased concept, ``right_shape`` / ``right_colour`` /
    ``right_style`` the object that must survive the erasure.
    """
    colours = colours or COLOURS
    kind = concept_kind(concept)
    kept = [s for s in SHAPES if s not in gone]
    kept_styles = [st for st in STYLES if st not in gone]
    prompts, labels = [], []
    for i in range(PAIR_PROMPTS):
        colour, other_colour = colours[i % len(colours)], colours[(i + 3) % len(colours)]
        shape, style = kept[i % len(kept)], kept_styles[i % len(kept_styles)]
        right = article_fix(f"a {style} {other_colour} {shape}")
        if kind == "shape":
            left, left_label = article_fix(f"a {colour} {concept}"), {"left_shape": concept}
        else:
            left_shape = kept[(i + 1) % len(kept)]
            left, left_label = article_fix(f"a {concept} {colour} {left_shape}"), {"left_style": concept}
        prompts.append(pair_prompt(left, right))
        labels.append(
            {"right_shape": shape, "right_colour": other_colour, "right_style": style, **left_label}
        )
    return PromptSet("pairs", prompts, labels)


def where_it_goes(shapes: list[str], heads: list[str], concept: str) -> dict[str, float]:
    """Shares of images of the erased concept's prompts that show nothing, or another value of its head.

    ``shapes``: image-level shape labels; ``heads``: the labels of the concept's head (the same list for
    a shape concept, styles for a style concept).
    """
    n = max(1, len(shapes))
    none = sum(s == NONE for s in shapes) / n
    other = sum(s != NONE and h != concept for s, h in zip(shapes, heads, strict=True)) / n
    return {"erased_as_none": none, "erased_as_other": other}


def measure(
    pipe: Any,
    classifier: Any,
    concept: str,
    *,
    images_per_prompt: int = 2,
    seed: int = 0,
    erased: list[str] | None = None,
    sets: dict[str, PromptSet] | None = None,
    min_images: int | None = None,
    **sampler: Any,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Generate every prompt set with fixed seeds and score it; returns (metrics, images per set).

    ``min_images``: instead of ``images_per_prompt`` for every set, just enough images per prompt for
    each set to reach this many (:func:`per_prompt`).
    """

    kind = concept_kind(concept)
    sets = sets or metric_sets(concept, erased)
    images, hits = {}, {}
    for name, pset in sets.items():
        count = per_prompt(pset, images_per_prompt, min_images)
        labels = [lab for lab in pset.labels for _ in range(count)]
        imgs, pred = _judged(pipe, classifier, pset, count, seed, sampler)
        images[name] = imgs
        hits[name] = {
            key: sum(p == lab[key] for p, lab in zip(pred[key], labels, strict=True)) / len(labels)
            for key in labels[0]
        }
        if name == "erased":
            hits["where"] = where_it_goes(pred["shape"], pred[kind], concept)
    acc_e = hits["erased"][kind]
    acc_g = hits["synonyms"][kind]
    acc_s = hits["others"][kind]
    metrics = {
        "acc_e": acc_e,
        "acc_g": acc_g,
        "acc_s": acc_s,
        "colour": hits["others"]["colour"],
        "h": harmonic(acc_e, acc_s, acc_g),
        **hits["where"],
    }
    if "heldout" in hits:
        metrics["acc_heldout"] = hits["heldout"][kind]
    if "pairs" in hits:
        metrics.update(
            in_context=hits["pairs"]["right_shape"],
            in_context_colour=hits["pairs"]["right_colour"],
            in_context_style=hits["pairs"]["right_style"],
        )
    return metrics, images


def _judged(
    pipe: Any, classifier: Any, pset: PromptSet, count: int, seed: int, sampler: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """``count`` images of each prompt of ``pset`` (seeds ``seed + k``) and the judge's labels."""
    prompts = [p for p in pset.prompts for _ in range(count)]
    seeds = [seed + k for _ in pset.prompts for k in range(count)]
    images = generate(pipe, prompts, seeds=seeds, **sampler)
    return images, classifier.predict(images)


def measure_erased(
    pipe: Any,
    classifier: Any,
    concept: str,
    *,
    images_per_prompt: int = 2,
    seed: int = 0,
    erased: list[str] | None = None,
    **sampler: Any,
) -> float:
    """Acc_e alone: :func:`measure`'s ``erased`` set, the same prompts, seeds and judge."""
    pset = metric_sets(concept, erased)["erased"]
    shown = _judged(pipe, classifier, pset, images_per_prompt, seed, sampler)[1][concept_kind(concept)]
    return sum(s == concept for s in shown) / len(shown)


def per_prompt(pset: PromptSet, images_per_prompt: int, min_images: int | None = None) -> int:
    """Images per prompt of ``pset``: ``images_per_prompt``, or with ``min_images`` the fewest that give
    the set at least that many images."""
    if min_images is None:
        return images_per_prompt
    return max(1, math.ceil(min_images / max(1, len(pset.prompts))))


def image_counts(concept: str, erased: list[str], images_per_prompt: int) -> dict[str, int]:
    """Images :func:`measure` generates per prompt set of ``concept`` (``erased``: every erased concept)."""
    return {name: len(ps.prompts) * images_per_prompt for name, ps in metric_sets(concept, erased).items()}


def harmonic(acc_e: float, acc_s: float, acc_g: float) -> float:
    """MACE's H = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g)); 0 when any term is 0."""
    terms = (1 - acc_e, acc_s, 1 - acc_g)
    if min(terms) <= 0:
        return 0.0
    return 3 / sum(1 / t for t in terms)


def neutral_floor(
    pipe: Any,
    classifier: Any,
    concept: str,
    *,
    neutral: str | None = None,
    images_per_prompt: int = 2,
    seed: int = 0,
    erased: list[str] | None = None,
    **sampler: Any,
) -> float:
    """Acc_e of a *perfect* erasure: the canonical prompts with the concept replaced by its neutral anchor.

    Erasure maps the concept onto the anchor, so an erased model can do no better than the base model
    does on the anchor's prompts; e.g. "a red" (empty shape anchor) is sometimes drawn as a circle.
    Read ``acc_e`` against this floor.
    """

    kind = concept_kind(concept)
    anchor = DEFAULT_NEUTRAL[kind] if neutral is None else neutral
    pset = metric_sets(concept, erased)["erased"]
    prompts = [" ".join(re.sub(rf"\b{re.escape(concept)}\b", anchor, p).split()) for p in pset.prompts]
    prompts = [article_fix(p) for p in prompts for _ in range(images_per_prompt)]
    seeds = [seed + k for _ in pset.prompts for k in range(images_per_prompt)]
    predicted = classifier.predict(generate(pipe, prompts, seeds=seeds, **sampler))[kind]
    return sum(p == concept for p in predicted) / len(predicted)
