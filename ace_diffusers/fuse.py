"""Fuse an ACE adapter into the UNet's own ``to_k`` / ``to_v`` weights (and undo it bit-exactly).

An ACE adapter changes a cross-attention layer's keys by a *gated* low-rank term (same for values)::

    k(x) = W x + s · g(x) · B A x          g(x) = sigmoid(w·x + b), one value per text token

A plain weight edit ``W + ΔW`` cannot depend on the token, so fusing is an approximation. We *bake*
the gate into ``ΔW`` by least squares over the text tokens the adapter was fitted for (the same
concept / neutral / preservation prompts as :func:`ace_diffusers.closed_form.collect_fit_data`)::

    min_ΔW  1/N_c Σ_{i∈C} ||ΔW x_i − s g_i B A x_i||²  +  μ/N_o Σ_{j∈O} ||ΔW x_j − s g_j B A x_j||²
            + λ ||ΔW||²

``C``: tokens of concept prompts, ``O``: tokens of neutral, preservation and generic prompts. With the
weighted token moments ``M = 1/N_c Σ_C x xᵀ + μ/N_o Σ_O x xᵀ + λ I`` and
``S = 1/N_c Σ_C g x xᵀ + μ/N_o Σ_O g x xᵀ`` the minimiser is::

    ΔW = s B A S M⁻¹        (rank <= r: factors  up = s B,  down = A S M⁻¹)

so the baked edit keeps the adapter's rank. :func:`bake` can truncate it further to the best rank-k
edit *in the metric of the objective* (top-k SVD of ``ΔW M^{1/2}``, Eckart–Young).

Fusing (:func:`fuse_adapter`) writes ``W + ΔW`` into the weights in place, keeps a CPU copy of the
original weights, and switches the adapter's gated path off (its ``active`` multiplier is set to 0),
so nothing is applied twice. :func:`unfuse_adapter` copies the originals back (bit-exact) and
switches the gated path back on. :func:`fidelity` measures how far the fused K/V are from the gated
ones on any prompt sets; the fuse call returns those figures and keeps them (:func:`fused_reports`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import attach
from .adapter import ACEAdapter
from .closed_form import FitSettings, _fill, collect_fit_data
from .errors import ACEAdapterNameError, ACEValueError
from .pipeline import get_unet
from .presets import ErasureSpec, load_presets
from .text import TextEmbedder

FUSED_ATTR = "_ace_fused"
PROJECTIONS = ("k", "v")


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

    def delta(self, projection: str) -> torch.Tensor:
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


@dataclass
class _FusedAdapter:
    baked: BakedEdit
    report: dict[str, dict[str, float]]
    active_before: float


@dataclass
class _FusedState:
    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # CPU copies, original dtype
    adapters: dict[str, _FusedAdapter] = field(default_factory=dict)  # in fuse order


# ---------------------------------------------------------------------- prompts and tokens
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


def _fit_settings(adapter: ACEAdapter) -> FitSettings:
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
    settings = _fit_settings(adapter)
    pairs = list(zip(spec.concepts, spec.neutral, strict=True))
    sets = {
        "concept": [_fill(t, c)[0] for c, _ in pairs for t in _templates_for(spec, c)],
        "neutral": [_fill(t, n)[0] for c, n in pairs for t in _templates_for(spec, c)],
        "preserve": spec.preserve_prompts(settings.preserve_templates),
        "unrelated": [p for p in spec.unrelated_prompts() if p],
    }
    return {name: list(dict.fromkeys(prompts)) for name, prompts in sets.items() if prompts}


# ---------------------------------------------------------------------- the bake
def _gate_groups(adapter: ACEAdapter) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Layers grouped by identical gates (closed-form adapters share one gate across all layers)."""
    groups: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
    for name in sorted(adapter.layers):
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


def bake(
    pipe: Any,
    adapter: ACEAdapter,
    *,
    scale: float = 1.0,
    settings: BakeSettings | None = None,
    spec: ErasureSpec | None = None,
) -> BakedEdit:
    """Solve for the plain weight edit that best reproduces ``adapter``'s gated edit (module docstring).

    Needs only ``pipe``'s tokenizer(s) and text encoder(s) (the token set), not its UNet weights.
    ``spec`` overrides the prompts the adapter records in ``adapter.fit``.
    """
    settings = settings or BakeSettings()
    _check_settings(settings, adapter)
    spec = spec or erasure_spec(adapter)
    embedder = TextEmbedder(pipe)
    data = collect_fit_data(embedder, spec, _fit_settings(adapter))
    d_text = next(iter(adapter.layers.values())).shape[0]
    if data.concept.shape[1] != d_text:
        raise ACEValueError(
            f"The pipeline's text encoder produces {data.concept.shape[1]}-d tokens but the adapter expects "
            f"{d_text}-d tokens: bake with the base model the adapter was fitted for."
        )
    xc, xo = data.concept.double().cpu(), data.others.double().cpu()
    wc, wo = 1.0 / len(xc), settings.other_weight / len(xo)
    moment = wc * xc.T @ xc + wo * xo.T @ xo
    energy = torch.trace(moment) / (d_text * (1.0 + settings.other_weight))
    moment = moment + settings.ridge * energy * torch.eye(d_text, dtype=moment.dtype)
    m_sqrt = m_inv_sqrt = None
    if settings.rank is not None and settings.rank < adapter.rank:
        m_sqrt, m_inv_sqrt = _metric_sqrt(moment)

    layers: dict[str, BakedLayer] = {}
    gate_means = []
    for gate_w, gate_b, names in _gate_groups(adapter):
        gc, go = torch.sigmoid(xc @ gate_w + gate_b), torch.sigmoid(xo @ gate_w + gate_b)
        gate_means.append((float(gc.mean()), float(go.mean())))
        gated = wc * (xc * gc.unsqueeze(1)).T @ xc + wo * (xo * go.unsqueeze(1)).T @ xo  # S
        text_map = torch.linalg.solve(moment, gated).T  # S M^-1 (S, M symmetric)
        for name in names:
            f = adapter.layers[name]
            parts = {}
            for proj in PROJECTIONS:
                down = getattr(f, f"{proj}_down").detach().cpu().double() @ text_map
                up = getattr(f, f"{proj}_up").detach().cpu().double() * float(scale)
                if m_sqrt is not None:
                    down, up = _truncate(up, down, m_sqrt, m_inv_sqrt, settings.rank)
                parts[f"{proj}_down"], parts[f"{proj}_up"] = down.float(), up.float()
            layers[name] = BakedLayer(**parts)

    stats = {
        "concept_tokens": int(len(xc)),
        "other_tokens": int(len(xo)),
        "gate_mean_concept_tokens": sum(m[0] for m in gate_means) / len(gate_means),
        "gate_mean_other_tokens": sum(m[1] for m in gate_means) / len(gate_means),
    }
    return BakedEdit(layers, concepts=list(adapter.concepts), scale=float(scale), settings=settings, stats=stats)


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


# ---------------------------------------------------------------------- fidelity
@torch.no_grad()
def fidelity(
    pipe: Any,
    adapter: ACEAdapter,
    baked: BakedEdit,
    prompt_sets: Mapping[str, Sequence[str]] | None = None,
    *,
    scale: float | None = None,
    base_weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, dict[str, float]]:
    """How closely the fused K/V (``W + ΔW``) reproduce the gated K/V, per prompt set.

    Prompts are encoded exactly as the pipeline encodes them (all ``model_max_length`` tokens, padding
    included). Over all cross-attention layers and tokens of a set, with ``base = W x``,
    ``gated = W x + s g(x) B A x`` and ``fused = (W + ΔW) x``:

    * ``k_rel_error`` / ``v_rel_error``: ``||fused − gated|| / ||gated||`` for K / V;
    * ``edit_rel_error``: ``||fused − gated|| / ||gated − base||`` (K and V together): the part of the
      erasure edit the fused weights get wrong (meaningful where the gate is open, e.g. ``concept``);
    * ``gated_change`` / ``fused_change``: ``||gated − base|| / ||base||`` and ``||fused − base|| / ||base||``
      (K and V together): how much each variant moves this set away from the base model;
    * ``prompts``, ``tokens``.

    ``base_weights``: ``{layer: (W_k, W_v)}``; default the pipeline's current ``to_k``/``to_v`` weights.
    ``prompt_sets``: default :func:`default_prompt_sets`.
    """
    scale = baked.scale if scale is None else float(scale)
    prompt_sets = prompt_sets if prompt_sets is not None else default_prompt_sets(adapter)
    if base_weights is None:
        modules = attach.cross_attention_modules(get_unet(pipe))
        base_weights = {n: (attach._weight(m.to_k), attach._weight(m.to_v)) for n, m in modules.items()}
    missing = sorted(set(baked.layers) - set(base_weights))
    if missing:
        raise ACEValueError(f"The pipeline has no cross-attention layer {missing[0]!r} of the baked edit.")
    embedder = TextEmbedder(pipe)
    tokens = {}
    for set_name, prompts in prompt_sets.items():
        prompts = list(prompts)
        if prompts:
            encoded = embedder.encode(prompts, extra_pad_tokens=None)
            tokens[set_name] = (len(prompts), torch.cat([e.embeddings for e in encoded]).double().cpu())
    if not tokens:
        raise ACEValueError("All prompt sets are empty; give at least one prompt.")
    keys = ("err_k", "err_v", "gated_k", "gated_v", "edit", "fused_edit", "base")
    sums = {set_name: dict.fromkeys(keys, 0.0) for set_name in tokens}
    d_text = next(iter(tokens.values()))[1].shape[1]
    # ||W x||^2 summed over a set's tokens is <W^T W, X^T X>: one d_out x d^2 product per weight serves every
    # set, cheaper than W X for all tokens once the sets hold more than d_text tokens together.
    use_gram = sum(x.shape[0] for _, x in tokens.values()) > d_text
    grams = {set_name: x.T @ x for set_name, (_, x) in tokens.items()} if use_gram else {}
    # Every low-rank quantity of every layer comes from one float32 product x @ P^T per set, with P
    # stacking, per layer and projection, A (r rows), the baked down (r' rows) and B^T W (r rows).
    plan, rows = [], []
    for name, layer in baked.layers.items():
        f = adapter.layers[name]
        for proj, weight in zip(PROJECTIONS, base_weights[name], strict=True):
            w32 = weight.detach().cpu().float()
            a = getattr(f, f"{proj}_down").detach().cpu().float()
            b = getattr(f, f"{proj}_up").detach().cpu().float()
            down, up = (t.detach().cpu().float() for t in layer.factors(proj))
            coupled = torch.cat([up, b], dim=1).double()  # fused - gated = [x down^T, -s g x A^T] [up, B]^T
            plan.append(
                {
                    "layer": name,
                    "proj": proj,
                    "ranks": (a.shape[0], down.shape[0]),
                    "coupled_gram": coupled.T @ coupled,
                    "wtw": (w32.T @ w32).double() if use_gram else None,
                    "w32": None if use_gram else w32,
                }
            )
            rows += [a, down, b.T @ w32]
    stacked = torch.cat(rows)
    gates = {
        name: (f.gate_weight.detach().cpu().double(), f.gate_bias.detach().cpu().double())
        for name, f in adapter.layers.items()
        if name in baked.layers
    }
    for set_name, (_, x) in tokens.items():
        acc = sums[set_name]
        projected = x.float() @ stacked.T
        gate_of = {name: torch.sigmoid(x @ gw + gb).unsqueeze(1) for name, (gw, gb) in gates.items()}
        offset = 0
        for item in plan:
            r, r_baked = item["ranks"]
            xa = projected[:, offset : offset + r].double() * (scale * gate_of[item["layer"]])  # s g(x) A x
            xd = projected[:, offset + r : offset + r + r_baked].double()
            xwb = projected[:, offset + r + r_baked : offset + 2 * r + r_baked].double()  # B^T W x
            offset += 2 * r + r_baked
            z = torch.cat([xd, -xa], dim=1)
            zz, cg = z.T @ z, item["coupled_gram"]
            err = float((cg * zz).sum())
            fused_edit = float((cg[:r_baked, :r_baked] * zz[:r_baked, :r_baked]).sum())
            edit = float((cg[r_baked:, r_baked:] * zz[r_baked:, r_baked:]).sum())
            cross = float((xa * xwb).sum())  # <W x, s g B A x>
            if use_gram:
                base = float((item["wtw"] * grams[set_name]).sum())
            else:
                base = float(((x.float() @ item["w32"].T).double() ** 2).sum())
            proj = item["proj"]
            acc[f"err_{proj}"] += max(err, 0.0)
            acc[f"gated_{proj}"] += max(base + 2 * cross + edit, 0.0)
            acc["edit"] += edit
            acc["fused_edit"] += fused_edit
            acc["base"] += base

    def ratio(num: float, den: float) -> float:
        return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)

    report: dict[str, dict[str, float]] = {}
    for set_name, (n_prompts, x) in tokens.items():
        acc = sums[set_name]
        report[set_name] = {
            "k_rel_error": ratio(acc["err_k"], acc["gated_k"]),
            "v_rel_error": ratio(acc["err_v"], acc["gated_v"]),
            "edit_rel_error": ratio(acc["err_k"] + acc["err_v"], acc["edit"]),
            "gated_change": ratio(acc["edit"], acc["base"]),
            "fused_change": ratio(acc["fused_edit"], acc["base"]),
            "prompts": n_prompts,
            "tokens": int(x.shape[0]),
        }
    return report


def fuse_fidelity(
    pipe: Any,
    adapter: ACEAdapter | str | None = None,
    prompt_sets: Mapping[str, Sequence[str]] | None = None,
    *,
    scale: float | None = None,
    settings: BakeSettings | None = None,
) -> dict[str, dict[str, float]]:
    """Fidelity figures of fusing ``adapter`` into ``pipe`` (see :func:`fidelity`); changes nothing.

    ``adapter``: an :class:`ACEAdapter`, the name of one loaded in ``pipe``, or ``None`` for the only
    loaded one. ``scale``: default the loaded adapter's current scale (1.0 for an adapter object).
    If adapters are fused, ``base`` is the model before fusing.
    """
    unet = get_unet(pipe)
    if not isinstance(adapter, ACEAdapter):
        name = _single_loaded(unet, adapter)
        adapter = attach.loaded_adapters(unet)[name]
        if scale is None:
            scale = attach.adapter_scale(unet, name)
    scale = 1.0 if scale is None else float(scale)
    baked = bake(pipe, adapter, scale=scale, settings=settings)
    state = _state(unet)
    base_weights = None
    if state is not None:  # measure against the weights as they were before anything was fused
        layers = {layer for layer, _ in state.originals}
        base_weights = {layer: (state.originals[(layer, "k")], state.originals[(layer, "v")]) for layer in layers}
    return fidelity(pipe, adapter, baked, prompt_sets, scale=scale, base_weights=base_weights)


def _single_loaded(unet: nn.Module, name: str | None) -> str:
    loaded = attach.loaded_adapters(unet)
    if name is None:
        if len(loaded) != 1:
            raise ACEAdapterNameError(f"{len(loaded)} ACE adapters are loaded ({list(loaded)}); pass adapter_name.")
        return next(iter(loaded))
    if name not in loaded:
        raise ACEAdapterNameError(f"No ACE adapter named '{name}' is loaded (loaded: {list(loaded)}).")
    return name


# ---------------------------------------------------------------------- fuse / unfuse
def _state(unet: nn.Module) -> _FusedState | None:
    state = unet.__dict__.get(FUSED_ATTR)
    return state if isinstance(state, _FusedState) else None


def fused_reports(pipe: Any) -> dict[str, dict[str, dict[str, float]]]:
    """``{adapter name: fidelity report}`` of every adapter currently fused into ``pipe``'s UNet."""
    state = _state(get_unet(pipe))
    return {name: rec.report for name, rec in state.adapters.items()} if state else {}


def get_fused_adapters(pipe: Any) -> list[str]:
    """Names of the ACE adapters currently fused into the weights, in fuse order."""
    return list(fused_reports(pipe))


def _names_to_fuse(unet: nn.Module, adapter_name: str | Sequence[str] | None, state: _FusedState | None) -> list[str]:
    loaded = attach.loaded_adapters(unet)
    fused = list(state.adapters) if state else []
    if adapter_name is None:
        names = attach.active_adapters(unet)
        if not names:
            hint = f" ({fused} already fused)" if fused else ""
            raise ACEValueError(
                f"No active ACE adapter to fuse{hint}; loaded: {list(loaded)}. Load one, activate it with "
                "set_ace_adapters(), or pass adapter_name."
            )
        return names
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise ACEValueError("adapter_name is an empty list; pass a name, a list of names or None (all active).")
    for name in names:
        if name not in loaded:
            raise ACEAdapterNameError(f"No ACE adapter named '{name}' is loaded (loaded: {list(loaded)}).")
        if name in fused:
            raise ACEValueError(
                f"ACE adapter '{name}' is already fused into the weights; call unfuse_ace_adapter() before fusing it again."
            )
    if len(set(names)) != len(names):
        raise ACEValueError(f"adapter_name lists a name twice: {names}.")
    return names


@torch.no_grad()
def fuse_adapter(
    pipe: Any,
    adapter_name: str | Sequence[str] | None = None,
    *,
    settings: BakeSettings | None = None,
    prompt_sets: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Write ACE adapter(s) into the UNet's ``to_k``/``to_v`` weights, like diffusers' ``fuse_lora``.

    ``adapter_name``: one name, a list, or ``None`` for every active adapter. Each adapter is baked at
    its current scale (:func:`bake`), added to the weights in place, and its gated path is switched
    off so it is not applied twice. The original weights are kept (on CPU) for :func:`unfuse_adapter`.
    After fusing, ``pipe.save_pretrained`` writes an ordinary diffusers model carrying the erasure
    (also after ``unload_ace_adapter``).

    Returns ``{adapter name: fidelity report}`` (:func:`fidelity`, on ``prompt_sets`` or the
    adapter's own prompts); also available later from :func:`fused_reports`.
    """
    unet = get_unet(pipe)
    state = _state(unet)
    names = _names_to_fuse(unet, adapter_name, state)
    modules = attach.cross_attention_modules(unet)
    loaded = attach.loaded_adapters(unet)

    # Everything is computed before anything changes: a failure leaves the pipeline as it was.
    planned: dict[str, _FusedAdapter] = {}
    base = {n: (attach._weight(m.to_k), attach._weight(m.to_v)) for n, m in modules.items()}
    for name in names:
        adapter = loaded[name]
        baked = bake(pipe, adapter, scale=attach.adapter_scale(unet, name), settings=settings)
        report = fidelity(pipe, adapter, baked, prompt_sets, base_weights=base)
        delta = next(iter(attach._deltas(unet, name)))
        planned[name] = _FusedAdapter(baked=baked, report=report, active_before=float(delta.active))

    if state is None:
        state = _FusedState()
        unet.__dict__[FUSED_ATTR] = state
    for layer, attn in modules.items():
        for proj, linear in zip(PROJECTIONS, (attn.to_k, attn.to_v), strict=True):
            weight = attach._weight(linear)
            key = (layer, proj)
            if key not in state.originals:
                state.originals[key] = weight.detach().to("cpu", copy=True)
            new = weight.detach().cpu()
            for record in planned.values():
                new = _add_delta(new, record.baked.layers[layer].delta(proj))
            weight.data.copy_(new.to(weight.device))
    for name, record in planned.items():
        for delta in attach._deltas(unet, name):
            delta.active.fill_(0.0)
        state.adapters[name] = record
    return {name: record.report for name, record in planned.items()}


def _add_delta(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight + delta`` computed in float64 and rounded once to the weight's dtype (CPU)."""
    return (weight.double() + delta).to(weight.dtype)


@torch.no_grad()
def unfuse_adapter(pipe: Any) -> list[str]:
    """Undo :func:`fuse_adapter` for every fused adapter: original weights back bit-exactly, gated path on.

    If something else changed the fused weights meanwhile (e.g. a PEFT ``fuse_lora``), the ACE part is
    subtracted instead (approximately, with a warning) so that the other change survives.
    Returns the names that were unfused.
    """
    unet = get_unet(pipe)
    state = _state(unet)
    if state is None or not state.adapters:
        raise ACEValueError("No ACE adapter is fused into this pipeline's weights; nothing to unfuse.")
    modules = attach.cross_attention_modules(unet)
    changed = []
    for (layer, proj), original in state.originals.items():
        linear = getattr(modules[layer], f"to_{proj}")
        weight = attach._weight(linear)
        expected = original
        for record in state.adapters.values():
            expected = _add_delta(expected, record.baked.layers[layer].delta(proj))
        current = weight.detach().cpu()
        if current.dtype == expected.dtype and torch.equal(current, expected):
            weight.data.copy_(original.to(weight.device))
        else:
            changed.append(f"{layer}.to_{proj}")
            applied = expected.double() - original.double()
            weight.data.copy_((current.double() - applied).to(weight.dtype).to(weight.device))
    if changed:
        warnings.warn(
            f"{len(changed)} fused weights (e.g. {changed[0]}) were changed after fuse_ace_adapter(); the ACE "
            "edit was subtracted from them instead of restoring the originals, so they are not bit-exact.",
            stacklevel=2,
        )
    loaded = attach.loaded_adapters(unet)
    for name, record in state.adapters.items():
        if name in loaded:
            for delta in attach._deltas(unet, name):
                delta.active.fill_(record.active_before)
    names = list(state.adapters)
    del unet.__dict__[FUSED_ATTR]
    return names


def check_not_fused(pipe: Any, names: str | Sequence[str]) -> None:
    """Raise if any of ``names`` is fused (re-activating its gated path would apply it twice)."""
    names = [names] if isinstance(names, str) else list(names)
    state = _state(get_unet(pipe))
    fused = [n for n in names if state and n in state.adapters]
    if fused:
        raise ACEValueError(
            f"ACE adapter(s) {fused} are fused into the weights; activating their gated path would apply them "
            "twice. Call unfuse_ace_adapter() first."
        )


@contextlib.contextmanager
def fused(
    pipe: Any, adapter_name: str | Sequence[str] | None = None, **fuse_kwargs: Any
) -> Iterator[dict[str, dict[str, dict[str, float]]]]:
    """``with fused(pipe) as report: ...`` — fuse for the block, unfuse (bit-exact) afterwards.

    Handy for evaluating the fused model with the same pipeline object. Nothing may be fused already.
    """
    already = get_fused_adapters(pipe)
    if already:
        raise ACEValueError(f"ACE adapter(s) {already} are already fused; unfuse them before using fused().")
    report = fuse_adapter(pipe, adapter_name, **fuse_kwargs)
    try:
        yield report
    finally:
        unfuse_adapter(pipe)
