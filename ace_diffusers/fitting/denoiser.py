"""One forward of a pipeline's denoiser on given cross-attention context, for capturing what its layers see.

The fitters run the denoiser only to record its cross-attention *queries* (image tokens) on noised
latents; the text side they feed is the context the cross-attention reads
(:class:`~ace_diffusers.fitting.text.TextEmbedder`'s rows). A UNet reads that context as it is. A
cross-attention transformer (PixArt, Sana) first runs the text encoder's output through its caption
projection (:func:`~ace_diffusers.integration.modules.context_projection`): it gets a placeholder of
the encoder's width, and a forward hook makes the projection return the given context, so every block
reads exactly that.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..integration.modules import context_projection, unwrap_model


def sample_size(model: nn.Module) -> int:
    """The latent side the denoiser was configured for (its first one when it has two)."""
    size = unwrap_model(model).config.sample_size
    return size if isinstance(size, int) else size[0]


def run_denoiser(
    model: nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
) -> Any:
    """``model`` on ``latents`` at ``timesteps`` with cross-attention context ``context`` (B, T, d)."""
    inner = unwrap_model(model)
    if isinstance(inner, UNet2DConditionModel) or context_projection(inner) is None:
        return model(latents, timesteps, encoder_hidden_states=context, **_unet_kwargs(inner, latents))
    last = _last_module(context_projection(inner))
    handle = last.register_forward_hook(lambda module, args, output: context.to(output.dtype))
    try:
        placeholder = context.new_zeros(*context.shape[:2], inner.config.caption_channels)
        kwargs: dict[str, Any] = {}
        if "added_cond_kwargs" in inspect.signature(inner.forward).parameters:
            kwargs["added_cond_kwargs"] = _resolution_kwargs(inner, latents)
        return model(hidden_states=latents, encoder_hidden_states=placeholder, timestep=timesteps, **kwargs)
    finally:
        handle.remove()


def _last_module(module: nn.Module) -> nn.Module:
    return module[-1] if isinstance(module, nn.Sequential) else module


def _resolution_kwargs(model: nn.Module, latents: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """PixArt's micro-conditions: image size and aspect ratio (used by its 1024-px models only)."""
    if not getattr(model, "use_additional_conditions", False):
        return {"resolution": None, "aspect_ratio": None}
    batch, _, height, width = latents.shape
    size = torch.tensor([[height * 8, width * 8]] * batch, dtype=latents.dtype, device=latents.device)
    ratio = torch.tensor([[height / width]] * batch, dtype=latents.dtype, device=latents.device)
    return {"resolution": size, "aspect_ratio": ratio}


def _unet_kwargs(unet: nn.Module, latents: torch.Tensor) -> dict[str, Any]:
    """The extra conditioning an SDXL-style UNet needs (zeros: only the queries' shapes matter)."""
    config = unet.config
    if getattr(config, "addition_embed_type", None) != "text_time":
        return {}
    batch, size = latents.shape[0], latents.shape[-1]
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    ids = [[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch
    return {
        "added_cond_kwargs": {
            "text_embeds": latents.new_zeros(batch, pooled_dim),
            "time_ids": torch.tensor(ids, device=latents.device, dtype=latents.dtype),
        }
    }
