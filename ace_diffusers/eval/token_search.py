"""Greedy coordinate gradient (GCG) over real vocabulary words: the search shared by the token attacks.

An attack controls the token positions ``span`` of a prompt and has a differentiable ``objective`` of the
input embeddings there (:class:`SearchObjective`: a loss per batch of its bank, endless batches, the loss
over the whole bank). With one-hot rows ``x_i`` over the vocabulary at the attacked positions, the input
embeddings are ``x_i E``; each step the gradient ``∂L/∂x_i`` ranks, per position, the ``top_k`` swaps
that most decrease a first-order estimate of the loss; ``candidates`` random single-position swaps from
those lists are evaluated exactly and the best is kept if it beats the current tokens. Only whole-word
tokens that survive decode → encode are searched (so the found *text* prompt is what was optimised),
never the concept's own tokens.

Used by :mod:`.discrete_tokens` (the erased denoiser must match the original's) and
:mod:`.concept_vector` (the text encoding must match a shifted embedding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..errors import ACEValueError
from .soft_prompt import soft_tokens

PLACEHOLDER = "x"  # one whole-word token in every tokenizer we meet; stands in for an attacked position


def check_search_settings(settings: Any) -> None:
    """The search counts of a token attack's settings: ``steps`` ≥ 0; ``n_tokens``, ``top_k`` and
    ``candidates`` ≥ 1 (integers, not booleans)."""
    for name in ("n_tokens", "steps", "top_k", "candidates"):
        value = getattr(settings, name)
        minimum = 0 if name == "steps" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ACEValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


class SearchObjective(Protocol):
    def loss(self, batch: torch.Tensor | None) -> torch.Tensor: ...

    def batches(self, generator: torch.Generator) -> Iterator[torch.Tensor | None]: ...

    def full_loss(self) -> float: ...


@dataclass
class SearchResult:
    token_ids: torch.Tensor  # the kept tokens, one per attacked position
    losses: list[float] = field(default_factory=list)  # the kept tokens' batch loss after each step
    initial_loss: float = float("nan")  # whole-bank loss of the random start
    final_loss: float = float("nan")  # whole-bank loss of the kept tokens


_WORD_TOKENS: dict[tuple[int, int], torch.Tensor] = {}


def word_tokens(tokenizer: Any) -> torch.Tensor:
    """``(vocab,)`` bool: alphabetic whole-word tokens (≥ 2 letters) that encode back to themselves
    alone, so a prompt written with them is tokenised as searched. Kept per tokenizer."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _WORD_TOKENS:
        texts = [tokenizer.decode([i]).strip() for i in range(len(tokenizer))]
        candidates = [i for i, t in enumerate(texts) if len(t) >= 2 and t.isascii() and t.isalpha()]
        encoded = tokenizer([texts[i] for i in candidates], add_special_tokens=False)["input_ids"]
        mask = torch.zeros(len(tokenizer), dtype=torch.bool)
        for i, ids in zip(candidates, encoded, strict=True):
            mask[i] = ids == [i]
        _WORD_TOKENS[key] = mask
    return _WORD_TOKENS[key]


class TokenSearch:
    """GCG over the searchable tokens at ``span`` of ``pipe``'s prompt (module docstring)."""

    def __init__(
        self,
        pipe: Any,
        span: tuple[int, int],
        objective: SearchObjective,
        *,
        concept: str,
        top_k: int,
        candidates: int,
        seed: int,
    ) -> None:
        self.pipe, self.span, self.objective = pipe, span, objective
        self.top_k, self.candidates = top_k, candidates
        self.table = pipe.text_encoder.get_input_embeddings().weight.detach()
        tokenizer = pipe.tokenizer
        self.allowed = word_tokens(tokenizer).clone()[: self.table.shape[0]]
        own = {
            i for w in (concept, concept.lower()) for i in tokenizer(w, add_special_tokens=False)["input_ids"]
        }
        self.allowed[list(own)] = False  # never the concept's own tokens
        if not bool(self.allowed.any()):
            raise ACEValueError("The tokenizer has no whole-word tokens to search.")
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed

    @property
    def n_tokens(self) -> int:
        return self.span[1] - self.span[0]

    def start(self) -> torch.Tensor:
        """Random searchable tokens."""
        pool = self.allowed.nonzero().squeeze(1)
        return pool[torch.randint(len(pool), (self.n_tokens,), generator=self.generator)]

    def run(self, steps: int, progress: Callable[[int], None] | None = None) -> SearchResult:
        """``steps`` steps from random tokens; ``progress(step)`` after each."""
        ids = self.start()
        stream = self.objective.batches(torch.Generator().manual_seed(self.seed + 1))
        initial = self.full_loss(ids)
        losses: list[float] = []
        for step in range(steps):
            ids, best = self.step(ids, next(stream))
            losses.append(best)
            if progress is not None:
                progress(step + 1)
        return SearchResult(ids, losses, initial, self.full_loss(ids))

    def full_loss(self, token_ids: torch.Tensor) -> float:
        with torch.no_grad(), soft_tokens(self.pipe, self.span, self.table[token_ids]):
            return self.objective.full_loss()

    def loss_of(self, token_ids: torch.Tensor, rows: torch.Tensor | None) -> float:
        with torch.no_grad(), soft_tokens(self.pipe, self.span, self.table[token_ids]):
            return float(self.objective.loss(rows))

    def step(self, ids: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """One step on the bank rows ``rows``: the kept tokens and their loss."""
        one_hot = F.one_hot(ids, self.table.shape[0]).to(self.table.dtype).requires_grad_(True)
        with soft_tokens(self.pipe, self.span, one_hot @ self.table):
            current = self.objective.loss(rows)
        (grad,) = torch.autograd.grad(current, [one_hot])
        grad = grad.float().masked_fill(~self.allowed.to(grad.device), float("inf"))
        top = (-grad).topk(self.top_k, dim=1).indices.cpu()  # (n_tokens, top_k)
        position = torch.randint(self.n_tokens, (self.candidates,), generator=self.generator)
        choice = top[position, torch.randint(self.top_k, (self.candidates,), generator=self.generator)]
        best_ids, best = ids, float(current.detach())
        for pos, token in zip(position.tolist(), choice.tolist(), strict=True):
            candidate = ids.clone()
            candidate[pos] = token
            value = self.loss_of(candidate, rows)
            if value < best:
                best_ids, best = candidate, value
        return best_ids, best


def decoded_words(tokenizer: Any, token_ids: torch.Tensor) -> list[str]:
    return [tokenizer.decode([int(i)]).strip() for i in token_ids]


def retokenises_as(tokenizer: Any, prompt: str, span: tuple[int, int], token_ids: torch.Tensor) -> bool:
    """Whether ``prompt`` tokenises to exactly ``token_ids`` at ``span`` (what was optimised)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return ids["input_ids"][span[0] : span[1]] == token_ids.tolist()
