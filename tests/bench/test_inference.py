"""The fused configuration of the inference-overhead benchmark (on a tiny UNet: mechanics only)."""

import torch

from ace_diffusers.bench.inference import fused_kv_weights
from ace_diffusers.integration.attach import loaded_adapters
from ace_diffusers.integration.modules import cross_attention_modules
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline


def test_fused_weights_are_the_fused_model_and_the_unet_is_left_as_it_was():
    unet = tiny_sd_pipeline(seed=0).unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    adapter = random_adapter(unet, rank=4, gate_bias=2.0, concepts=("c0", "c1"))
    weights = fused_kv_weights(unet, adapter)
    modules = cross_attention_modules(unet)
    assert set(weights) == {f"{name}.{proj}" for name in modules for proj in ("to_k", "to_v")}
    for key, fused in weights.items():
        original = before[f"{key}.weight"]
        assert fused.shape == original.shape and not torch.equal(
            fused, original
        )  # the edit is in the weights
    after = unet.state_dict()
    assert set(after) == set(before) and all(
        torch.equal(after[k], v) for k, v in before.items()
    )  # unfused bit-exactly
    assert loaded_adapters(unet) == {} and {k: type(v) for k, v in unet.attn_processors.items()} == processors
