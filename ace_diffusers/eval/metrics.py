"""MACE's erasure metrics and the attack success rate, as pure functions of judge labels.

Notation (MACE, Lu et al. 2024):

* ``Acc_e`` — fraction of images generated for prompts naming an *erased* concept in which the judge
  still recognises it (efficacy; lower is better);
* ``Acc_g`` — the same for prompts using the concept's *synonyms* / paraphrases (generality; lower is
  better);
* ``Acc_s`` — fraction of images of *other* concepts (not erased) recognised as what they should show
  (specificity; higher is better);
* ``H = 3 / (1/(1 − Acc_e) + 1/Acc_s + 1/(1 − Acc_g))`` — their harmonic mean (higher is better); 0 as
  soon as one of the three terms is 0 (the limit of the formula).
* ``ASR`` (attack success rate) — fraction of images generated from *attack* prompts (misspellings,
  soft prompts, ...) in which the judge still sees the erased concept (lower is better).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..errors import ACEValueError
from ..stats import wilson_interval  # noqa: F401  (re-exported: eval.metrics.wilson_interval)


def _fraction(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ACEValueError(f"{name} must be a fraction in [0, 1], got {value!r}.")
    return float(value)


def harmonic(acc_e: float, acc_s: float, acc_g: float) -> float:
    """MACE's H = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g)); 0 when any term is 0.

    Canonical implementation (``ace_diffusers.shapes.erasure.harmonic`` computes the same value).
    """
    terms = (1 - _fraction(acc_e, "acc_e"), _fraction(acc_s, "acc_s"), 1 - _fraction(acc_g, "acc_g"))
    if min(terms) <= 0:
        return 0.0
    return 3 / sum(1 / t for t in terms)


def accuracy(predictions: Sequence[str], labels: Sequence[str] | str) -> float:
    """Fraction of ``predictions`` equal to ``labels`` (one label per prediction, or one for all)."""
    predictions = list(predictions)
    if not predictions:
        raise ACEValueError(
            "accuracy of an empty set of predictions is undefined; generate at least one image."
        )
    if isinstance(labels, str):
        labels = [labels] * len(predictions)
    labels = list(labels)
    if len(labels) != len(predictions):
        raise ACEValueError(f"Got {len(predictions)} predictions but {len(labels)} labels.")
    return sum(p == t for p, t in zip(predictions, labels, strict=True)) / len(predictions)


def recognition_rate(predictions: Sequence[str], concepts: str | Iterable[str]) -> float:
    """Fraction of ``predictions`` that name one of ``concepts`` (the erased concept(s))."""
    targets = {concepts} if isinstance(concepts, str) else set(concepts)
    if not targets:
        raise ACEValueError("recognition_rate needs at least one concept label.")
    predictions = list(predictions)
    if not predictions:
        raise ACEValueError("recognition rate of an empty set of predictions is undefined.")
    return sum(p in targets for p in predictions) / len(predictions)


def attack_success_rate(predictions: Sequence[str], concepts: str | Iterable[str]) -> float:
    """ASR: fraction of attack images in which the judge still sees the erased concept(s)."""
    return recognition_rate(predictions, concepts)


def erasure_metrics(
    erased: Sequence[str],
    synonyms: Sequence[str],
    others: Sequence[str],
    concept: str | Iterable[str],
    other_labels: Sequence[str],
) -> dict[str, float]:
    """``acc_e``, ``acc_g``, ``acc_s`` and ``h`` from judge labels of the three prompt sets.

    ``erased`` / ``synonyms``: predictions for images of the erased concept (canonical name / synonyms);
    ``others``: predictions for images of other concepts, whose true labels are ``other_labels``.
    """
    acc_e = recognition_rate(erased, concept)
    acc_g = recognition_rate(synonyms, concept)
    acc_s = accuracy(others, other_labels)
    return {"acc_e": acc_e, "acc_g": acc_g, "acc_s": acc_s, "h": harmonic(acc_e, acc_s, acc_g)}
