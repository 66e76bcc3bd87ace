"""What a closed-form fit encodes, and how its tokens line up: the jobs, their layout, the token data.

A fit of concept ``c`` with anchor ``n`` fills every template with both (``"a painting by {}"`` →
``"a painting by Van Gogh"`` / ``"a painting by an artist"``), encodes them with a few or all padding
tokens (:func:`full_length_template_indices`), aligns each concept-prompt token with the neutral-prompt
token it should become (:func:`align_tokens`) and adds the tokens of preservation and unrelated prompts,
which the edit must leave alone (:func:`collect_fit_data` → :class:`~.solvers.FitData`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.adapter import ACEAdapter
from ..core.text_space import TextSpaceEdit
from ..errors import ACEValueError
from .embedding_cache import EMBEDDINGS, Job
from .presets import ErasureSpec, fill_phrase, filled, load_presets
from .solvers import FitData
from .text import EncodedPrompt, TextEmbedder

CHANGED_TOKEN_THRESHOLD = 0.02  # relative change that marks a token as carrying the concept


@dataclass
class FitSettings:
    """How a closed-form fit is laid out and regularised (the comments say what each field does)."""

    rank: int | None = None  # None: default_rank(n_concepts, d_text)
    preserve_weight: float = 0.05  # λ_p
    ridge: float = 1e-3  # λ, relative to the mean token energy
    gate_ridge: float = 1e-3
    preserve_templates: int = 2
    full_length_templates: int = 2  # causal encoders: templates per concept encoded with all padding tokens
    full_length_budget: int = 16  # ... while the total stays within this many (spread over the concepts)
    extra_pad_tokens: int = 6  # causal encoders, other prompts: padding tokens kept after each prompt's EOS
    preserve_pad_tokens: int = (
        12  # ... and after each preservation prompt's: far padding must stay unedited too
    )
    context_prompts: int = 4  # per concept: prompts pairing it with a preserved phrase ("X and Y") ...
    context_budget: int = 16  # ... while the total stays within this many (beyond: one per concept)
    neighbours: int = 8  # words mined from the model per concept and erased with it (0: none; .neighbours)
    neighbour_templates: int = 4  # ... each in this many of its concept's templates
    neighbour_weight: float = 0.5  # ... its tokens weighing this much in the edit (the user's weigh 1)
    mining_pool: int = 4096  # ... chosen from this many vocabulary words nearest the concept's
    dictionary: bool = False  # ... and from the English words the tokenizer splits (.vocabulary): slower
    # (256 candidates reach the in-context test, not 64) and mixed on the miniature world (docs/limitations)
    single_stream: bool = True  # FLUX: edit the single-stream blocks' text rows too (False: no edit there,
    # so the adapter can be fused and exported as a LoRA; see docs/guides/models.md)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def template_jobs(phrase: str, templates: list[str], full: set[int], settings: FitSettings) -> list[Job]:
    """``phrase`` in each template; those in ``full`` with all padding tokens, the rest with a few."""
    return [
        (*fill_phrase(t, phrase), None if i in full else settings.extra_pad_tokens)
        for i, t in enumerate(templates)
    ]


@dataclass
class FitJobs:
    """A fit's encoder jobs: the concept prompts, their neutral counterparts (same order), and the
    preservation and unrelated prompts; ``preset`` are the concept prompts of the kind's own terms
    (explicit's), which every fit of the kind has too."""

    concept: list[Job]
    neutral: list[Job]
    other: list[Job]
    preset: list[Job]
    neighbour_jobs: int = 0  # the last this many concept (and neutral) jobs are mined neighbours'

    @property
    def concept_independent(self) -> list[Job]:
        """What :func:`prepare_erasure` encodes ahead and the on-disk cache keeps."""
        return self.neutral + self.other + self.preset


def fit_jobs(spec: ErasureSpec, settings: FitSettings, neighbours: dict[str, str] | None = None) -> FitJobs:
    """The encoder jobs of a fit of ``spec``, with ``neighbours`` (``{mined word: its concept}``) after
    the concepts, each in its concept's first ``neighbour_templates`` templates with few padding tokens.

    The first four generic prompts keep all their padding tokens; which four does not depend on the
    concepts (one that names a concept is left out, not replaced), so :func:`prepare_erasure` knows them.
    """
    concept_jobs, neutral_jobs, preset_jobs = [], [], []
    # the kind's own terms take the slots they would have after one concept of the user's, whatever the
    # user passed, so that their prompts are the same in every fit of the kind
    kind_terms = {
        t: i + 1 for i, t in enumerate(load_presets()["kinds"].get(spec.kind, {}).get("expand", []))
    }
    expanded = set(spec.expanded)
    for c_index, (concept, anchor) in enumerate(zip(spec.concepts, spec.neutral, strict=True)):
        templates = spec.templates_for(concept)
        slot = kind_terms[concept] if concept in expanded else c_index
        full = full_length_template_indices(slot, len(spec.concepts), len(templates), settings)
        jobs = template_jobs(concept, templates, full, settings)
        concept_jobs += jobs
        preset_jobs += jobs if concept in expanded else []
        neutral_jobs += template_jobs(anchor, templates, full, settings)
        if concept not in expanded:
            count = context_count(settings, len(spec.concepts))
            paired = context_templates(spec, concept, count, start=c_index)
            concept_jobs += template_jobs(concept, paired, set(), settings)
            neutral_jobs += template_jobs(anchor, paired, set(), settings)
    anchor_of = dict(zip(spec.concepts, spec.neutral, strict=True))
    neighbour_jobs = 0
    for word, concept in (neighbours or {}).items():
        templates = spec.templates_for(concept)[: settings.neighbour_templates]
        concept_jobs += template_jobs(word, templates, set(), settings)
        neutral_jobs += template_jobs(anchor_of[concept], templates, set(), settings)
        neighbour_jobs += len(templates)
    unrelated = set(spec.unrelated_prompts())
    other_jobs = [
        (p, None, None if i < 4 else settings.extra_pad_tokens)
        for i, p in enumerate(spec.negatives)
        if p in unrelated
    ]
    other_jobs += [
        (p, span, settings.preserve_pad_tokens)
        for p, span in spec.preserve_prompt_spans(settings.preserve_templates)
    ]
    return FitJobs(concept_jobs, neutral_jobs, other_jobs, preset_jobs, neighbour_jobs)


CONTEXT_JOINS = ("{} and {}", "{} with {}")  # how a prompt pairs the concept with something kept


def context_count(settings: FitSettings, n_concepts: int) -> int:
    """Context prompts per concept: ``context_prompts`` while the fit's total stays within
    ``context_budget``, else one, taken in turn from the preserved phrases (:func:`context_templates`).
    Without them a fit of a thousand words and two shapes lost the other shape of "a red circle and a
    blue triangle" in about half the images; ``ace-diffusers bench mass`` measures it."""
    return min(settings.context_prompts, max(1, settings.context_budget // max(1, n_concepts)))


def context_templates(spec: ErasureSpec, concept: str, count: int, start: int = 0) -> list[str]:
    """Templates that pair ``concept`` with a preserved phrase: ``"a red {} and a blue square"``, the
    phrases taken in turn from the ``start``-th (each concept of a fit starts one further on, so that a
    fit of many concepts with one such prompt each still pairs them with every preserved phrase).

    In the concept's prompt every token after it (causal CLIP) or every token (a bidirectional
    encoder) carries some of it, including the tokens of the *other* thing the prompt asks for. Fitted
    onto the same prompt with the anchor, those tokens learn to keep that other thing as it is.
    """
    kept, templates, out = spec.pairing, spec.templates_for(concept), []
    for i in range(min(count, len(kept) * len(CONTEXT_JOINS))):
        phrase = kept[(start + i) % len(kept)]
        if spec.names_concept(phrase):  # left out, not replaced: the other prompts stay the same
            continue
        other = filled(spec.templates_for(phrase)[(i + 1) % len(spec.templates_for(phrase))], phrase)
        out.append(CONTEXT_JOINS[i % len(CONTEXT_JOINS)].format(templates[i % len(templates)], other))
    return out


def collect_fit_data(
    embedder: TextEmbedder, spec: ErasureSpec, settings: FitSettings, neighbours: dict[str, str] | None = None
) -> FitData:
    """Encode concept/neutral/preservation prompts (and the mined ``neighbours``' prompts: :func:`fit_jobs`)
    and align concept tokens with neutral tokens."""
    jobs = fit_jobs(spec, settings, neighbours)
    concept_jobs, neutral_jobs, other_jobs = jobs.concept, jobs.neutral, jobs.other
    # one call (few, large batches); what does not depend on the concepts is also cached on disk
    encoded = EMBEDDINGS.encode(
        embedder, concept_jobs + neutral_jobs + other_jobs, persistent=jobs.concept_independent
    )
    concept_enc = encoded[: len(concept_jobs)]
    neutral_enc = encoded[len(concept_jobs) : len(concept_jobs) + len(neutral_jobs)]
    other_enc = encoded[len(concept_jobs) + len(neutral_jobs) :]

    concept_rows, target_rows, positive, weights = [], [], [], []
    first_neighbour = len(concept_jobs) - jobs.neighbour_jobs
    for index, (c_enc, n_enc) in enumerate(zip(concept_enc, neutral_enc, strict=True)):
        pairs = align_tokens(c_enc, n_enc)
        if not pairs:
            continue
        weights.append(
            torch.full((len(pairs),), settings.neighbour_weight if index >= first_neighbour else 1.0)
        )
        ci = torch.tensor([i for i, _ in pairs])
        nj = torch.tensor([j for _, j in pairs])
        c, n = c_enc.embeddings[ci], n_enc.embeddings[nj]
        change = (c - n).norm(dim=-1) / c.norm(dim=-1).clamp_min(1e-8)
        concept_rows.append(c)
        target_rows.append(n)
        positive.append(change > CHANGED_TOKEN_THRESHOLD)
    if not concept_rows:
        raise ACEValueError(
            "None of the concept prompts kept the concept after tokenisation (all truncated); use shorter "
            "concepts."
        )
    others, moment = other_tokens(embedder, neutral_jobs, neutral_enc, other_jobs, other_enc)
    return FitData(  # the fit's algebra runs on the CPU, with the UNet weights (small d x d problems)
        concept=torch.cat(concept_rows).cpu(),
        target=torch.cat(target_rows).cpu(),
        gate_positive=torch.cat(positive).cpu(),
        others=others,
        others_moment=moment,
        weights=torch.cat(weights) if jobs.neighbour_jobs else None,
    )


def other_tokens(
    embedder: TextEmbedder,
    neutral_jobs: list[Job],
    neutral_enc: list[EncodedPrompt],
    other_jobs: list[Job],
    other_enc: list[EncodedPrompt],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the edit must leave alone (preservation, unrelated and neutral prompts; an anchor shared
    by many concepts counted once) and their second moment (the same for every fit of a kind, so cached:
    :meth:`~.embedding_cache.EmbeddingCache.moment`)."""
    unique_neutral = {id(e): e for e in neutral_enc}.values()
    others = torch.cat([e.embeddings for e in other_enc] + [e.embeddings for e in unique_neutral]).cpu()
    moment = EMBEDDINGS.moment(embedder, (tuple(other_jobs), tuple(dict.fromkeys(neutral_jobs))), others)
    return others, moment


def full_length_template_indices(
    concept_index: int, n_concepts: int, n_templates: int, settings: FitSettings
) -> set[int]:
    """Which of a concept's templates are encoded with all padding tokens (causal encoders).

    A full-length prompt costs ~5x a short one, and far padding tokens mostly carry what the near
    ones do; so each concept gets ``full_length_templates`` of them while the total stays within
    ``full_length_budget``. Beyond that, ``full_length_budget`` concepts spread evenly over the list
    get one each (rotating through the templates) so the gate still sees far padding tokens.
    """
    per_concept = min(settings.full_length_templates, n_templates)
    if n_concepts * per_concept <= settings.full_length_budget:
        return set(range(per_concept))
    if (
        per_concept
        and (concept_index * settings.full_length_budget) % n_concepts < settings.full_length_budget
    ):
        return {concept_index % n_templates}
    return set()


def align_tokens(c_enc: EncodedPrompt, n_enc: EncodedPrompt) -> list[tuple[int, int]]:
    """Pairs (concept-prompt token, neutral-prompt token): same prefix, span stretched, suffix shifted."""
    if c_enc.span is None:
        return []
    s, e = c_enc.span
    if n_enc.span is not None:
        ns, ne = n_enc.span
    else:  # empty anchor: the concept collapses onto the token that follows it in the neutral prompt
        ns = ne = s
    rows_c, rows_n = c_enc.embeddings.shape[0], n_enc.embeddings.shape[0]
    pairs = []
    for i in range(rows_c):
        if i < s:
            j = i
        elif i < e:
            j = ns + ((i - s) * (ne - ns)) // (e - s) if ne > ns else ns
        else:
            j = ne + (i - e)
        if j < rows_n:
            pairs.append((i, j))
    return pairs


def closed_form_adapter(
    pipe: Any,
    spec: ErasureSpec,
    layers: dict,
    fit: dict[str, Any],
    pooled: tuple | None,
    text_space: TextSpaceEdit | None = None,
) -> ACEAdapter:
    """A closed-form fit as an :class:`ACEAdapter`: ``layers``, the ``pooled`` edit with its statistics
    (or None), the ``fit`` record, the pipeline's model id as ``base_model`` when it has one, and the
    edit's text-space form (saved instead of the layers' factors) where all layers share one text map."""
    if pooled is not None:
        fit = {**fit, "pooled": {k: round(v, 6) for k, v in pooled[1].items()}}
    base_model = getattr(getattr(pipe, "config", None), "_name_or_path", None) or None
    return ACEAdapter(
        layers,
        concepts=spec.concepts,
        neutral=spec.neutral,
        kind=spec.kind,
        method="closed-form",
        fit=fit,
        base_model=base_model if isinstance(base_model, str) else None,
        pooled=pooled[0] if pooled is not None else None,
        text_space=text_space,
    )
