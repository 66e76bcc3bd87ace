"""Phrases found by coordinate search: whole vocabulary words, never the concept's, the preserved
concepts' or the already-mined words; each search step only ever lowers the gap to the concept; the
trainer erases what is found and records it."""

import torch

from ace_diffusers.fitting import phrases as phrases_module
from ace_diffusers.fitting.attention import attention_output, capture_queries, encode_full
from ace_diffusers.fitting.phrases import PhraseSearch, search_phrases
from ace_diffusers.fitting.presets import filled, resolve_spec
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.fitting.trainer import ACETrainer
from ace_diffusers.fitting.vocabulary import vocabulary_words


def _setting(pipe):
    embedder = TextEmbedder(pipe)
    spec = resolve_spec("Van Gogh", kind="style", preserve=["Monet"])
    layers = capture_queries(pipe.unet, embedder, spec.neutral[0], spec.templates, per_layer=8, seed=0)
    return embedder, spec, layers


def test_each_step_lowers_the_gap_or_keeps_the_words(sd_pipe):
    embedder, spec, layers = _setting(sd_pipe)
    template = spec.templates[0]
    wanted = [
        attention_output(layer, encode_full(embedder, [filled(template, "Van Gogh")]), None)
        for layer in layers
    ]
    allowed = torch.tensor(sorted(vocabulary_words(embedder).values()))[:5000]
    search = PhraseSearch(embedder, layers, template, 2, wanted, allowed, top_k=8, candidates=16)
    generator = torch.Generator().manual_seed(0)
    ids = allowed[torch.randint(len(allowed), (2,), generator=generator)]
    losses = [float(search.loss(ids[None])[0])]
    for _ in range(5):
        ids = search.step(ids, generator)
        losses.append(float(search.loss(ids[None])[0]))
        assert bool(torch.isin(ids, allowed).all())
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < losses[0]


def test_found_phrases_use_only_allowed_words(sd_pipe, monkeypatch):
    embedder, spec, layers = _setting(sd_pipe)
    # every phrase passes the in-context test here: this checks the search, not the tiny model's filter
    monkeypatch.setattr(phrases_module, "in_context", lambda embedder, layers, t, a, found: found)
    found = search_phrases(
        embedder, layers, spec, per_concept=2, steps=3, candidates=8, top_k=8, known=["oil"]
    )
    words = vocabulary_words(embedder)
    assert len(found) == 2 and set(found.values()) == {"Van Gogh"}
    used = [w for phrase in found for w in phrase.split()]
    assert all(w in words for w in used) and all(2 <= len(p.split()) <= 3 for p in found)
    assert not set(used) & {"van", "gogh", "monet", "art", "oil"}  # concept, preserved, anchor, known
    first, second = (set(p.split()) for p in found)
    assert not first & second  # a later search avoids the words an earlier one settled on
    assert search_phrases(embedder, layers, spec, per_concept=0) == {}


def test_the_trainer_erases_and_records_the_phrases(sd_pipe, monkeypatch):
    def fake_search(embedder, layers, spec, **kw):
        return {"olive starry night": spec.concepts[0]} if kw["per_concept"] else {}

    monkeypatch.setattr("ace_diffusers.fitting.trainer.search_phrases", fake_search)
    common = dict(kind="style", steps=2, mined_synonyms=0, queries_per_layer=8, batch_size=4, progress=False)
    with_phrase = ACETrainer(sd_pipe, "Van Gogh", search_phrases=1, **common)
    tuning = with_phrase.fit().fit["fine_tuning"]
    assert tuning["searched_phrases"] == ["olive starry night"] and tuning["mined_synonyms"] == []
    # the phrase is erased: its prompts join the erase pairs (a longer fixed erase set than without)
    without = ACETrainer(sd_pipe, "Van Gogh", **common)
    without.fit()
    assert with_phrase.initial_loss != without.initial_loss
