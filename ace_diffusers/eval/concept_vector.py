"""The concept-vector attack (Ring-A-Bell-style): the concept's direction in what the UNet reads, added
to an innocuous prompt, then written back as words.

The concept's direction in the text encoder's *output* space is the mean difference between prompts
with it and the same prompts without it (the concept replaced by the neutral anchor), token position by
token position::

    c = mean_i [ φ(p_i) − φ(p_i with the concept replaced) ]          (tokens x d)

It needs only the text encoder, which an erasure of the UNet's cross-attention leaves unchanged: the
attacker never looks inside the erased model. Two results:

* **embedding level** — ``φ(innocuous) + η c``, where *innocuous* is the attacked prompt with the concept
  replaced: generate with ``pipe(prompt_embeds=...)``;
* **token level** — that embedding written back as words: greedy coordinate gradient
  (:mod:`.token_search`) over ``n_tokens`` whole-word tokens in the concept's place minimises
  ``1 − cos(φ(prompt with the tokens), φ(innocuous) + η c)`` (the encodings flattened), never with the
  concept's own tokens; generate from the found text prompt.

Ring-A-Bell searches with a genetic algorithm and a strength ``η`` of about 3; the search here is GCG,
like the discrete-token attack's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ACEValueError
from .common import check_sd_pipeline, concept_char_span, replace_concept
from .soft_prompt import encode_text, token_span
from .token_search import (
    PLACEHOLDER,
    TokenSearch,
    check_search_settings,
    decoded_words,
    retokenises_as,
)


@dataclass
class ConceptVectorSettings:
    """Settings of :func:`concept_vector_attack`."""

    strength: float = 3.0  # η: how far along the concept's direction the innocuous prompt is pushed
    n_tokens: int = 3  # token level: words searched in the concept's place
    steps: int = 60  # token level: coordinate-search steps (text encoder only: cheap)
    top_k: int = 32
    candidates: int = 16
    seed: int = 0

    def validate(self) -> ConceptVectorSettings:
        check_search_settings(self)
        value = self.strength
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ACEValueError(f"strength must be a finite number (Ring-A-Bell: about 3), got {value!r}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ConceptVectorResult:
    prompt: str  # the attacked prompt (it names the concept)
    concept: str
    innocuous: str  # the prompt with the concept replaced by the neutral anchor
    prompt_embeds: torch.Tensor  # embedding level: φ(innocuous) + η c, for pipe(prompt_embeds=...)
    token_prompt: str  # token level: a text prompt, for pipe(token_prompt)
    tokens: list[str]
    token_ids: list[int]
    exact: bool  # the token prompt re-tokenises to exactly the optimised tokens
    vector_norm: float  # ‖c‖ / ‖φ(innocuous)‖ (Frobenius): how large the concept's direction is
    losses: list[float] = field(default_factory=list)
    initial_loss: float = float("nan")
    final_loss: float = float("nan")
    seconds: float = 0.0


@torch.no_grad()
def concept_vector(pipe: Any, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """``c`` (1, tokens, d): the mean of ``φ(with) − φ(without)`` over the ``(with, without)`` pairs."""
    if not pairs:
        raise ACEValueError("The concept vector needs at least one (with, without) prompt pair.")
    return torch.stack([encode_text(pipe, a) - encode_text(pipe, b) for a, b in pairs]).float().mean(0)


class EmbeddingObjective:
    """``1 − cos`` between the prompt's encoding (with the searched tokens in place) and ``target``."""

    def __init__(self, pipe: Any, text: str, target: torch.Tensor) -> None:
        self.pipe, self.text, self.target = pipe, text, target.flatten().float()

    def loss(self, batch: torch.Tensor | None) -> torch.Tensor:
        encoded = encode_text(self.pipe, self.text).flatten().float()
        return 1 - F.cosine_similarity(encoded, self.target.to(encoded.device), dim=0)

    def batches(self, generator: torch.Generator) -> Iterator[None]:
        while True:  # no bank: every step sees the whole objective
            yield None

    def full_loss(self) -> float:
        return float(self.loss(None))


def concept_vector_attack(
    pipe: Any,
    prompt: str,
    concept: str,
    *,
    neutral: str = "",
    pair_prompts: Sequence[str] | None = None,
    settings: ConceptVectorSettings | None = None,
    progress: Callable[[int], None] | None = None,
) -> ConceptVectorResult:
    """The concept-vector attack on ``prompt`` (module docstring).

    ``pair_prompts``: prompts naming ``concept`` that give the direction, each paired with itself with
    the concept replaced by ``neutral`` (default: ``[prompt]``). ``progress`` is called with the step
    number after each token-search step. The pipeline is left unchanged.
    """
    settings = (settings or ConceptVectorSettings()).validate()
    check_sd_pipeline(pipe, "The concept-vector attack")
    started = time.perf_counter()
    pair_prompts = list(pair_prompts or [prompt])
    pairs = [(p, replace_concept(p, concept, neutral)) for p in pair_prompts]
    innocuous = replace_concept(prompt, concept, neutral)
    placeholders = " ".join([PLACEHOLDER] * settings.n_tokens)
    start, _ = concept_char_span(prompt, concept)
    text = replace_concept(prompt, concept, placeholders)
    span = token_span(pipe, text, (start, start + len(placeholders)))
    if span[1] - span[0] != settings.n_tokens:
        raise ACEValueError(
            f"The prompt {text!r} does not leave {settings.n_tokens} attackable tokens (truncated?); "
            "use a shorter prompt or fewer n_tokens."
        )
    vector = concept_vector(pipe, pairs)
    with torch.no_grad():
        base = encode_text(pipe, innocuous).float()
    target = base + settings.strength * vector
    search = TokenSearch(
        pipe, span, EmbeddingObjective(pipe, text, target), concept=concept,
        top_k=settings.top_k, candidates=settings.candidates, seed=settings.seed,
    )
    found = search.run(settings.steps, progress)  # progress(step) after each step
    words = decoded_words(pipe.tokenizer, found.token_ids)
    token_prompt = text[:start] + " ".join(words) + text[start + len(placeholders) :]
    return ConceptVectorResult(
        prompt=prompt,
        concept=concept,
        innocuous=innocuous,
        prompt_embeds=target.to(pipe.text_encoder.dtype).detach(),
        token_prompt=token_prompt,
        tokens=words,
        token_ids=[int(i) for i in found.token_ids],
        exact=retokenises_as(pipe.tokenizer, token_prompt, span, found.token_ids),
        vector_norm=float(vector.norm() / base.norm().clamp_min(1e-12)),
        losses=found.losses,
        initial_loss=found.initial_loss,
        final_loss=found.final_loss,
        seconds=time.perf_counter() - started,
    )
