"""The closed form on the pooled text embedding (SDXL's ``text_embeds``), and how far it moves prompts.

The pooled vector of a prompt enters SDXL's UNet through ``add_embedding`` (time conditioning), where
the K/V edit cannot reach it. The edit :class:`~ace_diffusers.core.factors.PooledFactors`
``p' = p + g(p)·(p A_pᵀ) B_pᵀ`` is found by the K/V closed form's own algebra (:mod:`.solvers`) with
``W = I``: for pooled vectors ``c_i`` of the fit's concept prompts (its templates, paired prompts and mined
neighbours, as the K/V fit uses them), ``n_i`` of the same prompts with the anchor, and ``p_j`` of the
preservation, unrelated and anchor prompts,

    min_Δ 1/N Σ w_i ||g_i Δ c_i − (n_i − c_i)||² + λ_p/N_p Σ ||Δ p_j||² + λ ||Δ||²,   Δ = B_p A_p of rank r,

with the gate ``g = sigmoid(p·w + b)`` fitted first on pooled vectors (concept prompts against the rest).
The regulariser ``λ_p`` acts on the *ungated* edit, so the plain edit (gate 1, what fusing writes) is
already small on the prompts to keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import CLIPTextModelWithProjection

from ..core.factors import PooledFactors
from ..errors import ACECompatibilityError
from ..integration.modules import get_unet, pooled_embedding_module
from .data import CHANGED_TOKEN_THRESHOLD, FitJobs, FitSettings
from .solvers import FitData, fit_gate, low_rank_edits, solve_text_map


class PooledEncoder:
    """Prompts -> the pooled embedding ``pipe.encode_prompt`` gives (SDXL: the first encoder whose output
    is one vector per prompt, i.e. ``text_encoder_2``'s projected EOS token)."""

    def __init__(self, pipe: Any) -> None:
        pairs = [(getattr(pipe, t, None), getattr(pipe, e, None)) for t, e in POOLED_ENCODERS]
        found = [(t, e) for t, e in pairs if t is not None and isinstance(e, CLIPTextModelWithProjection)]
        if not found:
            raise ACECompatibilityError(
                f"{type(pipe).__name__}'s UNet reads a pooled text embedding but the pipeline has no "
                "CLIP text encoder with a projection (CLIPTextModelWithProjection) to compute it; load the "
                "pipeline with its own text_encoder_2."
            )
        self.tokenizer, self.encoder = found[0]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """``(len(prompts), d_pool)`` float32. CLIP is causal and pools at the EOS token, so each batch
        stops at its longest prompt: the result is that of the 77-token encoding."""
        rows = []
        device = next(self.encoder.parameters()).device
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(
                list(prompts[start : start + batch_size]),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            width = int(tokens["attention_mask"].sum(dim=1).max())
            out = self.encoder(tokens["input_ids"][:, :width].to(device), output_hidden_states=False)
            rows.append(out.text_embeds.float().cpu())
        return torch.cat(rows)


POOLED_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def fit_pooled(
    pipe: Any, jobs: FitJobs, settings: FitSettings, rank: int
) -> tuple[PooledFactors, dict] | None:
    """The pooled edit for the prompts of ``jobs`` (:func:`.data.fit_jobs`), with statistics; None when
    ``pipe``'s UNet reads no pooled embedding (SD 1.x/2.x)."""
    if pooled_embedding_module(get_unet(pipe)) is None:
        return None
    encoder = PooledEncoder(pipe)
    others_prompts = list(dict.fromkeys([j[0] for j in jobs.other] + [j[0] for j in jobs.neutral]))
    encoded = encoder.encode([j[0] for j in jobs.concept] + [j[0] for j in jobs.neutral] + others_prompts)
    n_concept = len(jobs.concept)
    concept, neutral = encoded[:n_concept], encoded[n_concept : 2 * n_concept]
    others = encoded[2 * n_concept :]
    weights = torch.ones(n_concept)
    if jobs.neighbour_jobs:
        weights[n_concept - jobs.neighbour_jobs :] = settings.neighbour_weight
    return fit_pooled_vectors(concept, neutral, others, weights, settings, rank)


def fit_pooled_vectors(
    concept: torch.Tensor,
    neutral: torch.Tensor,
    others: torch.Tensor,
    weights: torch.Tensor,
    settings: FitSettings,
    rank: int,
) -> tuple[PooledFactors, dict] | None:
    """The pooled edit of the module docstring from pooled vectors (rows): ``concept`` and their anchors'
    ``neutral``, the ``others`` to keep, each concept row's weight; None when no concept row differs from
    its anchor's."""
    changed = (concept - neutral).norm(dim=-1) / concept.norm(dim=-1).clamp_min(1e-8)
    positive = changed > CHANGED_TOKEN_THRESHOLD
    if not bool(positive.any()):  # the text encoder does not tell the concept from its anchor
        return None
    gate_w, gate_b, gate_stats = fit_gate(
        concept[positive], torch.cat([concept[~positive], others]), ridge=settings.gate_ridge
    )
    data = FitData(concept=concept, target=neutral, gate_positive=positive, others=others, weights=weights)
    h, root, stats = solve_text_map(
        data, gate_w, gate_b, preserve_weight=settings.preserve_weight, ridge=settings.ridge
    )
    dim = concept.shape[1]
    ((down, up),) = low_rank_edits([torch.eye(dim)], h.float(), root.float(), min(rank, dim))
    factors = PooledFactors(down, up, gate_w, gate_b)
    shift = pooled_shift(factors, concept[positive], neutral[positive], others)
    return factors, {**gate_stats, **stats, **shift}


def pooled_shift(
    factors: PooledFactors,
    concept: torch.Tensor,
    neutral: torch.Tensor,
    unrelated: torch.Tensor,
    multiplier: float = 1.0,
) -> dict[str, float]:
    """How far the edit moves pooled embeddings (rows), by the formula the hook applies.

    ``concept_towards_neutral``: mean share of the way from each concept embedding to its anchor's that
    the edit covers, ``1 − ||p'_i − n_i|| / ||c_i − n_i||`` (1 = all the way, 0 = not at all);
    ``unrelated_moved``: mean ``||p'_j − p_j|| / ||p_j||`` over prompts the edit should leave alone.
    """
    f = factors.to(torch.float32)

    def edited(p: torch.Tensor) -> torch.Tensor:
        return p + f.pooled_delta(p.float(), multiplier)

    gap = (concept - neutral).norm(dim=-1).clamp_min(1e-12)
    towards = 1 - (edited(concept) - neutral).norm(dim=-1) / gap
    moved = (edited(unrelated) - unrelated).norm(dim=-1) / unrelated.norm(dim=-1).clamp_min(1e-12)
    return {
        "concept_towards_neutral": float(towards.mean()) if len(towards) else 0.0,
        "unrelated_moved": float(moved.mean()) if len(moved) else 0.0,
    }


def describe_pooled_shift(stats: dict[str, float]) -> str:
    """One line on what the pooled edit does to the fit's prompts (``fit["pooled"]`` of an adapter)."""
    return (
        f"pooled text embedding: the concept prompts move {100 * stats['concept_towards_neutral']:.1f} % of "
        f"the way to their anchor's; the prompts to keep move {100 * stats['unrelated_moved']:.2f} % of "
        "their length"
    )
