"""Synonym mining reads only the model: the vocabulary, the UNet's projections and the concept's own words."""

import torch

from ace_diffusers.fitting.attention import capture_queries
from ace_diffusers.fitting.mining import mine_synonyms
from ace_diffusers.fitting.presets import resolve_spec
from ace_diffusers.fitting.text import TextEmbedder


def test_mined_words_never_name_the_concept_its_anchor_or_what_is_kept(sd_pipe):
    embedder = TextEmbedder(sd_pipe)
    spec = resolve_spec("Van Gogh", kind="style")
    layers = capture_queries(sd_pipe.unet, embedder, spec.neutral[0], spec.templates, per_layer=8, seed=0)
    mined = mine_synonyms(embedder, layers, spec, per_concept=4, pool=256)
    banned = {w.lower() for phrase in spec.concepts + spec.preserve + spec.neutral for w in phrase.split()}
    assert len(mined) <= 4 and set(mined.values()) <= {"Van Gogh"}
    assert not set(mined) & banned


def test_stage_three_shares_each_templates_beginning_exactly(sd_pipe):
    from ace_diffusers.fitting import mining

    embedder = TextEmbedder(sd_pipe)
    templates = ["a painting in the style of {}", "art by {}"]
    layers = capture_queries(sd_pipe.unet, embedder, "art", templates, per_layer=16, seed=0)
    prompts, spans = mining._marked(templates, ["monet", "picasso", "renoir"])
    assert prompts[:2] == ["a painting in the style of monet", "art by monet"] and spans[1] == (7, 12)
    plain = mining._signatures(embedder, layers, prompts)
    shared = mining._signatures(embedder, layers, prompts, spans)  # the CLIP prefix encoded once
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)  # exact but for float rounding
