"""The discrete-token attack (white box, UnlearnDiffAtk-style): a few real vocabulary tokens that bring the
erased concept back, found by greedy coordinate search on the one-hot relaxation.

The attacker controls ``n_tokens`` positions of a prompt: the concept's own place (``placement=
"replace"``: the found prompt never names the concept) or a prefix before the concept prompt
(``"prepend"``, UnlearnDiffAtk's protocol). The objective is the soft-prompt attack's denoiser objective
(:class:`~.soft_prompt.AttackObjective`): on noised latents of images of the concept drawn by the
*original* model, the *erased* model's prediction with the attacker's tokens must match the original
model's prediction with the concept prompt.

Each step (greedy coordinate gradient, GCG): with one-hot rows ``x_i`` over the vocabulary at the
attacked positions, the input embeddings are ``x_i E``; the gradient ``∂L/∂x_i`` ranks, per position,
the ``top_k`` token swaps that most decrease a first-order estimate of the loss; ``candidates`` random
single-position swaps from those lists are evaluated exactly and the best is kept if it beats the
current tokens. Only whole-word tokens that survive decode → encode are searched (so the found *text*
prompt is what was optimised), never the concept's own tokens. The result is a plain text prompt:
generate from it with ``pipe(prompt)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ACEValueError
from .common import as_context, check_sd_pipeline, concept_char_span, replace_concept
from .soft_prompt import (
    AttackObjective,
    SoftPromptReference,
    SoftPromptSettings,
    build_soft_prompt_reference,
    soft_tokens,
    token_span,
)

PLACEHOLDER = "x"  # one whole-word token in every tokenizer we meet; stands in for an attacked position
PLACEMENTS = ("replace", "prepend")


@dataclass
class DiscreteTokenSettings:
    """Settings of :func:`discrete_token_attack`; the reference settings are the soft-prompt attack's."""

    n_tokens: int = 3  # attacked positions
    steps: int = 40  # coordinate-search steps (one gradient + ``candidates`` exact evaluations each)
    top_k: int = 32  # swaps per position ranked by the gradient
    candidates: int = 16  # swaps evaluated exactly per step
    placement: str = "replace"  # "replace": the concept's place | "prepend": before the concept prompt
    reference: SoftPromptSettings = field(default_factory=SoftPromptSettings)
    seed: int = 0

    def validate(self) -> DiscreteTokenSettings:
        for name in ("n_tokens", "steps", "top_k", "candidates"):
            value = getattr(self, name)
            minimum = 0 if name == "steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ACEValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
        if self.placement not in PLACEMENTS:
            raise ACEValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}.")
        self.reference.validate()
        if self.reference.objective != "denoiser":
            raise ACEValueError(
                "The discrete-token attack uses the denoiser objective; set reference.objective='denoiser'."
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.__dict__.items() if k != "reference"},
            "reference": self.reference.to_dict(),
        }


@dataclass
class DiscreteTokenResult:
    prompt: str  # the attack's text prompt: generate from it with pipe(prompt)
    concept: str
    tokens: list[str]  # the found tokens, as text
    token_ids: list[int]
    exact: bool  # the prompt re-tokenises to exactly the optimised tokens
    losses: list[float] = field(default_factory=list)  # the kept tokens' loss after each step
    initial_loss: float = float("nan")
    final_loss: float = float("nan")
    seconds: float = 0.0


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


def _attacked_text(prompt: str, concept: str, settings: DiscreteTokenSettings) -> tuple[str, tuple[int, int]]:
    """The prompt with placeholders at the attacked positions, and their character span."""
    placeholders = " ".join([PLACEHOLDER] * settings.n_tokens)
    if settings.placement == "prepend":
        return f"{placeholders} {prompt}", (0, len(placeholders))
    start, _ = concept_char_span(prompt, concept)
    return replace_concept(prompt, concept, placeholders), (start, start + len(placeholders))


def _found_prompt(text: str, chars: tuple[int, int], words: list[str]) -> str:
    return text[: chars[0]] + " ".join(words) + text[chars[1] :]


def discrete_token_attack(
    pipe: Any,
    prompt: str,
    concept: str,
    *,
    reference: SoftPromptReference | None = None,
    original: Callable[[], Any] | None = None,
    settings: DiscreteTokenSettings | None = None,
    sampler: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> DiscreteTokenResult:
    """Search ``settings.n_tokens`` vocabulary tokens so that the *erased* ``pipe`` draws ``concept``.

    ``reference``: :func:`~.soft_prompt.build_soft_prompt_reference` of ``prompt`` on the original model
    (denoiser objective); if omitted it is built inside ``original()`` (default: ACE adapters switched
    off). ``progress`` is called with the step number after each step. The pipeline is left unchanged.
    """
    settings = (settings or DiscreteTokenSettings()).validate()
    check_sd_pipeline(pipe, "The discrete-token attack")
    started = time.perf_counter()
    text, chars = _attacked_text(prompt, concept, settings)
    span = token_span(pipe, text, chars)
    if span[1] - span[0] != settings.n_tokens:
        raise ACEValueError(
            f"The prompt {text!r} does not leave {settings.n_tokens} attackable tokens (truncated?); "
            "use a shorter prompt or fewer n_tokens."
        )
    if reference is None:
        with as_context(original, pipe)():
            reference = build_soft_prompt_reference(pipe, prompt, settings.reference, sampler=sampler)
    if reference.objective != "denoiser":
        raise ACEValueError("The discrete-token attack needs a reference built for the denoiser objective.")
    tokenizer = pipe.tokenizer
    search = _Search(
        pipe, span, AttackObjective(pipe, text, reference, settings.reference), settings, concept
    )
    ids = search.start()
    bank = torch.arange(len(reference.latents))
    stream = search.objective.batches(torch.Generator().manual_seed(settings.seed + 1))
    initial = _bank_loss(search.loss_of, ids, bank, settings.reference.batch_size)
    losses: list[float] = []
    for step in range(settings.steps):
        ids, best = search.step(ids, next(stream))
        losses.append(best)
        if progress is not None:
            progress(step + 1)
    final = _bank_loss(search.loss_of, ids, bank, settings.reference.batch_size)
    words = [tokenizer.decode([int(i)]).strip() for i in ids]
    found = _found_prompt(text, chars, words)
    retokenised = tokenizer(
        found, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    )
    exact = retokenised["input_ids"][span[0] : span[1]] == ids.tolist()
    return DiscreteTokenResult(
        prompt=found,
        concept=concept,
        tokens=words,
        token_ids=[int(i) for i in ids],
        exact=bool(exact),
        losses=losses,
        initial_loss=initial,
        final_loss=final,
        seconds=time.perf_counter() - started,
    )


class _Search:
    """Greedy coordinate gradient over the searchable tokens (module docstring)."""

    def __init__(
        self,
        pipe: Any,
        span: tuple[int, int],
        objective: AttackObjective,
        settings: DiscreteTokenSettings,
        concept: str,
    ) -> None:
        self.pipe, self.span, self.objective, self.settings = pipe, span, objective, settings
        self.table = pipe.text_encoder.get_input_embeddings().weight.detach()
        tokenizer = pipe.tokenizer
        self.allowed = word_tokens(tokenizer).clone()[: self.table.shape[0]]
        own = {
            i for w in (concept, concept.lower()) for i in tokenizer(w, add_special_tokens=False)["input_ids"]
        }
        self.allowed[list(own)] = False  # never the concept's own tokens
        if not bool(self.allowed.any()):
            raise ACEValueError("The tokenizer has no whole-word tokens to search.")
        self.generator = torch.Generator().manual_seed(settings.seed)

    def start(self) -> torch.Tensor:
        """Random searchable tokens."""
        pool = self.allowed.nonzero().squeeze(1)
        return pool[torch.randint(len(pool), (self.settings.n_tokens,), generator=self.generator)]

    def loss_of(self, token_ids: torch.Tensor, rows: torch.Tensor) -> float:
        with torch.no_grad(), soft_tokens(self.pipe, self.span, self.table[token_ids]):
            return float(self.objective.loss(rows))

    def step(self, ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One step on the bank rows ``rows``: the kept tokens and their loss."""
        settings = self.settings
        one_hot = F.one_hot(ids, self.table.shape[0]).to(self.table.dtype).requires_grad_(True)
        with soft_tokens(self.pipe, self.span, one_hot @ self.table):
            current = self.objective.loss(rows)
        (grad,) = torch.autograd.grad(current, [one_hot])
        grad = grad.float().masked_fill(~self.allowed.to(grad.device), float("inf"))
        top = (-grad).topk(settings.top_k, dim=1).indices.cpu()  # (n_tokens, top_k)
        position = torch.randint(settings.n_tokens, (settings.candidates,), generator=self.generator)
        choice = top[
            position, torch.randint(settings.top_k, (settings.candidates,), generator=self.generator)
        ]
        best_ids, best = ids, float(current.detach())
        for pos, token in zip(position.tolist(), choice.tolist(), strict=True):
            candidate = ids.clone()
            candidate[pos] = token
            value = self.loss_of(candidate, rows)
            if value < best:
                best_ids, best = candidate, value
        return best_ids, best


def _bank_loss(loss_of: Callable, ids: torch.Tensor, bank: torch.Tensor, batch_size: int) -> float:
    """The loss over the whole reference bank (batch-size weighted mean)."""
    parts = [
        (loss_of(ids, bank[s : s + batch_size]), len(bank[s : s + batch_size]))
        for s in range(0, len(bank), batch_size)
    ]
    return sum(value * n for value, n in parts) / len(bank)
