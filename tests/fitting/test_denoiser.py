"""The fitters' denoiser forward: every cross-attention reads the context it is given."""

import torch

from ace_diffusers.fitting.denoiser import run_denoiser, sample_size
from ace_diffusers.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from ace_diffusers.testing_transformers import tiny_pixart_pipeline


def _read_by_first_cross_attention(model, latents, context):
    seen = []
    attn = next(m for n, m in model.named_modules() if n.endswith("attn2"))
    handle = attn.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            run_denoiser(model, latents, torch.tensor([10, 900]), context)
    finally:
        handle.remove()
    return seen[0]


def test_unets_and_transformers_read_the_given_context():
    generator = torch.Generator().manual_seed(0)
    pixart = tiny_pixart_pipeline().transformer
    for model in (tiny_sd_pipeline().unet, tiny_sdxl_pipeline().unet, pixart):
        size = sample_size(model)
        latents = torch.randn(2, model.config.in_channels, size, size, generator=generator)
        width = next(m for n, m in model.named_modules() if n.endswith("attn2")).to_k.in_features
        context = torch.randn(2, 7, width, generator=generator)
        assert torch.equal(_read_by_first_cross_attention(model, latents, context), context), type(
            model
        ).__name__
    assert not pixart.caption_projection._forward_hooks  # the stand-in hook is removed again
