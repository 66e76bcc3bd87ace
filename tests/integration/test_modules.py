"""Finding what ACE edits inside a diffusers model."""

import types

import pytest
import torch
from peft import LoraConfig

from ace_diffusers.errors import ACECompatibilityError
from ace_diffusers.integration.modules import (
    attention_modules,
    cross_attention_modules,
    get_unet,
    has_cross_attention,
    layer_shapes,
    projection_weight,
    unwrap_model,
)


def test_the_cross_attention_layers_and_their_shapes(sd_pipe):
    unet = sd_pipe.unet
    cross = cross_attention_modules(unet)
    assert cross and all(name.endswith("attn2") for name in cross)
    assert set(cross) < set(attention_modules(unet)) and has_cross_attention(unet)
    d_text = sd_pipe.text_encoder.config.hidden_size
    assert all(shape[0] == d_text for shape in layer_shapes(unet).values())
    assert list(layer_shapes(unet)) == list(cross)


def test_get_unet_takes_a_pipeline_or_a_unet_and_refuses_others(sd_pipe):
    assert get_unet(sd_pipe) is sd_pipe.unet and get_unet(sd_pipe.unet) is sd_pipe.unet
    with pytest.raises(ACECompatibilityError, match="no UNet or transformer with cross-attention"):
        get_unet(types.SimpleNamespace(unet=torch.nn.Linear(2, 2)))


def test_compiled_models_are_unwrapped(sd_pipe):
    compiled = torch.compile(sd_pipe.unet)  # wrapping only: nothing is compiled until it runs
    assert unwrap_model(compiled) is sd_pipe.unet
    assert list(cross_attention_modules(compiled)) == list(cross_attention_modules(sd_pipe.unet))


def test_projection_weight_sees_through_peft_lora_layers(sd_pipe):
    unet = sd_pipe.unet
    name, attn = next(iter(cross_attention_modules(unet).items()))
    before = projection_weight(attn.to_k)
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_k"]))
    assert not hasattr(attn.to_k, "weight") or attn.to_k.weight is before
    assert projection_weight(attn.to_k) is before


def test_flux_is_refused_by_name_and_sd3_is_found():
    from diffusers import FluxTransformer2DModel

    from ace_diffusers.testing_transformers import tiny_sd3_pipeline

    flux = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    with pytest.raises(
        ACECompatibilityError, match=r"FLUX \(its own FluxAttention modules\) is not supported"
    ):
        get_unet(types.SimpleNamespace(transformer=flux))
    sd3 = tiny_sd3_pipeline()
    assert get_unet(sd3) is sd3.transformer
