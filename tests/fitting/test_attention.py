"""The trainer's objective: attention outputs of real queries with and without the gated edit."""

import torch

from ace_diffusers.core.factors import LayerFactors
from ace_diffusers.fitting.attention import (
    alignment_loss,
    attention_output,
    capture_queries,
    detached,
    encode_full,
    layer_factors,
)
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.integration.modules import cross_attention_modules, projection_weight
from ace_diffusers.testing import random_adapter


def trainable(adapter):
    first = next(iter(adapter.layers.values()))
    params = {"gate": {"weight": first.gate_weight.clone().requires_grad_(), "bias": first.gate_bias.clone()}}
    for name, f in adapter.layers.items():
        params[name] = {
            k: getattr(f, k).clone().requires_grad_() for k in ("k_down", "k_up", "v_down", "v_up")
        }
    return params


def test_queries_are_captured_from_every_cross_attention_layer(sd_pipe):
    embedder = TextEmbedder(sd_pipe)
    layers = capture_queries(sd_pipe.unet, embedder, "art", ["a painting by {}"], per_layer=16, seed=0)
    modules = cross_attention_modules(sd_pipe.unet)
    assert [layer.name for layer in layers] == list(modules)
    for layer in layers:
        assert layer.queries.shape[0] == 16 and layer.queries.shape[1] == modules[layer.name].heads


def test_the_edited_output_adds_the_shared_gated_delta(sd_pipe):
    embedder = TextEmbedder(sd_pipe)
    layers = capture_queries(sd_pipe.unet, embedder, "art", ["a painting by {}"], per_layer=8, seed=0)
    params = trainable(random_adapter(sd_pipe.unet, gate_bias=2.0))
    context = encode_full(embedder, ["a painting by Van Gogh", "a cat"])
    layer = layers[0]
    factors = layer_factors(params, layer.name)
    assert isinstance(factors, LayerFactors) and factors.gate_weight is params["gate"]["weight"]
    plain, edited = attention_output(layer, context, None), attention_output(layer, context, params)
    assert plain.shape == edited.shape == (2, 8, projection_weight(layer.attn.to_v).shape[0])
    assert not torch.allclose(plain, edited)


def test_alignment_is_zero_for_a_silent_edit_and_differentiable(sd_pipe):
    embedder = TextEmbedder(sd_pipe)
    layers = capture_queries(sd_pipe.unet, embedder, "art", ["a painting by {}"], per_layer=8, seed=0)
    params = trainable(random_adapter(sd_pipe.unet, gate_bias=-60.0))  # gate closed everywhere
    context = encode_full(embedder, ["a painting by Van Gogh"])
    assert float(alignment_loss(layers, params, context, context).detach()) < 1e-10
    open_params = trainable(random_adapter(sd_pipe.unet, gate_bias=3.0))
    loss = alignment_loss(layers, open_params, context, context)
    loss.backward()
    assert loss > 0 and open_params[layers[0].name]["k_up"].grad is not None
    assert not any(t.requires_grad for group in detached(open_params).values() for t in group.values())


def test_a_masked_layer_never_attends_to_padding_rows():
    """Where the denoiser masks padding (T5 pipelines), the zero rows ``encode_full`` pads with are left
    out of the attention: the output equals the attention over the prompt's own rows."""
    from ace_diffusers.fitting.attention import QueryLayer, attention_output
    from ace_diffusers.testing_transformers import tiny_pixart_pipeline

    attn = next(m for n, m in tiny_pixart_pipeline().transformer.named_modules() if n.endswith("attn2"))
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(5, attn.heads, attn.to_k.out_features // attn.heads, generator=generator)
    rows = torch.randn(1, 4, attn.to_k.in_features, generator=generator)
    padded = torch.cat([rows, torch.zeros(1, 6, rows.shape[-1])], dim=1)
    masked, unmasked = QueryLayer("x", attn, queries, masked=True), QueryLayer("x", attn, queries)
    with torch.no_grad():
        short = attention_output(unmasked, rows, None)
        torch.testing.assert_close(attention_output(masked, padded, None), short)
        assert not torch.allclose(attention_output(unmasked, padded, None), short)
