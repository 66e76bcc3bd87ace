"""The discrete-token attack (white box, UnlearnDiffAtk-style): a few real vocabulary tokens that bring the
erased concept back, found by greedy coordinate search on the one-hot relaxation.

The attacker controls ``n_tokens`` positions of a prompt: the concept's own place (``placement=
"replace"``: the found prompt never names the concept) or a prefix before the concept prompt
(``"prepend"``, UnlearnDiffAtk's protocol). The objective is the soft-prompt attack's denoiser objective
(:class:`~.soft_prompt.AttackObjective`): on noised latents of images of the concept drawn by the
*original* model, the *erased* model's prediction with the attacker's tokens must match the original
model's prediction with the concept prompt.

The search is greedy coordinate gradient over whole-word tokens (:mod:`.token_search`), never the
concept's own tokens. The result is a plain text prompt: generate from it with ``pipe(prompt)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ACEValueError
from .common import as_context, check_sd_pipeline, concept_char_span, replace_concept
from .soft_prompt import (
    AttackObjective,
    SoftPromptReference,
    SoftPromptSettings,
    build_soft_prompt_reference,
    token_span,
)
from .token_search import (
    PLACEHOLDER,
    TokenSearch,
    check_search_settings,
    decoded_words,
    retokenises_as,
)

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
        check_search_settings(self)
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
    search = TokenSearch(
        pipe, span, AttackObjective(pipe, text, reference, settings.reference), concept=concept,
        top_k=settings.top_k, candidates=settings.candidates, seed=settings.seed,
    )
    found = search.run(settings.steps, progress)
    words = decoded_words(pipe.tokenizer, found.token_ids)
    prompt_found = _found_prompt(text, chars, words)
    return DiscreteTokenResult(
        prompt=prompt_found,
        concept=concept,
        tokens=words,
        token_ids=[int(i) for i in found.token_ids],
        exact=retokenises_as(pipe.tokenizer, prompt_found, span, found.token_ids),
        losses=found.losses,
        initial_loss=found.initial_loss,
        final_loss=found.final_loss,
        seconds=time.perf_counter() - started,
    )
