"""Fixtures of the evaluation-suite tests: tiny random CLIP, a random shapes classifier, a cheap judge."""

from __future__ import annotations

import pytest
import torch


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


@pytest.fixture(scope="session")
def clip_model():
    return tiny_clip()


@pytest.fixture(scope="session")
def clip_tok():
    from ace_diffusers.testing import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="session")
def random_classifier():
    """The miniature world's classifier architecture with random weights (labels are arbitrary but fixed)."""
    from ace_diffusers.shapes.classifier import ShapesClassifier

    torch.manual_seed(0)
    return ShapesClassifier(width=8).eval()


def colour_judge_function(concept: str, other: str):
    """A deterministic judge for tests: 'concept' when the image is redder than it is blue."""

    def judge(images: torch.Tensor) -> list[str]:
        red, blue = images[:, 0].mean(dim=(1, 2)), images[:, 2].mean(dim=(1, 2))
        return [concept if r > b else other for r, b in zip(red.tolist(), blue.tolist(), strict=True)]

    return judge


def cat_plan():
    """A prompt plan with every group kind: erased, synonyms, others, a prompt attack and a soft prompt."""
    from ace_diffusers.eval.plans import prompt_plan

    return prompt_plan(
        "cat",
        templates=["a photo of {}", "{}"],
        synonyms=["kitten"],
        others=["dog", "car"],
        neutral="animal",
        images_per_prompt=2,
        attacks=["misspelling", "soft_prompt"],
        soft_prompts=1,
    )


@pytest.fixture
def erased_pipe(sd_pipe):
    """The tiny pipeline with a random adapter whose gate is open: every prompt is changed, which is all
    the attacks' mechanics need."""
    from ace_diffusers.testing import random_adapter

    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, gate_bias=6.0, magnitude=2.0), "erase")
    return sd_pipe


def encode(pipe, text):
    """The pipeline's prompt embeddings of ``text``."""
    return pipe.encode_prompt(text, pipe._execution_device, 1, False)[0]
