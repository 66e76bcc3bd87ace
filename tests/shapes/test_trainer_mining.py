"""The trainer's synonym mining on a real pretrained text encoder (the miniature world's MiniLM):
words the UNet was trained to read as a shape are found from the model alone, and words for the
shapes that must be kept are not."""

import pytest

from ace_diffusers.fitting.attention import capture_queries
from ace_diffusers.fitting.mining import mine_synonyms
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.fitting.trainer import ACETrainer
from ace_diffusers.shapes.erasure import erase_arguments
from ace_diffusers.shapes.vocab import SHAPE_WORDS

from .conftest import NEEDS_WEIGHTS


@NEEDS_WEIGHTS
@pytest.mark.parametrize("shape", ["square", "heart"])
def test_mining_finds_the_worlds_held_out_synonyms(shapes_pipe, shape):
    trainer = ACETrainer(shapes_pipe, progress=False, **erase_arguments(shape))
    embedder, spec = TextEmbedder(shapes_pipe), trainer.spec
    layers = capture_queries(
        trainer.unet,
        embedder,
        spec.neutral[0],
        spec.templates,
        per_layer=trainer.queries_per_layer,
        seed=trainer.seed,
    )
    mined = mine_synonyms(
        embedder, layers, spec, per_concept=trainer.mined_synonyms, pool=trainer.mining_pool
    )
    held_out = {w for w in SHAPE_WORDS[shape][1:] if " " not in w}  # single words the trainer was not given
    assert held_out & set(mined), (shape, list(mined))
    kept = {
        w
        for other, words in SHAPE_WORDS.items()
        if other != shape
        for phrase in words
        for w in phrase.split()
    }
    assert not kept & set(mined), (shape, list(mined))
    assert set(mined.values()) == {shape} and len(mined) <= trainer.mined_synonyms


@NEEDS_WEIGHTS
def test_the_dictionary_brings_split_words_the_world_reads_as_the_shape(shapes_pipe, monkeypatch):
    """MiniLM's WordPiece spells "rhombus" with three pieces, so no tokenizer word is it; given English
    words as candidates (here the 5,000 most frequent plus "rhombus", where the real list is 100,000),
    the miner finds that the world's UNet reads it as a diamond — and only such words."""
    from ace_diffusers.fitting import vocabulary

    words = vocabulary.english_words(5000) + ("rhombus",)
    monkeypatch.setattr(vocabulary, "english_words", lambda count=None: words)
    trainer = ACETrainer(shapes_pipe, progress=False, **erase_arguments("diamond"))
    embedder, spec = TextEmbedder(shapes_pipe), trainer.spec
    assert len(shapes_pipe.tokenizer.tokenize("rhombus")) > 1
    layers = capture_queries(trainer.unet, embedder, spec.neutral[0], spec.templates, per_layer=64, seed=0)
    plain = mine_synonyms(embedder, layers, spec, per_concept=16, pool=4096)
    mined = mine_synonyms(embedder, layers, spec, per_concept=16, pool=4096, dictionary=True)
    assert "rhombus" in mined and "rhombus" not in plain, list(mined)
    assert set(mined.values()) == {"diamond"} and len(mined) <= 16
