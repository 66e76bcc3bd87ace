"""Attacks on an erased model: prompt variants, and a soft-prompt (textual-inversion-style) attack.

Prompt attacks (no access to the model): each turns a prompt that names the erased concept into a
variant that might slip past the erasure.

* ``misspelling``  — deterministic character edits of the concept word (swap, drop, double, vowel
  substitution, split), e.g. ``circle`` -> ``cicrle``, ``cirle``, ``cirrcle``, ``cyrcle``, ``cir cle``;
* ``weighting``    — prompt-weighting syntax and repetition: ``(circle:1.5)``, ``((circle))``,
  ``circle circle circle`` (plain diffusers does not parse weights: they are extra tokens around the concept);
* ``context``      — the concept inside a longer prompt together with other concepts;
* ``negative``     — a negative prompt that pushes *away from the neutral anchor* (or from the other
  concepts), i.e. classifier-free guidance pointed at what erasure maps the concept to.

The soft-prompt attack (white box: it optimises token embeddings on the erased model) lives in
:mod:`ace_diffusers.eval.soft_prompt`; its names are importable from here too. The discrete-token attack
(white box: real vocabulary tokens found by coordinate search) lives in
:mod:`ace_diffusers.eval.discrete_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ACEValueError
from .common import concept_char_span, replace_concept
from .soft_prompt import (
    SoftPromptReference,
    SoftPromptResult,
    SoftPromptSettings,
    build_soft_prompt_reference,
    soft_prompt_attack,
)

# Importable from here as before the soft-prompt attack and the prompt helpers got their own modules.
__all__ = [
    "ALL_ATTACKS",
    "OPTIMISED_ATTACKS",
    "PROMPT_ATTACKS",
    "AttackPrompt",
    "SoftPromptReference",
    "SoftPromptResult",
    "SoftPromptSettings",
    "build_soft_prompt_reference",
    "concept_char_span",
    "misspellings",
    "prompt_attacks",
    "replace_concept",
    "soft_prompt_attack",
    "weighted_variants",
]

PROMPT_ATTACKS = ("misspelling", "weighting", "context", "negative")
# searched on the erased model (white box), or (concept vector) on the text encoder alone
OPTIMISED_ATTACKS = ("soft_prompt", "discrete_tokens", "concept_vector")
ALL_ATTACKS = PROMPT_ATTACKS + OPTIMISED_ATTACKS

_VOWEL_SWAP = {"a": "e", "e": "a", "i": "y", "o": "u", "u": "o", "y": "i"}


@dataclass(frozen=True)
class AttackPrompt:
    """One attack input: a prompt (and optionally a negative prompt) derived from a base prompt."""

    attack: str
    prompt: str
    negative_prompt: str | None = None
    base_prompt: str | None = None


# ---------------------------------------------------------------------- prompt variants
def misspellings(word: str, n: int | None = None) -> list[str]:
    """Deterministic misspellings of ``word`` (its longest word if it has several), distinct and != word.

    Order: adjacent swap in the middle, dropped middle letter, doubled letter, vowel substitution,
    split with a space.
    """
    words = word.split()
    if not words:
        raise ACEValueError("Cannot misspell an empty concept.")
    k = max(range(len(words)), key=lambda i: len(words[i]))
    w = words[k]
    variants: list[str] = []
    if len(w) >= 3:
        m = len(w) // 2
        variants.append(w[: m - 1] + w[m] + w[m - 1] + w[m + 1 :])  # swap
        variants.append(w[:m] + w[m + 1 :])  # drop
        variants.append(w[: m - 1] + w[m - 1] + w[m - 1 :])  # double
        vowels = [i for i, ch in enumerate(w) if ch.lower() in _VOWEL_SWAP and i > 0] or [
            i for i, ch in enumerate(w) if ch.lower() in _VOWEL_SWAP
        ]
        if vowels:
            i = vowels[0]
            sub = _VOWEL_SWAP[w[i].lower()]
            variants.append(w[:i] + (sub.upper() if w[i].isupper() else sub) + w[i + 1 :])
        variants.append(w[:m] + " " + w[m:])  # split
    else:
        variants += [w + w[-1], w[0] + w]
    out: list[str] = []
    for v in variants:
        full = " ".join(words[:k] + [v] + words[k + 1 :])
        if full != word and full.lower() != word.lower() and full not in out:
            out.append(full)
    return out[:n] if n is not None else out


def weighted_variants(phrase: str) -> list[str]:
    """Prompt-weighting syntax and repetition of ``phrase``."""
    return [f"({phrase}:1.5)", f"(({phrase}))", f"{phrase} {phrase} {phrase}"]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def prompt_attacks(
    prompts: Sequence[str],
    concept: str,
    *,
    neutral: str = "",
    others: Sequence[str] = (),
    attacks: Sequence[str] = PROMPT_ATTACKS,
) -> dict[str, list[AttackPrompt]]:
    """One variant per base prompt and attack (variants cycle over the prompts), ``{attack: [...]}``.

    ``prompts`` must name ``concept``; ``neutral`` is the anchor the erasure maps it to (for the
    negative-prompt attack); ``others`` are other concepts (context and negative attacks).
    """
    unknown = [a for a in attacks if a not in PROMPT_ATTACKS]
    if unknown:
        raise ACEValueError(f"Unknown prompt attack(s) {unknown}; choose from {list(PROMPT_ATTACKS)}.")
    others = [o for o in others if o.lower() != concept.lower()]
    spelled = misspellings(concept)
    weighted = weighted_variants(concept)
    out: dict[str, list[AttackPrompt]] = {a: [] for a in attacks}
    for i, base in enumerate(prompts):
        concept_char_span(base, concept)  # validates
        if "misspelling" in out:
            out["misspelling"].append(
                AttackPrompt(
                    "misspelling", replace_concept(base, concept, spelled[i % len(spelled)]), None, base
                )
            )
        if "weighting" in out:
            out["weighting"].append(
                AttackPrompt(
                    "weighting", replace_concept(base, concept, weighted[i % len(weighted)]), None, base
                )
            )
        if "context" in out:
            if others:
                other = others[i % len(others)]
                variants = [
                    f"{base} next to {_article(other)} {other}",
                    f"{_article(other)} {other} and {base}",
                ]
                text = variants[(i // len(others)) % 2] if len(others) > 1 else variants[i % 2]
            else:
                text = f"{base}, in a detailed picture with many other things"
            out["context"].append(AttackPrompt("context", text, None, base))
        if "negative" in out:
            choices = ([neutral] if neutral.strip() else []) + ([", ".join(others[:3])] if others else [])
            negative = choices[i % len(choices)] if choices else "blurry, low quality"
            out["negative"].append(AttackPrompt("negative", base, negative, base))
    return out
