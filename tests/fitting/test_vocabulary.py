"""The vocabulary table the neighbour miner reads: each word encoded alone, kept in memory, stored whole on
disk by the preparation and read back by a new process."""

import torch

from ace_diffusers.fitting import vocabulary
from ace_diffusers.fitting.embedding_cache import EMBEDDINGS
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.fitting.vocabulary import (
    dictionary_words,
    encode_words,
    english_words,
    prepare_vocabulary,
    vocabulary_words,
)
from ace_diffusers.testing import tiny_sd_pipeline


def test_vocabulary_words_are_whole_alphabetic_words(sd_pipe):
    words = vocabulary_words(TextEmbedder(sd_pipe))
    assert len(words) > 10000 and "painting" in words
    assert all(len(w) > 2 and w == w.lower() for w in words)


def test_a_word_row_is_the_word_encoded_alone(sd_pipe):
    embedder = TextEmbedder(sd_pipe)
    (enc,) = embedder.encode(["sunflower"], [(0, 9)], extra_pad_tokens=0, approximate=True)
    row = encode_words(embedder, ["sunflower", "painting"])[0]
    torch.testing.assert_close(row, enc.embeddings[enc.span[0] : enc.span[1]].mean(0).half().float())


def test_the_prepared_table_is_read_by_a_new_process(cache_dir, monkeypatch):
    pipe = tiny_sd_pipeline()
    embedder = TextEmbedder(pipe)
    count = prepare_vocabulary(embedder)
    assert count == len(vocabulary_words(embedder))
    assert len(list((cache_dir / "vocabulary").glob("*.safetensors"))) == 1
    first = encode_words(embedder, ["painting", "river"])
    EMBEDDINGS.clear()  # a new process
    monkeypatch.setattr(
        TextEmbedder, "encode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("encoded"))
    )
    torch.testing.assert_close(encode_words(embedder, ["painting", "river"]), first)


def test_an_altered_table_is_ignored_with_a_warning(cache_dir, recwarn):
    pipe = tiny_sd_pipeline()
    embedder = TextEmbedder(pipe)
    prepare_vocabulary(embedder)
    (path,) = (cache_dir / "vocabulary").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00" * 8  # flip the last values under an intact header
    path.write_bytes(bytes(data))
    EMBEDDINGS.clear()
    encode_words(embedder, ["painting"])  # encoded again
    assert any("vocabulary table" in str(w.message) for w in recwarn.list)


def test_sentencepiece_words_are_read_without_their_space_mark():
    from ace_diffusers.testing_transformers import tiny_pixart_pipeline

    words = vocabulary_words(TextEmbedder(tiny_pixart_pipeline()))
    assert {"painting", "gogh", "portrait"} <= set(words) and not any(w.startswith("\u2581") for w in words)
    assert "ab" not in words and all(w.isalpha() and len(w) > 2 for w in words)


def test_dictionary_words_are_the_english_words_the_tokenizer_splits(sd_pipe):
    embedder = TextEmbedder(sd_pipe)
    split, single = dictionary_words(embedder), vocabulary_words(embedder)
    assert len(english_words()) > 90000 and "painting" in english_words() and "painting" not in split
    assert split and not set(split) & set(single)
    assert all(len(sd_pipe.tokenizer.tokenize(w)) > 1 for w in split[:50])


def test_the_dictionary_is_stored_with_the_table_and_read_back(cache_dir, monkeypatch):
    monkeypatch.setattr(vocabulary, "english_words", lambda count=None: ("rhombus", "lozenge", "painting"))
    embedder = TextEmbedder(tiny_sd_pipeline())
    words = prepare_vocabulary(embedder)
    assert prepare_vocabulary(embedder, dictionary=True) == words + 2  # painting is one CLIP token
    EMBEDDINGS.clear()  # a new process reads both from disk
    monkeypatch.setattr(
        TextEmbedder, "encode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("encoded"))
    )
    assert prepare_vocabulary(embedder, dictionary=True) == words + 2
    assert encode_words(embedder, ["rhombus"]).shape[0] == 1
