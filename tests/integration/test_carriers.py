"""ControlNets carry the adapters too: their residuals read the prompt through the same layers."""

import warnings

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from diffusers.models.controlnets import MultiControlNetModel

from ace_diffusers import erase_concept
from ace_diffusers.errors import ACECompatibilityError
from ace_diffusers.integration.attach import loaded_adapters
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline


def controlnet_for(pipe, seed=0):
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # from_unet zero-initialises the residual convs: make them say something
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 0.1)
    return net


def controlnet_pipe(controlnet=None, base=None):
    base = base or tiny_sd_pipeline()
    pipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in base.components.items() if k != "image_encoder"},
        controlnet=controlnet or controlnet_for(base),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def residuals(net, pipe):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    context = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
    image = torch.rand(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        down, mid = net(sample, 10, context, controlnet_cond=image, return_dict=False)
    return torch.cat([t.flatten() for t in (*down, mid)])


def strong_adapter(pipe):
    return random_adapter(pipe.unet, magnitude=2.0, gate_bias=4.0)


def test_loading_through_the_pipeline_erases_the_controlnet(sd_pipe):
    pipe = controlnet_pipe(base=sd_pipe)
    stock = residuals(pipe.controlnet, pipe)
    name = pipe.load_ace_adapter(strong_adapter(pipe))
    assert list(loaded_adapters(pipe.controlnet)) == [name]
    assert set(loaded_adapters(pipe.controlnet)[name].layers) < set(loaded_adapters(pipe.unet)[name].layers)
    erased = residuals(pipe.controlnet, pipe)
    assert not torch.equal(erased, stock)
    pipe.set_ace_adapters(name, 0.0)
    assert torch.equal(residuals(pipe.controlnet, pipe), stock)  # bit-identical when off
    pipe.set_ace_adapters(name, 1.0)
    pipe.disable_ace_adapters()
    assert torch.equal(residuals(pipe.controlnet, pipe), stock)
    pipe.enable_ace_adapters()
    assert torch.equal(residuals(pipe.controlnet, pipe), erased)
    with pytest.raises(ACECompatibilityError, match="ControlNet"):
        pipe.fuse_ace_adapter(name)
    pipe.unload_ace_adapter()
    assert loaded_adapters(pipe.controlnet) == {} and torch.equal(residuals(pipe.controlnet, pipe), stock)


def test_every_net_of_a_multi_controlnet_is_erased(sd_pipe):
    nets = MultiControlNetModel([controlnet_for(sd_pipe, 1), controlnet_for(sd_pipe, 2)])
    pipe = controlnet_pipe(nets, base=sd_pipe)
    name = pipe.load_ace_adapter(strong_adapter(pipe))
    assert all(list(loaded_adapters(net)) == [name] for net in nets.nets)


def test_erase_concept_erases_the_controlnet_too(sd_pipe):
    pipe = controlnet_pipe(base=sd_pipe)
    erase_concept(pipe, "Van Gogh", kind="style")
    assert len(loaded_adapters(pipe.controlnet)) == 1


def test_a_bare_controlnet_joining_an_erased_unet_warns_once_at_run_time(sd_pipe):
    sd_pipe.load_ace_adapter(strong_adapter(sd_pipe))
    pipe = StableDiffusionControlNetPipeline.from_pipe(sd_pipe, controlnet=controlnet_for(sd_pipe))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    call = dict(image=image, num_inference_steps=2, height=32, width=32, output_type="pt")
    with pytest.warns(UserWarning, match="ControlNet that carries no adapter") as caught:
        pipe("a photo of a cat", **call)
    assert sum("carries no adapter" in str(w.message) for w in caught) == 1  # once, not per step
    erased = controlnet_pipe(base=tiny_sd_pipeline())
    erased.load_ace_adapter(strong_adapter(erased))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an erased ControlNet: silent
        erased("a photo of a cat", **call)
