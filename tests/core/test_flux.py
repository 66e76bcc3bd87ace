"""The ACE processor for FLUX: exact when off, the delta on text rows only, in both kinds of block."""

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ace_diffusers.core.flux import ACEFluxAttnProcessor, single_stream_blocks
from ace_diffusers.core.processor import get_stack
from ace_diffusers.errors import ACECompatibilityError
from ace_diffusers.fitting.joint import flux_image_ids
from ace_diffusers.integration.attach import attach_adapter, detach_adapter, set_active_adapters
from ace_diffusers.integration.modules import attention_modules, cross_attention_modules
from ace_diffusers.testing import random_adapter
from ace_diffusers.testing_transformers import tiny_flux_pipeline


@pytest.fixture()
def flux():
    return tiny_flux_pipeline().transformer.eval()


def _inputs(model, text_length=6):
    generator = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 16, 16, generator=generator),
        encoder_hidden_states=torch.randn(
            2, text_length, model.config.joint_attention_dim, generator=generator
        ),
        pooled_projections=torch.randn(2, 16, generator=generator),
        timestep=torch.tensor([0.2, 0.7]),
        img_ids=flux_image_ids(4),
        txt_ids=torch.zeros(text_length, 3),
    )


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def test_flux_attention_carries_the_delta_exactly_when_on_and_is_stock_when_off(flux):
    inputs = _inputs(flux)
    base = _run(flux, inputs)
    attach_adapter(flux, random_adapter(flux, rank=4, pooled_dim=16), "a")
    assert {type(m.processor) for m in attention_modules(flux).values()} == {ACEFluxAttnProcessor}
    changed = _run(flux, inputs)
    assert not torch.equal(changed, base)
    flux.set_attn_processor(FluxAttnProcessor())  # a stock processor set under ACE keeps the erasure
    assert torch.equal(_run(flux, inputs), changed)
    set_active_adapters(flux, "a", 0.0)
    assert torch.equal(_run(flux, inputs), base)  # every multiplier at zero: FluxAttnProcessor bit for bit
    detach_adapter(flux, "a")
    assert torch.equal(_run(flux, inputs), base)
    assert {type(m.processor) for m in attention_modules(flux).values()} == {FluxAttnProcessor}
    assert all(not block._forward_pre_hooks for block in single_stream_blocks(flux))  # hooks gone too


def test_a_single_stream_attention_edits_its_text_rows_and_never_its_image_rows(flux):
    attn = cross_attention_modules(flux)["single_transformer_blocks.0.attn"]
    keys = []
    handle = attn.norm_k.register_forward_hook(lambda m, args, out: keys.append(args[0].detach().clone()))
    x = torch.randn(2, 9, attn.to_k.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = attn(hidden_states=x)
        attach_adapter(flux, random_adapter(flux, rank=4, pooled_dim=16), "a")
        with pytest.raises(ACECompatibilityError, match="text length"):  # called directly: give the length
            attn(hidden_states=x)
        edited = attn(hidden_states=x, ace_text_length=3)
        stack = get_stack(attn)
        delta_k = stack.adapters["a"].deltas(x[:, :3], stack.adapters["a"].multiplier(stack.enabled))[0]
    handle.remove()
    stock_key, edited_key = (k.flatten(2) for k in keys)  # (batch, rows, inner): what norm_k received
    assert torch.equal(edited_key[:, 3:], stock_key[:, 3:])  # the image rows: untouched
    torch.testing.assert_close(edited_key[:, :3], stock_key[:, :3] + delta_k)  # the text rows: + the delta
    assert not torch.allclose(edited, stock)


def test_gradient_checkpointing_passes_the_text_length_too(flux):
    inputs = _inputs(flux)
    attach_adapter(flux, random_adapter(flux, rank=4, pooled_dim=16), "a")
    expected = _run(flux, inputs)
    flux.enable_gradient_checkpointing()  # the blocks are then called positionally
    with torch.enable_grad():
        out = flux(**inputs).sample
    torch.testing.assert_close(out.detach(), expected)


def test_fused_qkv_projections_are_refused_while_loaded_and_before_loading(flux):
    attach_adapter(flux, random_adapter(flux, rank=4, pooled_dim=16), "a")
    with pytest.raises(ACECompatibilityError, match="fused QKV"):
        flux.fuse_qkv_projections()
    assert not any(getattr(m, "fused_projections", False) for m in attention_modules(flux).values())
    detach_adapter(flux, "a")
    flux.fuse_qkv_projections()
    with pytest.raises(ACECompatibilityError, match="fused QKV projections"):
        attach_adapter(flux, random_adapter(flux, rank=4, pooled_dim=16), "b")
    assert {type(m.processor) for m in attention_modules(flux).values()} == {FluxAttnProcessor}
