"""Bake an ACE adapter's *gated* edit into a plain (ungated) low-rank weight edit.

An ACE adapter changes a cross-attention layer's keys by a *gated* low-rank term (same for values)::

    k(x) = W x + s · g(x) · B A x          g(x) = sigmoid(w·x + b), one value per text token

A plain weight edit ``W + ΔW`` cannot depend on the token, so fusing is an approximation. We *bake*
the gate into ``ΔW`` by least squares over the text tokens the adapter was fitted for (the same
concept / neutral / preservation prompts as :func:`ace_diffusers.fitting.data.collect_fit_data`)::

    min_ΔW  1/N_c Σ_{i∈C} ||ΔW x_i − s g_i B A x_i||²  +  μ/N_o Σ_{j∈O} ||ΔW x_j − s g_j B A x_j||²
            + λ ||ΔW||²

``C``: tokens of concept prompts, ``O``: tokens of neutral, preservation and generic prompts. With the
weighted token moments ``M = 1/N_c Σ_C x xᵀ + μ/N_o Σ_O x xᵀ + λ I`` and
``S = 1/N_c Σ_C g x xᵀ + μ/N_o Σ_O g x xᵀ`` the minimiser is::

    ΔW = s B A S M⁻¹        (rank <= r: factors  up = s B,  down = A S M⁻¹)

so the baked edit keeps the adapter's rank. :func:`bake` can truncate it further to the best rank-k
edit *in the metric of the objective* (top-k SVD of ``ΔW M^{1/2}``, Eckart–Young).

:mod:`.fuse` writes the baked edit into the weights, :mod:`.export` into a LoRA file, and
:mod:`.fidelity` measures how far it is from the gated edit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.adapter import ACEAdapter
from ..core.factors import PROJECTIONS, gate_values
from ..errors import ACECompatibilityError, ACEValueError
from ..fitting.data import FitSettings, collect_fit_data
from ..fitting.joint import JointFitData
from ..fitting.presets import ErasureSpec, fill_phrase, load_presets
from ..fitting.text import TextEmbedder
from ..integration.modules import find_denoiser, reads_joint_text, single_stream_layers


# ---------------------------------------------------------------------- settings and results
@dataclass
class BakeSettings:
    """How the gated edit is turned into a plain weight edit (module docstring)."""

    other_weight: float = 1.0  # μ: weight of the neutral/preservation/generic tokens vs the concept tokens
    ridge: float = 1e-4  # λ, relative to the mean token energy
    rank: int | None = None  # None: keep the adapter's rank r; k < r: best rank-k edit in the data metric

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BakedLayer:
    """One layer's plain (ungated) edit: ``ΔW_k = k_up @ k_down``, ``ΔW_v = v_up @ v_down`` (float32)."""

    k_down: torch.Tensor  # (rank, d_text)
    k_up: torch.Tensor  # (d_k, rank)
    v_down: torch.Tensor
    v_up: torch.Tensor

    def delta_weight(self, projection: str) -> torch.Tensor:
        """``ΔW`` of ``"k"`` or ``"v"`` in float64, shape ``(d_out, d_text)``."""
        up, down = getattr(self, f"{projection}_up"), getattr(self, f"{projection}_down")
        return up.double() @ down.double()

    def factors(self, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` of ``"k"`` or ``"v"``."""
        return getattr(self, f"{projection}_down"), getattr(self, f"{projection}_up")


@dataclass
class BakedEdit:
    """A gated ACE adapter turned into per-layer plain low-rank weight edits."""

    layers: dict[str, BakedLayer]
    concepts: list[str]
    scale: float
    settings: BakeSettings
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(layer.k_down.shape[0] for layer in self.layers.values())


def erasure_spec(adapter: ACEAdapter) -> ErasureSpec:
    """The prompts an adapter was fitted with (``adapter.fit``), with the kind's presets as fallback."""
    presets = load_presets()
    kind = adapter.kind if adapter.kind in presets["kinds"] else "custom"
    preset = presets["kinds"][kind]
    concepts = list(adapter.concepts)
    if not concepts:
        raise ACEValueError("This adapter records no concepts, so there are no prompts to bake the gate on.")
    neutral = list(adapter.neutral)
    if len(neutral) == 1:
        neutral = neutral * len(concepts)
    if len(neutral) != len(concepts):
        neutral = [preset["neutral"]] * len(concepts)
    fit = adapter.fit or {}
    templates = fit.get("templates") or list(preset["templates"])
    preserve = fit.get("preserve")
    if preserve is None:
        preserve = list(preset["preserve"])
    lowered = {c.lower() for c in concepts}
    extra = {}
    phrase_templates = fit.get("phrase_templates")
    if phrase_templates and "phrase_templates" in {f.name for f in dataclasses.fields(ErasureSpec)}:
        extra["phrase_templates"] = {str(k): list(v) for k, v in phrase_templates.items()}
    return ErasureSpec(
        concepts=concepts,
        neutral=neutral,
        kind=kind,
        templates=list(templates),
        preserve=[p for p in preserve if p.lower() not in lowered],
        negatives=list(presets["generic_negatives"]),
        **extra,
    )


def _templates_for(spec: ErasureSpec, phrase: str) -> list[str]:
    templates_for = getattr(spec, "templates_for", None)
    return list(templates_for(phrase)) if callable(templates_for) else list(spec.templates)


def recorded_fit_settings(adapter: ACEAdapter) -> FitSettings:
    recorded = (adapter.fit or {}).get("settings") or {}
    names = {f.name for f in dataclasses.fields(FitSettings)}
    return FitSettings(**{k: v for k, v in recorded.items() if k in names})


def default_prompt_sets(adapter: ACEAdapter, spec: ErasureSpec | None = None) -> dict[str, list[str]]:
    """Prompt sets the fidelity is reported on: ``concept``, ``neutral``, ``preserve``, ``unrelated``.

    ``concept``: every template filled with every concept; ``neutral``: the same with the neutral
    anchors; ``preserve``: the preserved concepts in the first two templates; ``unrelated``: generic
    prompts. Empty sets are left out.
    """
    spec = spec or erasure_spec(adapter)
    settings = recorded_fit_settings(adapter)
    pairs = list(zip(spec.concepts, spec.neutral, strict=True))
    sets = {
        "concept": [fill_phrase(t, c)[0] for c, _ in pairs for t in _templates_for(spec, c)],
        "neutral": [fill_phrase(t, n)[0] for c, n in pairs for t in _templates_for(spec, c)],
        "preserve": spec.preserve_prompts(settings.preserve_templates),
        "unrelated": [p for p in spec.unrelated_prompts() if p],
    }
    return {name: list(dict.fromkeys(prompts)) for name, prompts in sets.items() if prompts}


# ---------------------------------------------------------------------- the bake
def _gate_groups(adapter: ACEAdapter, names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """``names`` grouped by identical gates (closed-form adapters share one gate across all layers)."""
    groups: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
    for name in sorted(names):
        f = adapter.layers[name]
        w, b = f.gate_weight.detach().cpu().double(), f.gate_bias.detach().cpu().double().reshape(1)
        for gw, gb, names in groups:
            if torch.equal(gw, w) and torch.equal(gb, b):
                names.append(name)
                break
        else:
            groups.append((w, b, [name]))
    return groups


def _metric_sqrt(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigval, eigvec = torch.linalg.eigh(m)
    eigval = eigval.clamp_min(eigval.max() * 1e-12)
    return (eigvec * eigval.sqrt()) @ eigvec.T, (eigvec * eigval.rsqrt()) @ eigvec.T


SINGLE_STREAM_PREFIX = "single_transformer_blocks."  # FLUX's single-stream blocks, by diffusers' naming


def check_weight_editable(adapter: ACEAdapter, pipe: Any = None) -> None:
    """Refuse, before any work, an adapter that no plain weight edit can carry: one that edits FLUX
    single-stream blocks, whose ``to_k``/``to_v`` project the image rows too (an edit there would change
    every image, not only the concept's text rows). Read from ``pipe``'s model, else from layer names;
    layers whose edit is exactly zero (``FitSettings(single_stream=False)``) pass."""
    model = find_denoiser(pipe) if pipe is not None else None
    if model is not None:
        names = [n for n in single_stream_layers(model) if n in adapter.layers]
    else:
        names = [n for n in adapter.layers if n.startswith(SINGLE_STREAM_PREFIX)]
    single = [n for n in names if adapter.layers[n].edits()]
    if single:
        raise ACECompatibilityError(
            f"This adapter edits {len(single)} FLUX single-stream block(s) ({single[0]}, ...), where text "
            "and image tokens share to_k/to_v: a fused weight or a LoRA would edit the image tokens too. "
            "Nothing was changed. Keep the adapter loaded unfused (pipe.load_ace_adapter), which edits the "
            "text rows only, or fit one without them: "
            "erase_concept(..., settings=FitSettings(single_stream=False))."
        )


def bake(
    pipe: Any,
    adapter: ACEAdapter,
    *,
    scale: float = 1.0,
    settings: BakeSettings | None = None,
    spec: ErasureSpec | None = None,
) -> BakedEdit:
    """Solve for the plain weight edit that best reproduces ``adapter``'s gated edit (module docstring).

    Needs ``pipe``'s tokenizer(s) and text encoder(s) (the token set); for joint attention (SD3) also its
    transformer, which gives each block's own text tokens (:class:`.JointFitData`).
    ``spec`` overrides the prompts the adapter records in ``adapter.fit``.
    """
    settings = settings or BakeSettings()
    _check_settings(settings, adapter)
    check_weight_editable(adapter, pipe)
    spec = spec or erasure_spec(adapter)
    layers: dict[str, BakedLayer] = {}
    gate_means: list[tuple[float, float]] = []
    counts = [0, 0]
    for names, (xc, xo) in token_sets(pipe, adapter, spec):
        layers.update(_bake_layers(adapter, names, xc, xo, settings, float(scale), gate_means))
        counts = [max(counts[0], len(xc)), max(counts[1], len(xo))]
    stats = {
        "concept_tokens": counts[0],
        "other_tokens": counts[1],
        "gate_mean_concept_tokens": sum(m[0] for m in gate_means) / len(gate_means),
        "gate_mean_other_tokens": sum(m[1] for m in gate_means) / len(gate_means),
    }
    return BakedEdit(
        layers, concepts=list(adapter.concepts), scale=float(scale), settings=settings, stats=stats
    )


def token_sets(
    pipe: Any, adapter: ACEAdapter, spec: ErasureSpec
) -> list[tuple[list[str], tuple[torch.Tensor, torch.Tensor]]]:
    """``[(layers, (concept tokens, other tokens))]`` (float64, CPU): one set for every layer where all
    layers read the same text (UNets, PixArt), one per block for joint attention (SD3)."""
    fit_settings = recorded_fit_settings(adapter)
    if reads_joint_text(pipe):
        data = JointFitData.collect(pipe, spec, fit_settings)
        return [([n], (data.concept[n].double(), data.others[n].double())) for n in sorted(adapter.layers)]
    data = collect_fit_data(TextEmbedder(pipe), spec, fit_settings)
    d_text = next(iter(adapter.layers.values())).shape[0]
    if data.concept.shape[1] != d_text:
        raise ACEValueError(
            f"The pipeline's text encoder produces {data.concept.shape[1]}-d tokens but the adapter expects "
            f"{d_text}-d tokens: bake with the base model the adapter was fitted for."
        )
    return [(sorted(adapter.layers), (data.concept.double().cpu(), data.others.double().cpu()))]


def _bake_layers(
    adapter: ACEAdapter,
    names: list[str],
    xc: torch.Tensor,
    xo: torch.Tensor,
    settings: BakeSettings,
    scale: float,
    gate_means: list[tuple[float, float]],
) -> dict[str, BakedLayer]:
    """The baked edit of ``names`` (which read the tokens ``xc``, ``xo``); appends each gate's means."""
    d_text = xc.shape[1]
    wc, wo = 1.0 / len(xc), settings.other_weight / len(xo)
    moment = wc * xc.T @ xc + wo * xo.T @ xo
    energy = torch.trace(moment) / (d_text * (1.0 + settings.other_weight))
    moment = moment + settings.ridge * energy * torch.eye(d_text, dtype=moment.dtype)
    m_sqrt = m_inv_sqrt = None
    if settings.rank is not None and settings.rank < adapter.rank:
        m_sqrt, m_inv_sqrt = _metric_sqrt(moment)
    layers = {}
    for gate_w, gate_b, group in _gate_groups(adapter, names):
        gc, go = gate_values(xc, gate_w, gate_b), gate_values(xo, gate_w, gate_b)
        gate_means.append((float(gc.mean()), float(go.mean())))
        gated = wc * (xc * gc.unsqueeze(1)).T @ xc + wo * (xo * go.unsqueeze(1)).T @ xo  # S
        text_map = torch.linalg.solve(moment, gated).T  # S M^-1 (S, M symmetric)
        for name in group:
            f = adapter.layers[name]
            parts = {}
            for proj in PROJECTIONS:
                down = getattr(f, f"{proj}_down").detach().cpu().double() @ text_map
                up = getattr(f, f"{proj}_up").detach().cpu().double() * scale
                if m_sqrt is not None:
                    down, up = _truncate(up, down, m_sqrt, m_inv_sqrt, settings.rank)
                parts[f"{proj}_down"], parts[f"{proj}_up"] = down.float(), up.float()
            layers[name] = BakedLayer(**parts)
    return layers


def _truncate(
    up: torch.Tensor, down: torch.Tensor, m_sqrt: torch.Tensor, m_inv_sqrt: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``up @ down`` in the metric ``M``: ``(down', up')``."""
    u, s, vh = torch.linalg.svd(up @ (down @ m_sqrt), full_matrices=False)
    return vh[:rank] @ m_inv_sqrt, u[:, :rank] * s[:rank]


def _check_settings(settings: BakeSettings, adapter: ACEAdapter) -> None:
    if not (isinstance(settings.other_weight, (int, float)) and settings.other_weight >= 0):
        raise ACEValueError(f"other_weight must be a number >= 0, got {settings.other_weight!r}.")
    if not (isinstance(settings.ridge, (int, float)) and settings.ridge > 0):
        raise ACEValueError(f"ridge must be a number > 0, got {settings.ridge!r}.")
    rank = settings.rank
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ACEValueError(f"rank must be a positive integer or None, got {rank!r}.")
