"""Model-mined neighbours for the closed form: the words the model reads like the concept.

Given only ``"circle"``, a closed form that maps the tokens of "circle" onto the anchor leaves "disc",
"ring" and "circular" drawing circles: they are other tokens, and the edit ``ΔW`` was asked nothing
about them. Before the solve, :func:`~.mining.mine_synonyms` finds the vocabulary words that the
UNet's cross-attention reads like the concept — from the model alone (the text encoder's vocabulary,
its encodings, the K/V projections and a bank of the UNet's own queries), never from a synonym list.
Each mined word ``w`` of concept ``c`` (anchor ``n``) then joins the fit as one more concept:

    Σ_t ||(W + ΔW) e_t(w) − W e_t(n)||²   over the first ``neighbour_templates`` templates t,

so the edit maps it onto the anchor and the gate learns to open on its tokens; the adapter's concepts
stay the user's (``fit["mined_neighbours"]`` records the words). The neighbours' prompts keep only a
few padding tokens, so a fit with neighbours encodes the user's concepts exactly as one without does.

The query bank (one UNet forward on noised latents with neutral prompts) does not depend on the concept:
it is kept in memory per UNet and made again when any of the UNet's parameters is replaced or changed
in place.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch

from .attention import QueryLayer, capture_queries
from .mining import mine_synonyms, projection_gram
from .presets import ErasureSpec
from .text import TextEmbedder

MAX_MINED_CONCEPTS = 16  # fits of more concepts than this are not mined (the cost grows per concept)
QUERIES_PER_LAYER = 32
QUERY_LATENT_SIZE = 8  # latent side of the query bank's one UNet forward
# candidates per wanted word reaching the in-context test (2: circle's synonyms drawn 36 %, 4: 9 %; with
# 8 and a pool of 4096, cross's "plus" (projected rank 43) is mined: its synonyms drawn 100 % -> 0 %)
SHORTLIST_PER_WORD = 8

_QUERY_BANKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_state(unet: torch.nn.Module) -> tuple:
    """Changes when a parameter is replaced (``data_ptr``) or changed in place (``_version``)."""
    return tuple((p.data_ptr(), p._version) for p in unet.parameters())


def query_bank(
    unet: torch.nn.Module, embedder: TextEmbedder, spec: ErasureSpec, seed: int = 0
) -> tuple[list[QueryLayer], torch.Tensor]:
    """The UNet's cross-attention queries for the miner and the K/V projections' Gram matrix
    (:func:`~.mining.projection_gram`), cached per UNet and weights state."""
    key = (spec.neutral[0], tuple(spec.templates[:3]), QUERIES_PER_LAYER, seed, _weights_state(unet))
    banks = _QUERY_BANKS.setdefault(unet, {})
    if key not in banks:
        banks.clear()  # an older weights state is never asked for again
        layers = capture_queries(
            unet,
            embedder,
            spec.neutral[0],
            spec.templates,
            per_layer=QUERIES_PER_LAYER,
            seed=seed,
            max_size=QUERY_LATENT_SIZE,
        )
        banks[key] = (layers, projection_gram(layers))
    return banks[key]


def clear_query_banks() -> None:
    """Forget every kept query bank (what a new process starts with)."""
    _QUERY_BANKS.clear()


def mine_neighbours(
    unet: torch.nn.Module,
    embedder: TextEmbedder,
    spec: ErasureSpec,
    *,
    per_concept: int,
    pool: int,
    dictionary: bool = False,
) -> dict[str, str]:
    """``{mined word: its concept}`` for a fit of ``spec`` (empty for more than
    :data:`MAX_MINED_CONCEPTS` concepts or ``per_concept=0``)."""
    users = _users(spec)
    if per_concept <= 0 or not users or len(users) > MAX_MINED_CONCEPTS:
        return {}
    layers, gram = query_bank(unet, embedder, spec)
    return mine_synonyms(
        embedder,
        layers,
        dataclasses.replace(spec, concepts=users, neutral=_anchors(spec, users)),
        per_concept=per_concept,
        pool=pool,
        shortlist=None if dictionary else SHORTLIST_PER_WORD * per_concept,
        gram=gram,
        dictionary=dictionary,
    )


def _users(spec: ErasureSpec) -> list[str]:
    """The concepts the user named (not the ones a kind adds to every fit, e.g. explicit's terms)."""
    return [c for c in spec.concepts if c not in set(spec.expanded)]


def _anchors(spec: ErasureSpec, concepts: list[str]) -> list[str]:
    anchor_of = dict(zip(spec.concepts, spec.neutral, strict=True))
    return [anchor_of[c] for c in concepts]


def mining_record(spec: ErasureSpec, neighbours: dict[str, str], per_concept: int) -> dict[str, Any]:
    """What ``fit["mined_neighbours"]`` says: the words per concept, or why nothing was mined."""
    users = _users(spec)
    if neighbours:
        return {c: [w for w, of in neighbours.items() if of == c] for c in users}
    if per_concept <= 0:
        return {"skipped": "neighbours=0"}
    if len(users) > MAX_MINED_CONCEPTS:
        return {"skipped": f"{len(users)} concepts (mining runs for at most {MAX_MINED_CONCEPTS})"}
    return {c: [w for w, of in neighbours.items() if of == c] for c in users}
