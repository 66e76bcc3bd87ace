"""How closely a baked (plain) edit reproduces the gated one, measured on the K/V the pipeline would "
"compute."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core.adapter import ACEAdapter
from ..core.factors import PROJECTIONS, gate_values
from ..errors import ACEValueError
from ..fitting.joint import block_streams
from ..fitting.text import TextEmbedder
from ..integration.modules import (
    cross_attention_modules,
    get_unet,
    kv_projections,
    projection_weight,
    reads_joint_text,
)
from .bake import BakedEdit, default_prompt_sets


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
        modules = cross_attention_modules(get_unet(pipe))
        base_weights = {n: tuple(projection_weight(p) for p in kv_projections(m)) for n, m in modules.items()}
    missing = sorted(set(baked.layers) - set(base_weights))
    if missing:
        raise ACEValueError(f"The pipeline has no cross-attention layer {missing[0]!r} of the baked edit.")
    tokens = _set_tokens(pipe, prompt_sets)
    gates = {
        name: (f.gate_weight.detach().cpu().double(), f.gate_bias.detach().cpu().double())
        for name, f in adapter.layers.items()
        if name in baked.layers
    }
    plans = {}  # one per token group: all layers (one text for all), or each block (joint attention)
    for key in next(iter(tokens.values()))[1]:
        names = list(baked.layers) if key is None else [key]
        # ||W x||^2 summed over a set's tokens is <W^T W, X^T X>: one d_out x d^2 product per weight serves
        # every set, cheaper than W X for all tokens once the sets hold more than d_text tokens together.
        x_all = [xs[key] for _, xs in tokens.values()]
        use_gram = sum(x.shape[0] for x in x_all) > x_all[0].shape[1]
        plans[key] = (*_plan(adapter, baked, base_weights, use_gram, names), use_gram)
    report: dict[str, dict[str, float]] = {}
    for set_name, (n_prompts, xs) in tokens.items():
        acc: dict[str, float] = {}
        for key, (plan, stacked, use_gram) in plans.items():
            x = xs[key]
            part = _accumulate(x, plan, stacked, gates, scale, x.T @ x if use_gram else None)
            acc = {k: acc.get(k, 0.0) + v for k, v in part.items()}
        report[set_name] = {
            "k_rel_error": _ratio(acc["err_k"], acc["gated_k"]),
            "v_rel_error": _ratio(acc["err_v"], acc["gated_v"]),
            "edit_rel_error": _ratio(acc["err_k"] + acc["err_v"], acc["edit"]),
            "gated_change": _ratio(acc["edit"], acc["base"]),
            "fused_change": _ratio(acc["fused_edit"], acc["base"]),
            "prompts": n_prompts,
            "tokens": int(next(iter(xs.values())).shape[0]),
        }
    return report


def _set_tokens(
    pipe: Any, prompt_sets: Mapping[str, Sequence[str]]
) -> dict[str, tuple[int, dict[str | None, torch.Tensor]]]:
    """``{set: (prompts, {None: all tokens (N, d)})}`` (float64); for joint attention (SD3) the tokens each
    block reads, ``{block: (N_b, d)}``, captured by running the transformer (:func:`.joint.block_streams`)."""
    if not reads_joint_text(pipe):
        return {k: (n, {None: x}) for k, (n, x) in _encode_sets(TextEmbedder(pipe), prompt_sets).items()}
    streams, tokens = block_streams(pipe), {}
    for set_name, prompts in prompt_sets.items():
        if prompts:
            captured = streams.capture(list(prompts))
            tokens[set_name] = (len(prompts), {n: c.flatten(0, 2).double() for n, c in captured.items()})
    if not tokens:
        raise ACEValueError("All prompt sets are empty; give at least one prompt.")
    return tokens


def _encode_sets(
    embedder: TextEmbedder, prompt_sets: Mapping[str, Sequence[str]]
) -> dict[str, tuple[int, torch.Tensor]]:
    """``{set: (prompts, all their tokens (N, d) float64)}``, every padding token included."""
    tokens = {}
    for set_name, prompts in prompt_sets.items():
        prompts = list(prompts)
        if prompts:
            encoded = embedder.encode(prompts, extra_pad_tokens=None)
            tokens[set_name] = (len(prompts), torch.cat([e.embeddings for e in encoded]).double().cpu())
    if not tokens:
        raise ACEValueError("All prompt sets are empty; give at least one prompt.")
    return tokens


def _plan(
    adapter: ACEAdapter,
    baked: BakedEdit,
    base_weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    use_gram: bool,
    names: list[str],
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Every low-rank quantity of the layers ``names`` comes from one float32 product ``x @ P^T`` per set,
    with P stacking, per layer and projection, A (r rows), the baked down (r' rows) and Bᵀ W (r rows)."""
    plan, rows = [], []
    for name in names:
        layer = baked.layers[name]
        f = adapter.layers[name]
        for proj, weight in zip(PROJECTIONS, base_weights[name], strict=True):
            w32 = weight.detach().cpu().float()
            a, b = (t.detach().cpu().float() for t in f.factors_of(proj))
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
    return plan, torch.cat(rows)


def _accumulate(
    x: torch.Tensor,
    plan: list[dict[str, Any]],
    stacked: torch.Tensor,
    gates: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    gram: torch.Tensor | None,
) -> dict[str, float]:
    """Squared norms of one set, summed over layers: errors, gated/fused edits and the base K/V."""
    acc = dict.fromkeys(("err_k", "err_v", "gated_k", "gated_v", "edit", "fused_edit", "base"), 0.0)
    projected = x.float() @ stacked.T
    gate_of = {name: gate_values(x, gw, gb).unsqueeze(1) for name, (gw, gb) in gates.items()}
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
        if gram is not None:
            base = float((item["wtw"] * gram).sum())
        else:
            base = float(((x.float() @ item["w32"].T).double() ** 2).sum())
        proj = item["proj"]
        acc[f"err_{proj}"] += max(err, 0.0)
        acc[f"gated_{proj}"] += max(base + 2 * cross + edit, 0.0)
        acc["edit"] += edit
        acc["fused_edit"] += fused_edit
        acc["base"] += base
    return acc


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
