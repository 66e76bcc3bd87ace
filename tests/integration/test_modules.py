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


def test_flux_and_sd3_transformers_are_found_with_every_block_that_reads_text():
    from ace_diffusers.integration.modules import kv_projection_names, single_stream_layers
    from ace_diffusers.testing_transformers import tiny_flux_pipeline, tiny_sd3_pipeline

    flux = tiny_flux_pipeline()
    assert get_unet(flux) is flux.transformer
    modules = cross_attention_modules(flux.transformer)
    assert list(modules) == [
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    ]
    assert kv_projection_names(modules["transformer_blocks.0.attn"]) == ("add_k_proj", "add_v_proj")
    assert kv_projection_names(modules["single_transformer_blocks.0.attn"]) == ("to_k", "to_v")
    assert single_stream_layers(flux.transformer) == list(modules)[1:]
    sd3 = tiny_sd3_pipeline()
    assert get_unet(sd3) is sd3.transformer and single_stream_layers(sd3.transformer) == []
    with pytest.raises(ACECompatibilityError, match="joint attention of SD3 and FLUX"):
        get_unet(types.SimpleNamespace(transformer=torch.nn.Linear(2, 2)))
