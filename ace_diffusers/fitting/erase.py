"""The one-call verb: :func:`erase_concept` fits an adapter (closed form, or closed form + fine-tuning)
and loads it into the pipeline."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..core.adapter import ACEAdapter
from ..errors import ACEAdapterNameError, ACEValueError
from ..integration.attach import check_scale, default_adapter_name, loaded_adapters, validate_adapter_name
from ..integration.carriers import attach_everywhere
from ..integration.modules import get_unet
from .closed_form import check_weight, fit_adapter
from .data import FitSettings
from .presets import resolve_spec
from .trainer import ACETrainer

METHODS = ("closed-form", "ace")
DEFAULT_PRESERVE_WEIGHT = 0.05


def erase_concept(
    pipe: Any,
    concepts: str | list[str],
    *,
    neutral: str | list[str] | None = None,
    kind: str | None = None,
    preserve: str | list[str] | None = None,
    rank: int | None = None,
    adapter_name: str | None = None,
    templates: list[str] | dict[str, list[str]] | None = None,
    scale: float = 1.0,
    preserve_weight: float = DEFAULT_PRESERVE_WEIGHT,
    method: str = "closed-form",
    fine_tuning: dict[str, Any] | None = None,
    load: bool = True,
    progress: bool | None = None,
    settings: FitSettings | None = None,
) -> ACEAdapter:
    """Erase ``concepts`` from ``pipe``: fit an :class:`ACEAdapter`, load it, return it.

    ``method="closed-form"`` (the default, seconds): the concept's prompts and, per concept, up to
    ``settings.neighbours`` (8) words the model itself reads like it — mined from the vocabulary and
    the UNet, never from a synonym list (``adapter.fit["mined_neighbours"]``) — are mapped onto the
    neutral anchor. It does not cover multi-word paraphrases, words it did not mine, misspellings or
    adversarial prompts and embeddings. ``method="ace"`` adds the adversarially augmented fine-tuning
    of :class:`~ace_diffusers.fitting.trainer.ACETrainer` (tens of seconds on the miniature world,
    minutes at real model size on a CPU), which covers those far better.

    Args:
        concepts: one phrase or a list (hundreds fit in one adapter).
        neutral: what the concept should turn into; default from ``kind`` (e.g. ``"art"`` for styles).
        kind: ``"object"``, ``"style"``, ``"celebrity"``, ``"explicit"`` or ``None`` (custom) — picks
            templates, anchor and preservation set (``ace_diffusers/data/presets.json``).
        preserve: concepts that must stay intact; default from ``kind``.
        rank: rank of the K/V edit per layer; default ``min(24 + 8 * len(concepts), 256, d_text)``.
        adapter_name: name in the pipeline; default derived from the first concept.
        templates: prompt templates with ``{}`` for the concept (one list, or one list per concept);
            default the kind's templates.
        scale: strength the adapter is loaded at (1.0 = as fitted, 0 = off).
        preserve_weight: closed form: how strongly the preservation prompts are held in place against
            the erasure (0 to 1e6; default 0.05).
        method: ``"closed-form"`` or ``"ace"`` (closed form + fine-tuning).
        fine_tuning: with ``method="ace"``, keyword arguments for ``ACETrainer`` (``steps``,
            ``time_budget``, ``synonyms``, ``seed``, ...).
        load: set False to only fit (the pipeline is not changed).
        progress: show a progress bar (default: for fine-tuning, and for 20 or more concepts).
        settings: closed form: advanced fitter settings (:class:`FitSettings`); ``rank`` and
            ``preserve_weight`` win.
    """
    spec = resolve_spec(concepts, neutral=neutral, kind=kind, preserve=preserve, templates=templates)
    scale = check_scale(scale)
    check_weight(preserve_weight, "preserve_weight")
    _check_method(method, fine_tuning, settings, preserve_weight)
    unet = get_unet(pipe)
    if adapter_name is not None:
        validate_adapter_name(adapter_name)
        if adapter_name in loaded_adapters(unet):
            raise ACEAdapterNameError(
                f"An ACE adapter named '{adapter_name}' is already loaded; choose another adapter_name."
            )
    if method == "ace":
        options = {"progress": True if progress is None else progress, **(fine_tuning or {})}
        arguments = {"neutral": neutral, "kind": kind, "preserve": preserve, "templates": templates}
        adapter = ACETrainer(pipe, concepts, rank=rank, **arguments, **options).fit()
    else:
        settings = dataclasses.replace(settings or FitSettings(), preserve_weight=preserve_weight)
        if rank is not None:
            settings.rank = rank
        # The fit reads text embeddings and the base to_k/to_v weights (the neighbour miner's query bank
        # runs the UNet as it is), so adapters already loaded (ACE or PEFT LoRA) barely influence it.
        show = len(spec.concepts) >= 20 if progress is None else progress
        adapter = fit_adapter(pipe, spec, settings, progress=show)
    if load:
        name = adapter_name or default_adapter_name(unet, adapter)
        attach_everywhere(pipe, adapter, name, scale=scale)
    return adapter


def _check_method(method: Any, fine_tuning: Any, settings: Any, preserve_weight: float) -> None:
    """Refuse, before any work, a method that does not exist or options it does not read."""
    if method not in METHODS:
        raise ACEValueError(f"method must be one of {list(METHODS)}, got {method!r}.")
    if method == "ace":
        if settings is not None or preserve_weight != DEFAULT_PRESERVE_WEIGHT:
            raise ACEValueError(
                "settings and preserve_weight configure the closed form only; with method='ace' pass the "
                "trainer's options as fine_tuning={...} (e.g. {'preserve_weight': 2.0, 'steps': 300})."
            )
        if fine_tuning is not None and not isinstance(fine_tuning, dict):
            raise ACEValueError(f"fine_tuning must be a dict of ACETrainer options, got {fine_tuning!r}.")
    elif fine_tuning is not None:
        raise ACEValueError("fine_tuning applies to method='ace' only; add method='ace' or drop it.")
