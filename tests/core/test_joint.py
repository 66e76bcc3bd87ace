"""The ACE joint-attention processor (SD3): exact when off, on every kind of SD3 block."""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from ace_diffusers.core.joint import ACEJointAttnProcessor
from ace_diffusers.integration.attach import attach_adapter, detach_adapter, set_active_adapters
from ace_diffusers.integration.modules import attention_modules, cross_attention_modules
from ace_diffusers.testing import random_adapter


def _sd3(dual):
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,  # the last block is context_pre_only: no text output projection
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        qk_norm="rms_norm",
        dual_attention_layers=dual,  # SD3.5: a second, image-only attention in these blocks
    ).eval()


@pytest.mark.parametrize("dual", [(), (0,)])
def test_joint_attention_carries_the_delta_on_text_keys_and_values_only(dual):
    model = _sd3(dual)
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 5, 16, generator=generator)
    pooled = torch.randn(2, 12, generator=generator)

    def run():
        with torch.no_grad():
            return model(
                latents,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=torch.tensor([10, 500]),
            ).sample

    base = run()
    assert list(cross_attention_modules(model)) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    attach_adapter(model, random_adapter(model, rank=4), "a")
    assert {type(m.processor) for m in attention_modules(model).values()} == {ACEJointAttnProcessor}
    changed = run()
    assert not torch.equal(changed, base)
    model.set_attn_processor(JointAttnProcessor2_0())  # a stock processor set under ACE keeps the erasure
    assert torch.equal(run(), changed)
    set_active_adapters(model, "a", 0.0)
    assert torch.equal(run(), base)  # every multiplier at zero: JointAttnProcessor2_0 bit for bit
    detach_adapter(model, "a")
    assert torch.equal(run(), base)
    assert {type(m.processor) for m in attention_modules(model).values()} == {JointAttnProcessor2_0}
