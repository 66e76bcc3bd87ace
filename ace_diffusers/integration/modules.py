"""Finding what ACE edits inside a diffusers model: the UNet, its attention modules, their projections.

Public helpers used by every layer above (attach, fitters, deploy, eval); each accepts a
``torch.compile``-wrapped model too.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_flux import FluxAttention
from torch import nn

from ..core.flux import is_single_stream
from ..errors import ACECompatibilityError

ATTENTION_TYPES = (Attention, FluxAttention)  # diffusers' attention modules (FLUX has its own class)


def unwrap_model(module: Any) -> Any:
    """The module behind ``torch.compile`` wrappers (``OptimizedModule._orig_mod``)."""
    while isinstance(module, nn.Module) and isinstance(
        module.__dict__.get("_modules", {}).get("_orig_mod"), nn.Module
    ):
        module = module._orig_mod
    return module


def attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Every diffusers attention module (``Attention``, FLUX's ``FluxAttention``), by qualified name."""
    unet = unwrap_model(unet)
    return {name: module for name, module in unet.named_modules() if isinstance(module, ATTENTION_TYPES)}


def reads_text(attn: nn.Module) -> bool:
    """Whether ``attn``'s keys/values are computed from text tokens: a cross-attention (``attn2`` of SD
    UNets and PixArt/Sana), a joint attention (SD3's and FLUX's double-stream blocks: the text tokens'
    own ``add_k_proj`` / ``add_v_proj``, joined with the image tokens) or a FLUX single-stream attention
    (text rows first, through the same ``to_k`` / ``to_v`` as the image rows)."""
    if isinstance(attn, FluxAttention):
        return True
    return isinstance(attn, Attention) and (attn.is_cross_attention or is_joint(attn))


def is_joint(attn: nn.Module) -> bool:
    """A joint attention: text tokens get their own K/V projections (``add_k_proj``, ``add_v_proj``)."""
    return isinstance(getattr(attn, "add_k_proj", None), nn.Module) and not getattr(
        attn, "is_cross_attention", False
    )


def single_stream_layers(unet: nn.Module) -> list[str]:
    """Names of the FLUX single-stream attentions: their ``to_k``/``to_v`` also project the image rows, so
    no weight edit can carry a text-only delta there (fuse and LoRA export refuse them)."""
    return [name for name, m in cross_attention_modules(unet).items() if is_single_stream(m)]


def kv_projections(attn: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The projections that turn text tokens into keys and values: ``(to_k, to_v)`` of a cross-attention,
    ``(add_k_proj, add_v_proj)`` of a joint one."""
    names = kv_projection_names(attn)
    return getattr(attn, names[0]), getattr(attn, names[1])


def kv_projection_names(attn: nn.Module) -> tuple[str, str]:
    return ("add_k_proj", "add_v_proj") if is_joint(attn) else ("to_k", "to_v")


def cross_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Attention modules whose K/V read the text (:func:`reads_text`): ``attn2`` in SD UNets and
    PixArt/Sana, every block's ``attn`` in SD3 and FLUX."""
    return {name: m for name, m in attention_modules(unet).items() if reads_text(m)}


def has_cross_attention(unet: nn.Module) -> bool:
    """Whether any attention module reads text tokens (stops at the first one found)."""
    return any(reads_text(m) for m in unwrap_model(unet).modules())


def projection_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of ``to_k``/``to_v``; PEFT-wrapped layers expose their base layer's."""
    weight = getattr(linear, "weight", None)
    if weight is None:
        weight = linear.base_layer.weight
    return weight


def layer_shapes(unet: nn.Module) -> dict[str, tuple[int, int, int]]:
    """``{layer name: (d_text, d_k, d_v)}`` for every cross-attention layer: the architecture fingerprint."""
    shapes = {}
    for name, attn in cross_attention_modules(unet).items():
        k_weight, v_weight = (projection_weight(p) for p in kv_projections(attn))
        shapes[name] = (k_weight.shape[1], k_weight.shape[0], v_weight.shape[0])
    return shapes


def get_unet(pipe_or_unet: Any) -> nn.Module:
    """The denoiser whose cross-attention ACE edits: ``pipe.unet`` (SD 1.x/2.x, SDXL) or ``pipe.transformer``
    (PixArt-α/Σ, Sana: transformers with ordinary cross-attention), or such a model itself."""
    if isinstance(pipe_or_unet, UNet2DConditionModel):
        return pipe_or_unet
    if isinstance(pipe_or_unet, nn.Module) and has_cross_attention(pipe_or_unet):
        return pipe_or_unet
    for attr in DENOISER_ATTRIBUTES:
        model = getattr(pipe_or_unet, attr, None)
        if isinstance(model, nn.Module) and has_cross_attention(model):
            return model
    raise ACECompatibilityError(
        f"{type(pipe_or_unet).__name__} has no UNet or transformer with cross-attention (pipe.unet, "
        "pipe.transformer); "
        "ACE adapters work on Stable Diffusion-style pipelines (SD 1.x/2.x, SDXL, their img2img/inpaint "
        "variants), on cross-attention transformers (PixArt-α/Σ, Sana) and on the joint attention of SD3 "
        "and FLUX."
    )


DENOISER_ATTRIBUTES = ("unet", "transformer")


def find_denoiser(pipe: Any) -> nn.Module | None:
    """:func:`get_unet`, or None for a pipeline loaded without its denoiser (text components only)."""
    try:
        return get_unet(pipe)
    except ACECompatibilityError:
        return None


def reads_joint_text(pipe: Any) -> bool:
    """Whether ``pipe``'s denoiser reads the text through joint attention (SD3, FLUX); False without
    one."""
    model = find_denoiser(pipe)
    return model is not None and any(is_joint(m) for m in cross_attention_modules(model).values())


def context_projection(model: nn.Module) -> nn.Module | None:
    """The layers a transformer runs on the text encoder's output before its cross-attention reads it —
    PixArt: ``caption_projection``; Sana: ``caption_projection`` then ``caption_norm`` (per token) — or
    None (UNets read the encoder output itself)."""
    model = unwrap_model(model)
    if isinstance(model, UNet2DConditionModel):
        return None
    projection = getattr(model, "caption_projection", None)
    if not isinstance(projection, nn.Module):
        return None
    norm = getattr(model, "caption_norm", None)
    return nn.Sequential(projection, norm) if isinstance(norm, nn.Module) else projection


def pooled_embedding_module(unet: nn.Module) -> nn.Module | None:
    """The module that reads the pooled text embedding first, or None. SDXL-style UNets (and their
    ControlNets) with ``addition_embed_type="text_time"`` feed ``[text_embeds, embedded time ids]`` to
    ``add_embedding``; SD3 feeds ``pooled_projections`` alone to ``time_text_embed.text_embedder``."""
    unet = unwrap_model(unet)
    if getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time":
        module = getattr(unet, "add_embedding", None)
    else:
        module = getattr(getattr(unet, "time_text_embed", None), "text_embedder", None)
    return module if isinstance(getattr(module, "linear_1", None), nn.Module) else None


def pooled_module_name(unet: nn.Module) -> str:
    """The qualified name of :func:`pooled_embedding_module`'s first linear layer (``add_embedding.linear_1``,
    ``time_text_embed.text_embedder.linear_1``)."""
    target = pooled_embedding_module(unet).linear_1
    return next(name for name, m in unwrap_model(unet).named_modules() if m is target)


def pooled_width_problem(unet: nn.Module, dim: int) -> str | None:
    """Why a pooled edit of width ``dim`` cannot sit on ``unet``'s pooled input, or None if it can."""
    module = pooled_embedding_module(unet)
    if module is None:
        return "this model reads no pooled text embedding"
    width = projection_weight(module.linear_1).shape[1]
    if getattr(unwrap_model(unet).config, "addition_embed_type", None) != "text_time":
        return None if dim == width else f"its pooled projection reads {width} features"
    step = getattr(unwrap_model(unet).config, "addition_time_embed_dim", None) or 1
    if not 0 < dim < width or (width - dim) % step:
        return (
            f"its add_embedding reads {width} features, which is not a {dim}-d pooled embedding followed by "
            f"{step}-d time-id embeddings"
        )
    return None
