"""Loading the miniature-world pipeline offline and generating with it."""

from __future__ import annotations

import time

import pytest
import torch

from ace_diffusers.shapes.pipeline import DEFAULT_SAMPLER, TOKENIZER_MAX_LENGTH, generate

from .conftest import NEEDS_WEIGHTS


def test_default_sampler():
    assert DEFAULT_SAMPLER["height"] == 32 and DEFAULT_SAMPLER["width"] == 64  # two 32x32 slots
    assert DEFAULT_SAMPLER["num_inference_steps"] > 0 and DEFAULT_SAMPLER["guidance_scale"] > 1


@NEEDS_WEIGHTS
def test_loader_is_fast_and_offline():
    from ace_diffusers.shapes.pipeline import load_shapes_pipeline

    t0 = time.time()
    pipe = load_shapes_pipeline()
    assert time.time() - t0 < 30  # a few seconds on an idle 2-core CPU
    assert pipe.unet.training is False


@NEEDS_WEIGHTS
def test_pipeline_components(shapes_pipe):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.models.attention_processor import Attention
    from transformers import BertModel

    pipe = shapes_pipe
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, BertModel)
    assert pipe.safety_checker is None
    assert pipe.unet.config.cross_attention_dim == 384
    assert pipe.tokenizer.model_max_length == TOKENIZER_MAX_LENGTH == 24
    attn2 = [m for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    assert attn2 and all(isinstance(m, Attention) and m.is_cross_attention for m in attn2)
    emb, _ = pipe.encode_prompt("a red circle", "cpu", 1, False)
    assert emb.shape == (1, 24, 384)
    assert all(not p.requires_grad for p in pipe.text_encoder.parameters())


@NEEDS_WEIGHTS
def test_generate_smoke(shapes_pipe):
    imgs = generate(shapes_pipe, ["a red circle", "a blue square"], seeds=[0, 1], num_inference_steps=4)
    assert imgs.shape == (2, 3, 32, 64) and imgs.dtype == torch.float32
    assert imgs.min() >= 0 and imgs.max() <= 1
    again = generate(shapes_pipe, ["a blue square"], seeds=[1], num_inference_steps=4)
    assert torch.allclose(imgs[1:], again, atol=1e-5)  # per-image seeds: independent of batching


@NEEDS_WEIGHTS
def test_the_scheduler_is_zero_terminal_snr_v_prediction(shapes_pipe):
    config = shapes_pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing"  # the first step starts from pure noise


@pytest.mark.slow
@NEEDS_WEIGHTS
def test_generated_images_are_recognised(shapes_pipe, shapes_classifier):
    prompts = ["a red circle", "a blue square", "a yellow star", "a green heart"]
    imgs = generate(shapes_pipe, [p for p in prompts for _ in range(4)], seeds=list(range(16)))
    pred = shapes_classifier.predict(imgs)
    want_shape = [p.split()[-1] for p in prompts for _ in range(4)]
    want_colour = [p.split()[1] for p in prompts for _ in range(4)]
    assert sum(a == b for a, b in zip(pred["shape"], want_shape, strict=True)) >= 14
    assert sum(a == b for a, b in zip(pred["colour"], want_colour, strict=True)) >= 14
    pair = shapes_classifier.predict(generate(shapes_pipe, ["a red circle and a blue square"] * 4, seeds=0))
    assert pair["left_shape"].count("circle") >= 3 and pair["right_shape"].count("square") >= 3
    blank = shapes_classifier.predict(
        generate(shapes_pipe, ["", "nothing", "a red", "a photo of a object"], seeds=0)
    )
    assert blank["shape"].count("none") >= 3
