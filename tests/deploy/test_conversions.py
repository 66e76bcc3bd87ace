"""AnimateDiff-style conversions (``UNetMotionModel.from_unet2d``) keep the source UNet's erasure."""

import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, UNetMotionModel

import ace_diffusers
from ace_diffusers.core.processor import ACEAttnProcessor
from ace_diffusers.testing import random_adapter


def tiny_motion_adapter():
    torch.manual_seed(0)
    return MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=2,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
    )


def frames_of(video):
    generator = torch.Generator().manual_seed(0)
    return video(
        "a photo of a cat",
        num_frames=2,
        num_inference_steps=1,
        height=32,
        width=32,
        output_type="pt",
        generator=generator,
    ).frames


def test_animatediff_from_pipe_carries_the_adapters_in_their_state(sd_pipe):
    a = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, seed=1, magnitude=2.0, gate_bias=4.0), "a")
    b = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, seed=2), "b", scale=0.5)
    sd_pipe.set_ace_adapters([a])  # b loaded but inactive
    video = AnimateDiffPipeline.from_pipe(sd_pipe, motion_adapter=tiny_motion_adapter())
    assert isinstance(video.unet, UNetMotionModel) and video.unet is not sd_pipe.unet
    assert video.get_list_ace_adapters() == [a, b] and video.get_active_ace_adapters() == [a]
    assert ace_diffusers.integration.attach.adapter_scale(video.unet, b) == 0.5
    video.set_progress_bar_config(disable=True)
    erased = frames_of(video)
    assert erased.shape[1] == 2 and torch.isfinite(erased).all()
    video.disable_ace_adapters()
    assert not torch.equal(frames_of(video), erased)  # the erasure is in effect in the video UNet
    video.enable_ace_adapters()
    assert torch.equal(frames_of(video), erased)


def test_a_stock_pipeline_converts_as_in_diffusers(sd_pipe):
    video = AnimateDiffPipeline.from_pipe(sd_pipe, motion_adapter=tiny_motion_adapter())
    assert video.get_list_ace_adapters() == []
    assert not any(isinstance(p, ACEAttnProcessor) for p in video.unet.attn_processors.values())


def test_remove_pipeline_methods_restores_diffusers_conversion():
    wrapped = UNetMotionModel.__dict__["from_unet2d"]
    ace_diffusers.remove_pipeline_methods()
    try:
        assert UNetMotionModel.__dict__["from_unet2d"] is not wrapped
        assert UNetMotionModel.from_unet2d.__func__.__module__.startswith("diffusers")
    finally:
        ace_diffusers.install_pipeline_methods()
    assert UNetMotionModel.from_unet2d.__func__.__module__ == "ace_diffusers._verbs"


def test_fused_adapters_arrive_fused_and_can_be_unfused(sd_pipe):
    stock_video = AnimateDiffPipeline.from_pipe(sd_pipe, motion_adapter=tiny_motion_adapter())
    stock_video.set_progress_bar_config(disable=True)
    stock = frames_of(stock_video)
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, magnitude=0.2))
    sd_pipe.fuse_ace_adapter(name, prompt_sets={"check": ["a photo of a cat"]})
    video = AnimateDiffPipeline.from_pipe(sd_pipe, motion_adapter=tiny_motion_adapter())
    video.set_progress_bar_config(disable=True)
    fused = frames_of(video)
    assert video.get_active_ace_adapters() == []  # the gated path stays off: the weights carry it
    assert not torch.equal(fused, stock)
    assert video.unfuse_ace_adapter() == [name]
    video.disable_ace_adapters()
    assert torch.equal(frames_of(video), stock)  # the original weights came back bit for bit
