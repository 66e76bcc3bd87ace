"""Concept-vector adversaries for fine-tuning: the defence against the concept-vector attack
(:mod:`ace_diffusers.eval.concept_vector`, Ring-A-Bell-style).

The attack needs no access to the erased model: it takes the concept's direction in what the UNet reads,

    c = mean_i [ E(t_i(concept)) − E(t_i(anchor)) ]          (tokens x d)

(``E``: a prompt encoded with every padding token, ``t_i`` the concept's templates), and adds ``η c`` to the
encoding of an innocuous prompt. The defence pairs each innocuous prompt ``p`` — the anchor in the
concept's templates, and a few unrelated prompts — with ``E(p) + η c`` as a prompt to erase, aligned with
``p``'s own unedited attention output: whatever the direction adds must not reach the image. The gate is
trained with the factors, so it learns to open on the shifted tokens too.
"""

from __future__ import annotations

import torch

from .attention import encode_full
from .presets import ErasureSpec, filled, normalize_prompt
from .text import TextEmbedder

STRENGTHS = (1.5, 3.0)  # η of the pairs; the attack (after Ring-A-Bell) uses about 3


def concept_vector_pairs(
    embedder: TextEmbedder, spec: ErasureSpec, per_concept: int
) -> list[tuple[torch.Tensor, str]]:
    """``[(source (1, T, d), target prompt)]``: for each concept, ``per_concept`` innocuous prompts of
    each kind (anchor-filled templates, unrelated prompts), each at every strength of :data:`STRENGTHS`."""
    pairs: list[tuple[torch.Tensor, str]] = []
    if per_concept <= 0:
        return pairs
    unrelated = spec.unrelated_prompts()[:per_concept]
    for concept, anchor in zip(spec.concepts, spec.neutral, strict=True):
        templates = spec.templates_for(concept)
        anchored = [normalize_prompt(filled(t, anchor)) for t in templates]
        innocuous = list(dict.fromkeys(anchored[:per_concept] + unrelated))
        named = [filled(t, concept) for t in templates]
        encoded = encode_full(embedder, named + anchored + innocuous)  # one width for all of them
        direction = (encoded[: len(named)] - encoded[len(named) : 2 * len(named)]).mean(0)
        for row, prompt in zip(encoded[2 * len(named) :], innocuous, strict=True):
            pairs += [((row + strength * direction).unsqueeze(0), prompt) for strength in STRENGTHS]
    return pairs
