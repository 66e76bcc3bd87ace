"""Concept-vector adversaries: innocuous prompts pushed along the concept's direction, and the trainer
that is given them leaves less of that push in its attention outputs."""

import torch

from ace_diffusers.fitting.attention import alignment_loss, capture_queries, encode_full
from ace_diffusers.fitting.concept_vectors import STRENGTHS, concept_vector_pairs
from ace_diffusers.fitting.presets import resolve_spec
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.fitting.trainer import ACETrainer
from ace_diffusers.testing import tiny_sd_pipeline


def test_each_innocuous_prompt_is_pushed_along_one_direction_at_every_strength():
    pipe = tiny_sd_pipeline()
    embedder = TextEmbedder(pipe)
    spec = resolve_spec("Van Gogh", kind="style")
    pairs = concept_vector_pairs(embedder, spec, per_concept=2)
    assert len(pairs) == 4 * len(STRENGTHS)  # 2 anchored templates + 2 unrelated prompts
    assert concept_vector_pairs(embedder, spec, per_concept=0) == []
    (weak, prompt), (strong, same) = pairs[0], pairs[1]
    assert prompt == same and "art" in prompt  # the anchor in the concept's first template
    plain = encode_full(embedder, [prompt])
    direction = (strong - weak) / (STRENGTHS[1] - STRENGTHS[0])
    torch.testing.assert_close(weak, plain + STRENGTHS[0] * direction, atol=1e-4, rtol=1e-4)
    assert float(direction.norm()) > 0


def _params(adapter):
    first = next(iter(adapter.layers.values()))
    params = {"gate": {"weight": first.gate_weight, "bias": first.gate_bias}}
    for name, f in adapter.layers.items():
        params[name] = {k: getattr(f, k) for k in ("k_down", "k_up", "v_down", "v_up")}
    return params


def test_the_trainer_given_concept_vectors_lets_less_of_them_through():
    pipe = tiny_sd_pipeline()
    common = dict(
        kind="style", steps=60, adversarial=False, mined_synonyms=0, queries_per_layer=16, batch_size=8,
        progress=False,
    )
    plain = ACETrainer(pipe, "Van Gogh", **common).fit()
    defended_trainer = ACETrainer(pipe, "Van Gogh", concept_vectors=2, **common)
    defended = defended_trainer.fit()
    assert defended.fit["fine_tuning"]["concept_vectors"] == 2
    assert defended_trainer.phase_seconds["concept vectors"] > 0  # the defence's cost, printed with the fit
    embedder = TextEmbedder(pipe)
    spec = resolve_spec("Van Gogh", kind="style")
    layers = capture_queries(pipe.unet, embedder, "art", spec.templates, per_layer=16, seed=1)
    pairs = concept_vector_pairs(embedder, spec, per_concept=2)
    source = torch.cat([s for s, _ in pairs])
    target = encode_full(embedder, [p for _, p in pairs])
    with torch.no_grad():
        losses = [float(alignment_loss(layers, _params(a), source, target)) for a in (plain, defended)]
    print(f"concept-vector pairs: alignment loss without defence {losses[0]:.4f}, with {losses[1]:.4f}")
    assert losses[1] < losses[0]
