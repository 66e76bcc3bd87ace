"""Embedding-space adversaries: the concept's tokens are found, and the adversary slips through the
adapter better than the concept's own prompt does."""

import torch

from ace_diffusers.fitting.adversary import concept_tokens, soft_adversary
from ace_diffusers.fitting.attention import attention_output, capture_queries, detached, encode_full
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.testing import random_adapter

from .test_attention import trainable


def test_concept_tokens_cover_every_piece(sd_pipe):
    embedder = TextEmbedder(sd_pipe)
    prompt = "a painting by Vincent van Gogh"
    tokens, span = concept_tokens(embedder, prompt, prompt.index("Vincent"), "Vincent van Gogh")
    words = sd_pipe.tokenizer.convert_ids_to_tokens(tokens["input_ids"][0, span].tolist())
    assert "".join(words).replace("</w>", "") == "vincentvangogh"


def _gap(layers, params, context, wanted):
    return sum(
        float(((attention_output(layer, context, params) - w) ** 2).mean() / w.pow(2).mean())
        for layer, w in zip(layers, wanted, strict=True)
    )


def test_the_adversary_slips_through_better_than_the_concept(sd_pipe):
    embedder = TextEmbedder(sd_pipe)
    layers = capture_queries(sd_pipe.unet, embedder, "art", ["a painting by {}"], per_layer=8, seed=0)
    params = detached(trainable(random_adapter(sd_pipe.unet, gate_bias=2.0, magnitude=2.0)))
    prompt = "a painting by Van Gogh"
    original = encode_full(embedder, [prompt])
    wanted = [attention_output(layer, original, None) for layer in layers]
    torch.manual_seed(0)
    found = soft_adversary(
        embedder, layers, params, prompt, (prompt.index("Van"), "Van Gogh"), radius=0.25, steps=8
    )
    assert found.shape == original.shape and not found.requires_grad
    assert _gap(layers, params, found, wanted) < _gap(layers, params, original, wanted)
    beyond = (len(prompt) + 1, "Monet")  # no token there (e.g. truncated away): nothing to perturb
    assert soft_adversary(embedder, layers, params, prompt, beyond, radius=0.25, steps=2) is None
