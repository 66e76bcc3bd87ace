"""What fine-tuning draws its batches from: anchor outputs computed once per prompt, kept keys/values that
change nothing but speed, and the memory cap that decides whether they are kept."""

import torch

from ace_diffusers.fitting import batches
from ace_diffusers.fitting.attention import (
    alignment_losses,
    attention_output,
    capture_queries,
    detached,
    encode_full,
    unedited_keys_values,
)
from ace_diffusers.fitting.batches import PromptPool, TargetBank, TrainingSet, kept_projections
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.testing import random_adapter

from .test_attention import trainable


def _world(pipe):
    embedder = TextEmbedder(pipe)
    layers = capture_queries(pipe.unet, embedder, "art", ["a painting by {}"], per_layer=8, seed=0)
    return embedder, layers


def test_each_anchor_prompt_is_attended_once(sd_pipe):
    embedder, layers = _world(sd_pipe)
    bank = TargetBank(embedder, layers)
    rows = bank.index(["a painting by art", "an artwork by art", "a painting by art"])
    assert rows.tolist() == [0, 1, 0] and bank.outputs[0].shape[0] == 2
    assert bank.index(["an artwork by art", "a sketch by art"]).tolist() == [1, 2]
    context = encode_full(embedder, ["a sketch by art"])
    torch.testing.assert_close(bank.rows(torch.tensor([2]))[0], attention_output(layers[0], context, None))


def test_kept_keys_values_give_the_same_losses(sd_pipe):
    embedder, layers = _world(sd_pipe)
    params = detached(trainable(random_adapter(sd_pipe.unet, gate_bias=2.0)))
    context = encode_full(embedder, ["a painting by Van Gogh", "a cat", "a dog"])
    kept, plain = PromptPool(layers, context[:2], True), PromptPool(layers, context[:2], False)
    for pool in (kept, plain):
        pool.add(context[2:])
    index = torch.tensor([2, 0])
    source, unedited = PromptPool.take([(kept, index)])
    again, none = PromptPool.take([(plain, index)])
    assert none is None and torch.equal(source, again)
    for (k, v), (k_ref, v_ref) in zip(unedited, unedited_keys_values(layers, again), strict=True):
        torch.testing.assert_close(k, k_ref) and torch.testing.assert_close(v, v_ref)
    wanted = [attention_output(layer, source, None) for layer in layers]
    torch.testing.assert_close(
        alignment_losses(layers, params, source, wanted, [1, 1], unedited),
        alignment_losses(layers, params, source, wanted, [1, 1]),
    )


def test_the_memory_cap_decides(sd_pipe, monkeypatch):
    _, layers = _world(sd_pipe)
    assert kept_projections(layers, rows=10, tokens=77)
    monkeypatch.setattr(batches, "KEPT_PROJECTIONS_BYTES", 100)
    assert not kept_projections(layers, rows=10, tokens=77)


def test_adversaries_join_the_augmentations_not_the_fixed_loss(sd_pipe):
    embedder, layers = _world(sd_pipe)
    params = detached(trainable(random_adapter(sd_pipe.unet, gate_bias=2.0)))
    bank = TargetBank(embedder, layers)
    given = encode_full(embedder, ["a painting by Van Gogh"])
    keep = encode_full(embedder, ["a cat"])
    data = TrainingSet(
        bank,
        PromptPool(layers, given, True),
        bank.index(["a painting by art"]),
        PromptPool(layers, given[:0], True),
        bank.index([]),
        PromptPool(layers, keep, True),
        [attention_output(layer, keep, None) for layer in layers],
    )
    before = data.fixed_loss(layers, params)
    data.add(encode_full(embedder, ["a painting by Vincent"]), "a painting by art")
    assert len(data.extra) == 1 and data.extra_targets.tolist() == [0]
    torch.testing.assert_close(data.fixed_loss(layers, params), before)
    erase, kept = data.losses(layers, params, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    assert erase > 0 and kept > 0
