"""The trainer's objective: cross-attention outputs of real queries over edited and unedited text tokens.

For each cross-attention layer a bank of real queries ``q`` is captured once from the UNet on noised
latents (:func:`capture_queries`). The attention output over text tokens ``c`` is
``Attn(q, K(c), V(c))`` with ``K(c) = W_k c`` — plus the adapter's gated delta
(:meth:`~ace_diffusers.core.factors.GatedLowRank.deltas`, the processor's own formula) when factors are
given. :func:`alignment_loss` compares the edited output on one prompt with the unedited output on
another (the neutral counterpart, or the same prompt for what must be kept), so no UNet forward or
backward pass is needed during fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.factors import LayerFactors
from ..integration.modules import cross_attention_modules, kv_projections, projection_weight
from .denoiser import run_denoiser, sample_size
from .embedding_cache import EMBEDDINGS
from .presets import filled
from .text import TextEmbedder

TrainableFactors = Mapping[str, Mapping[str, torch.Tensor]]  # {"gate": {weight, bias}, layer: {k_down, ...}}


@dataclass
class QueryLayer:
    """One cross-attention layer and a bank of its real queries."""

    name: str
    attn: torch.nn.Module
    queries: torch.Tensor  # (n_queries, heads, head_dim)
    masked: bool = False  # the denoiser masks padding out: all-zero context rows are not attended to


def encode_full(embedder: TextEmbedder, prompts: list[str], *, persistent: bool = False) -> torch.Tensor:
    """``(B, max_length, d)`` embeddings of ``prompts`` with every padding token, as the pipeline sees
    them; ``persistent``: prompts that do not depend on the concept, kept in the embedding cache. Where
    the denoiser masks padding out (:attr:`TextEmbedder.masked_context`) the rows stop at each prompt's
    end and are filled up with zeros to the full length (which :func:`attention_output` then masks)."""
    if persistent:
        jobs = [(p, None, None) for p in prompts]
        rows = [e.embeddings for e in EMBEDDINGS.encode(embedder, jobs, persistent=jobs)]
    else:
        rows = [e.embeddings for e in embedder.encode(prompts, extra_pad_tokens=None)]
    width = max(len(r) for r in rows)
    if embedder.masked_context:
        width = max(width, embedder.max_length)
    return torch.stack([torch.cat([r, r.new_zeros(width - len(r), r.shape[1])]) for r in rows])


@torch.no_grad()
def capture_queries(
    unet: torch.nn.Module,
    embedder: TextEmbedder,
    neutral: str,
    templates: list[str],
    *,
    per_layer: int,
    seed: int,
    max_size: int = 16,
) -> list[QueryLayer]:
    """Real cross-attention queries: the denoiser on noised latents with the empty and a few neutral
    prompts."""
    modules = cross_attention_modules(unet)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def hook(name: str):
        return lambda m, args, kwargs: captured[name].append(args[0] if args else kwargs["hidden_states"])

    hooks = [attn.register_forward_pre_hook(hook(name), with_kwargs=True) for name, attn in modules.items()]
    try:
        prompts = [""] + [filled(t, neutral) for t in templates[:3]]
        context = encode_full(embedder, prompts, persistent=True)
        size = min(sample_size(unet), max_size)
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(len(prompts), unet.config.in_channels, size, size, generator=generator)
        timesteps = torch.randint(50, 950, (len(prompts),), generator=generator)
        dtype, device = next(unet.parameters()).dtype, next(unet.parameters()).device
        run_denoiser(unet, latents.to(device, dtype), timesteps.to(device), context.to(device, dtype))
    finally:
        for handle in hooks:
            handle.remove()
    layers = []
    for name, attn in modules.items():
        hidden = torch.cat([_tokens(h) for h in captured[name]])
        pick = torch.randperm(len(hidden), generator=torch.Generator().manual_seed(seed))[:per_layer]
        query = attn.to_q(hidden[pick]).float()
        layers.append(
            QueryLayer(name, attn, query.reshape(len(pick), attn.heads, -1), embedder.masked_context)
        )
    return layers


def _tokens(hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states as rows of tokens, from ``(B, T, C)`` or ``(B, C, H, W)``."""
    if hidden.ndim == 3:
        return hidden.reshape(-1, hidden.shape[-1])
    return hidden.flatten(2).transpose(1, 2).reshape(-1, hidden.shape[1])


def layer_factors(params: TrainableFactors, name: str) -> LayerFactors:
    """Layer ``name``'s factors with the shared gate, as one :class:`LayerFactors` (no copies)."""
    p, gate = params[name], params["gate"]
    return LayerFactors(p["k_down"], p["k_up"], p["v_down"], p["v_up"], gate["weight"], gate["bias"])


KeysValues = tuple[torch.Tensor, torch.Tensor]  # one layer's unedited keys and values (B, T, d_k / d_v)


def unedited_keys_values(layers: list[QueryLayer], context: torch.Tensor) -> list[KeysValues]:
    """Every layer's ``(W_k c, W_v c)`` over ``context``: the adapter-independent bulk of
    :func:`attention_output`, worth keeping for prompts that are attended to many times."""
    with torch.no_grad():
        return [_projected(layer, context) for layer in layers]


def _projected(layer: QueryLayer, context: torch.Tensor) -> KeysValues:
    # detached: the model's own weights are never trained (no gradient is computed for or left on them)
    attn = layer.attn
    return (
        context @ projection_weight(kv_projections(attn)[0]).detach().float().T,
        context @ projection_weight(kv_projections(attn)[1]).detach().float().T,
    )


def attention_output(
    layer: QueryLayer,
    context: torch.Tensor,
    params: TrainableFactors | None,
    unedited: KeysValues | None = None,
) -> torch.Tensor:
    """Attention output of the layer's query bank over ``context`` (B, T, d): (B, n_q, d_v);
    ``unedited``: the layer's :func:`unedited_keys_values` of ``context``, if kept."""
    key, value = _projected(layer, context) if unedited is None else unedited
    if params is not None:
        delta_k, delta_v = layer_factors(params, layer.name).deltas(context)
        key, value = key + delta_k, value + delta_v
    batch, tokens, _ = key.shape
    heads = layer.queries.shape[1]
    key = key.view(batch, tokens, heads, -1).transpose(1, 2)
    value = value.view(batch, tokens, heads, -1).transpose(1, 2)
    query = layer.queries.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)
    mask = None
    if layer.masked:  # as the denoiser's encoder_attention_mask: padding rows (zero) are never attended to
        mask = (context.detach().abs().amax(-1) > 0)[:, None, None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, out.shape[2], -1)


def unedited_outputs(layers: list[QueryLayer], context: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention output over ``context`` without the adapter: the fixed targets of
    :func:`alignment_losses` (computed once per prompt, not at every step)."""
    with torch.no_grad():
        return [attention_output(layer, context, None) for layer in layers]


def alignment_losses(
    layers: list[QueryLayer],
    params: TrainableFactors,
    source: torch.Tensor,
    wanted: list[torch.Tensor],
    groups: list[int],
    unedited: list[KeysValues] | None = None,
) -> torch.Tensor:
    """Several losses from one batch: the rows of ``source`` (and of each layer's ``wanted`` output) are
    split into consecutive groups of the given sizes; loss ``i`` is the mean over layers of
    ``||Attn_edited(source_i) − wanted_i||² / ||wanted_i||²``. One attention pass per layer serves all
    groups (the trainer's erase and keep halves); ``unedited``: the source's kept
    :func:`unedited_keys_values`."""
    totals: list[torch.Tensor | float] = [0.0] * len(groups)
    for i_layer, (layer, want) in enumerate(zip(layers, wanted, strict=True)):
        got = attention_output(layer, source, params, None if unedited is None else unedited[i_layer])
        for i, (g, w) in enumerate(zip(got.split(groups), want.split(groups), strict=True)):
            totals[i] = totals[i] + ((g - w) ** 2).mean() / w.pow(2).mean().clamp_min(1e-8)
    return torch.stack([torch.as_tensor(t) for t in totals]) / len(layers)


def alignment_loss(
    layers: list[QueryLayer], params: TrainableFactors, source: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of ``||Attn_edited(source) − Attn(target)||² / ||Attn(target)||²``."""
    return alignment_losses(layers, params, source, unedited_outputs(layers, target), [len(source)])[0]


def detached(params: TrainableFactors) -> dict[str, dict[str, torch.Tensor]]:
    """The same factors without gradients (an adversary optimises its input, not the adapter)."""
    return {group: {k: v.detach() for k, v in values.items()} for group, values in params.items()}
