"""Synonym mining reads only the model: the vocabulary, the UNet's projections and the concept's own words."""

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
