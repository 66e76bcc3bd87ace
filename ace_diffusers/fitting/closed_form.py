"""The closed-form fitter: prompts -> token embeddings -> gate + low-rank K/V edit -> :class:`ACEAdapter`.

:mod:`.data` collects the tokens (concept, aligned neutral, the ones to leave alone), :mod:`.solvers`
holds the math (its docstring states the objective and its minimiser); this module runs them on a
pipeline and holds the public verbs :func:`erase_concept` and :func:`prepare_erasure`. Everything but the
low-rank step is shared by all layers, so one fit costs a few text-encoder passes plus one small SVD per
K/V projection.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core.adapter import ACEAdapter
from ..core.factors import LayerFactors
from ..core.text_space import TextSpaceEdit
from ..errors import ACETruncationWarning, ACEValueError
from ..integration.modules import (
    cross_attention_modules,
    get_unet,
    is_joint,
    kv_projections,
    projection_weight,
)
from .data import (
    FitSettings,
    Job,
    closed_form_adapter,
    collect_fit_data,
    context_count,
    context_templates,
    fit_jobs,
    other_tokens,
    template_jobs,
)
from .embedding_cache import EMBEDDINGS, cache_root
from .joint import fit_joint_adapter
from .neighbours import mine_neighbours, mining_record
from .pooled import fit_pooled
from .presets import ErasureSpec, resolve_spec
from .solvers import FitData, default_rank, fit_gate, low_rank_edits, solve_text_map
from .text import TextEmbedder
from .vocabulary import prepare_vocabulary


def fit_adapter(
    pipe: Any,
    spec: ErasureSpec,
    settings: FitSettings,
    *,
    progress: bool | None = None,
    neighbours: dict[str, str] | None = None,
) -> ACEAdapter:
    """Run the whole closed-form fit on ``pipe`` (nothing is loaded into the pipeline).

    ``neighbours`` (``{word: its concept}``) are erased with the concepts; ``None`` mines them from the
    model (``settings.neighbours`` per concept, :mod:`.neighbours`).
    """
    started = time.perf_counter()
    unet = get_unet(pipe)
    modules = cross_attention_modules(unet)
    if any(is_joint(m) for m in modules.values()):  # SD3: one fit per block, on its own text stream
        return fit_joint_adapter(pipe, spec, settings, progress=progress)
    d_text = projection_weight(kv_projections(modules[min(modules)])[0]).shape[1]
    rank = settings.rank if settings.rank is not None else default_rank(len(spec.concepts), d_text)
    check_rank(rank, d_text)
    embedder = TextEmbedder(pipe)
    check_fit_size(embedder, spec, settings, d_text)
    with tqdm(total=5, desc="ACE closed form", disable=not progress, leave=False) as bar:
        bar.set_postfix_str("mining neighbours")
        if neighbours is None:
            neighbours = mine_neighbours(
                unet,
                embedder,
                spec,
                per_concept=settings.neighbours,
                pool=settings.mining_pool,
                dictionary=settings.dictionary,
            )
        bar.update()
        bar.set_postfix_str("encoding prompts")
        data = collect_fit_data(embedder, spec, settings, neighbours)
        _check_fit_data(data, spec, d_text)
        bar.update()
        bar.set_postfix_str("gate and text map")
        gate_w, gate_b, h, root, stats = _gate_and_map(data, settings)
        bar.update()
        bar.set_postfix_str("low-rank edits")
        layers, text_space = _layer_factors(modules, h, root, rank, gate_w, gate_b)
        bar.update()
        bar.set_postfix_str("pooled embedding")
        pooled = fit_pooled(pipe, fit_jobs(spec, settings, neighbours), settings, rank)
        bar.update()

    fit = {
        "settings": {**settings.to_dict(), "rank": rank},
        "templates": spec.templates,
        **({"phrase_templates": spec.phrase_templates} if spec.phrase_templates else {}),
        "preserve": spec.preserve,
        "mined_neighbours": mining_record(spec, neighbours, settings.neighbours),
        "stats": stats,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return closed_form_adapter(pipe, spec, layers, fit, pooled, text_space=text_space)


def _layer_factors(
    modules: dict, h: torch.Tensor, root: torch.Tensor, rank: int, gate_w: torch.Tensor, gate_b: torch.Tensor
) -> tuple[dict[str, LayerFactors], TextSpaceEdit]:
    """Every layer's best rank-``rank`` K/V edit of the shared text map, with the shared gate; and the
    same edit in its text-space form (what is saved)."""
    names = sorted(modules)
    weights = [projection_weight(proj).detach().cpu() for n in names for proj in kv_projections(modules[n])]
    shared: list = []
    factors = low_rank_edits(weights, h.float(), root.float(), rank, shared=shared)
    layers = {}
    for i, name in enumerate(names):
        (k_down, k_up), (v_down, v_up) = factors[2 * i], factors[2 * i + 1]
        layers[name] = LayerFactors(k_down, k_up, v_down, v_up, gate_w.clone(), gate_b.clone())
    basis, down_basis, rights = shared[0]
    pairs = {name: (rights[2 * i], rights[2 * i + 1]) for i, name in enumerate(names)}
    return layers, TextSpaceEdit(basis, down_basis, pairs, gate_w.clone(), gate_b.clone())


def _gate_and_map(data: FitData, settings: FitSettings) -> tuple:
    """``(gate weight, gate bias, h, L, stats)``: the gate, then the text map with it fixed."""
    negatives = torch.cat([data.concept[~data.gate_positive], data.others])
    gate_w, gate_b, gate_stats = fit_gate(
        data.concept[data.gate_positive], negatives, ridge=settings.gate_ridge
    )
    h, root, edit_stats = solve_text_map(
        data, gate_w, gate_b, preserve_weight=settings.preserve_weight, ridge=settings.ridge
    )
    return gate_w, gate_b, h, root, {**gate_stats, **edit_stats}


def _check_fit_data(data: FitData, spec: ErasureSpec, d_text: int) -> None:
    if data.concept.shape[1] != d_text:
        raise ACEValueError(
            f"The text encoder produces {data.concept.shape[1]}-d tokens but the UNet cross-attends to "
            f"{d_text}-d tokens; this pipeline's text encoder and UNet do not belong together."
        )
    if not bool(data.gate_positive.any()):
        raise ACEValueError(
            f"The text encoder gives identical embeddings for {spec.concepts} and their neutral anchors "
            f"{spec.neutral}; there is nothing to erase. Check the spelling or choose another anchor."
        )


def estimate_fit_bytes(embedder: TextEmbedder, spec: ErasureSpec, settings: FitSettings, d_text: int) -> int:
    """Upper bound of the token embeddings held during a fit (concept + neutral prompts dominate)."""
    per_concept = context_count(settings, len(spec.concepts)) if spec.pairing else 0
    prompts = 2 * sum(len(spec.templates_for(c)) + per_concept for c in spec.concepts)
    prompts += len(spec.unrelated_prompts()) + settings.preserve_templates * len(spec.preserve)
    return prompts * embedder.max_length * d_text * 4 * 3  # float32 embeddings, aligned copies, float64 solve


def check_fit_size(embedder: TextEmbedder, spec: ErasureSpec, settings: FitSettings, d_text: int) -> None:
    """Warn about truncated concepts; refuse fits that would not fit in memory, before any work."""
    tokenizer = embedder.encoders[0][0]
    for concept in spec.concepts:
        text = embedder.as_read([concept], [None])[0][0]  # as the pipeline's tokenizer receives it
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tokens + 2 > embedder.max_length:
            warnings.warn(
                f"Concept {concept[:60]!r} is {n_tokens} tokens long; the text encoder keeps "
                f"{embedder.max_length - 2}, so it is truncated and only its beginning is erased.",
                ACETruncationWarning,
                stacklevel=3,
            )
    needed = estimate_fit_bytes(embedder, spec, settings, d_text)
    available = available_memory()
    if available is not None and needed > 0.7 * available:
        raise ACEValueError(
            f"Erasing {len(spec.concepts)} concepts at once needs about {needed / 2**30:.1f} GiB for token "
            f"embeddings but about {available / 2**30:.1f} GiB is available; split the concepts into several "
            "adapters (they compose) or pass fewer templates."
        )


def available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_weight(value: Any, name: str, *, limit: float = 1e6) -> float:
    """A loss weight: a real, finite number in [0, limit] (checked before any work is done)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= limit:
        raise ACEValueError(f"{name} must be a number between 0 and {limit:g}, got {value!r}.")
    return float(value)


def check_rank(rank: Any, d_text: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ACEValueError(f"rank must be a positive integer, got {rank!r}.")
    if rank > d_text:
        raise ACEValueError(
            f"rank {rank} exceeds the text width {d_text} of this UNet's cross-attention; use <= {d_text}."
        )


PREPARATION_PLACEHOLDER = "ace-diffusers preparation placeholder"  # stands in for the concepts to come


@dataclass
class Preparation:
    """What :func:`prepare_erasure` cached: for which kind, how many prompts, where, in how long."""

    kind: str
    neutral: list[str]
    prompts: int  # concept-independent prompts now in the cache (neutral, preservation, unrelated)
    cache_dir: str | None  # where they are kept for later processes too (None: memory only)
    seconds: float


def prepare_erasure(
    pipe: Any,
    *,
    kind: str | None = None,
    neutral: str | list[str] | None = None,
    preserve: str | list[str] | None = None,
    templates: list[str] | dict[str, list[str]] | None = None,
    settings: FitSettings | None = None,
) -> Preparation:
    """Pay, now, the part of :func:`erase_concept` that does not depend on the concept.

    Every fit of a kind encodes the same neutral-anchor prompts (in every template), preservation prompts
    and unrelated prompts. The first fit with a new text encoder encodes all of them (on a CPU that is
    more than the rest of a one-concept fit); afterwards they come from memory, or from the on-disk
    cache in a new process. A service that must answer its first request quickly calls this once per
    kind at start-up (or when building its image, so the disk cache ships with it); then each
    ``erase_concept`` with the same ``kind``/``neutral``/``preserve``/``templates`` encodes only the
    concept's own prompts. Nothing is fitted and the pipeline is not changed.

    The arguments mean what they mean for :func:`erase_concept`; ``neutral`` may list several anchors
    (each is prepared for fits that use it alone). What stays for a fit is its concept prompts and, for a
    fit of more concepts (more than eight, or more than one besides ``explicit``'s own terms) or of several
    anchors, the d x d second moment of its other tokens (one matrix product: which templates such a fit
    encodes in full depends on its number of concepts).
    """
    started = time.perf_counter()
    anchors = list(neutral) if isinstance(neutral, (list, tuple)) else [neutral]
    if not anchors:
        raise ACEValueError(
            "neutral=[] names no anchor: pass None for the kind's default, or one or more anchors."
        )
    settings = settings or FitSettings()
    embedder = TextEmbedder(pipe)
    layouts = [_preparation_layout(anchor, kind, preserve, templates, settings) for anchor in anchors]
    jobs = [job for layout in layouts for job in layout.jobs]
    concept_prefixes = [job for layout in layouts for job in layout.concept_prefixes]
    moments = [pair for layout in layouts for pair in layout.moments]
    prepared_anchors = [layout.anchor for layout in layouts]
    jobs = list(dict.fromkeys(jobs))
    encoded = dict(
        zip(
            jobs + concept_prefixes,
            EMBEDDINGS.encode(embedder, jobs + concept_prefixes, persistent=jobs),
            strict=True,
        )
    )
    for neutral_jobs, other_jobs in moments:
        other_tokens(
            embedder,
            neutral_jobs,
            [encoded[j] for j in neutral_jobs],
            other_jobs,
            [encoded[j] for j in other_jobs],
        )
    if settings.neighbours > 0:
        anchors_of = [layout.anchor for layout in layouts]
        _prepare_mining(pipe, embedder, anchors_of, kind, preserve, templates, settings)
    root = cache_root()
    return Preparation(
        kind=layouts[0].kind,
        neutral=list(dict.fromkeys(prepared_anchors)),
        prompts=len(jobs),
        cache_dir=str(root) if root is not None else None,
        seconds=round(time.perf_counter() - started, 3),
    )


def _prepare_mining(
    pipe: Any, embedder: TextEmbedder, anchors: list[str], kind: Any, preserve: Any, templates: Any,
    settings: FitSettings,
) -> None:
    """The vocabulary table (with the dictionary's words if the fits mine them), and one mining run per
    anchor, which keeps its query bank and its anchors' prompts."""
    prepare_vocabulary(embedder, dictionary=settings.dictionary)
    for anchor in anchors:
        spec = resolve_spec(
            PREPARATION_PLACEHOLDER, neutral=anchor, kind=kind, preserve=preserve, templates=templates
        )
        mine_neighbours(
            get_unet(pipe),
            embedder,
            spec,
            per_concept=settings.neighbours,
            pool=settings.mining_pool,
            dictionary=settings.dictionary,
        )


@dataclass
class _Layout:
    """What a fit with one anchor encodes that does not depend on its concepts."""

    anchor: str
    kind: str
    jobs: list[Job]
    moments: list[tuple[list[Job], list[Job]]]  # (neutral jobs, other jobs) whose second moment is kept
    concept_prefixes: list[Job]  # an empty anchor marks no phrase, so its prompts share no prefix


def _preparation_layout(
    anchor: str | None, kind: str | None, preserve: Any, templates: Any, settings: FitSettings
) -> _Layout:
    base = resolve_spec(
        PREPARATION_PLACEHOLDER, neutral=anchor, kind=kind, preserve=preserve, templates=templates
    )
    layout = _Layout(base.neutral[0], base.kind, [], [], [])
    # per-phrase templates: the first concept's also serve the preserved phrases without their own
    for template_list in dict.fromkeys(tuple(t) for t in [base.templates, *base.phrase_templates.values()]):
        spec = dataclasses.replace(base, templates=list(template_list))
        # the layout of a fit of one concept (plus the kind's own terms) and, when mining, its neighbours
        mined = (
            {PREPARATION_PLACEHOLDER + " neighbour": spec.concepts[0]} if settings.neighbours > 0 else None
        )
        fit = fit_jobs(spec, settings, mined)
        # more concepts take other templates at full length (full_length_template_indices)
        every_layout = [
            job
            for full in (set(range(len(template_list))), set())
            for job in template_jobs(spec.neutral[0], list(template_list), full, settings)
        ]
        # ... and the anchor's paired prompts that each concept's turn through the kept phrases gives
        every_layout += [
            job
            for start in range(1, len(spec.pairing))
            for job in template_jobs(
                spec.neutral[0],
                context_templates(spec, spec.concepts[0], settings.context_prompts, start),
                set(),
                settings,
            )
        ]
        layout.jobs += fit.concept_independent + every_layout
        layout.moments.append((fit.neutral, fit.other))
        if not spec.neutral[0]:
            layout.concept_prefixes += fit.concept
    return layout
