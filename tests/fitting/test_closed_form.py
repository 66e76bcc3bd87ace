import re

import pytest

from ace_diffusers import (
    ACEAdapterNameError,
    ACEValueError,
    erase_concept,
    prepare_erasure,
)
from ace_diffusers.fitting import closed_form, embedding_cache
from ace_diffusers.fitting import text as text_module
from ace_diffusers.fitting.data import FitSettings, full_length_template_indices
from ace_diffusers.fitting.embedding_cache import EMBEDDINGS
from ace_diffusers.fitting.neighbours import clear_query_banks
from ace_diffusers.fitting.presets import load_presets, resolve_spec
from ace_diffusers.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

from ..conftest import generate, record_encoded_prompts, relative_gap
from .conftest import (
    CONCEPT_GAP_LEFT,
    CORE,
    PRESERVE_CHANGE,
    TEXT_DIM,
    UNRELATED_GATE,
    concept_gap_left,
    max_gate,
    relative_change,
)


@pytest.fixture(scope="module")
def erased_pipe():
    pipe = tiny_sd_pipeline(text_dim=TEXT_DIM)
    adapter = erase_concept(pipe, "Van Gogh", kind="style", settings=CORE)
    return pipe, adapter


def test_concept_kv_moves_to_neutral_anchor(erased_pipe):
    pipe, adapter = erased_pipe
    assert adapter.method == "closed-form" and adapter.neutral == ["art"]
    for template in ("a painting in the style of {}", "an artwork by {}", "art by {}"):
        assert concept_gap_left(pipe, template, "Van Gogh", "art") < CONCEPT_GAP_LEFT, template


def test_preserved_concepts_kv_barely_change(erased_pipe):
    pipe, _ = erased_pipe
    for artist in ("Claude Monet", "Pablo Picasso", "Rembrandt"):
        assert relative_change(pipe, f"a painting in the style of {artist}") < PRESERVE_CHANGE, artist


def test_unrelated_prompts_gate_closed_and_images_unchanged(erased_pipe):
    pipe, _ = erased_pipe
    for prompt in ("a photo of a cat", "a bowl of soup on a kitchen table", ""):
        assert max_gate(pipe, prompt) < UNRELATED_GATE, prompt
    edited = generate(pipe, "a photo of a cat")
    pipe.disable_ace_adapters()
    try:
        stock = generate(pipe, "a photo of a cat")
    finally:
        pipe.enable_ace_adapters()
    assert (edited - stock).abs().max() < 2e-3
    concept_edited = generate(pipe, "a painting in the style of Van Gogh")
    pipe.disable_ace_adapters()
    try:
        concept_stock = generate(pipe, "a painting in the style of Van Gogh")
    finally:
        pipe.enable_ace_adapters()
    assert (concept_edited - concept_stock).abs().max() > 1e-2


def test_two_concepts_in_one_adapter_erase_both_and_preserve_a_third():
    pipe = tiny_sd_pipeline(text_dim=TEXT_DIM)
    adapter = erase_concept(
        pipe, ["Van Gogh", "Claude Monet"], kind="style", adapter_name="two", settings=CORE
    )
    assert adapter.concepts == ["Van Gogh", "Claude Monet"] and pipe.get_list_ace_adapters() == ["two"]
    assert concept_gap_left(pipe, "an artwork by {}", "Van Gogh", "art") < CONCEPT_GAP_LEFT
    assert concept_gap_left(pipe, "an artwork by {}", "Claude Monet", "art") < CONCEPT_GAP_LEFT
    assert relative_change(pipe, "an artwork by Pablo Picasso") < PRESERVE_CHANGE


def test_sdxl_uses_both_text_encoders():
    pipe = tiny_sdxl_pipeline(text_dim=TEXT_DIM)
    adapter = erase_concept(pipe, "Van Gogh", kind="style", settings=CORE)
    d_text = next(iter(adapter.layers.values())).shape[0]
    assert d_text == TEXT_DIM  # both encoders' tokens, concatenated
    assert concept_gap_left(pipe, "a painting in the style of {}", "Van Gogh", "art") < CONCEPT_GAP_LEFT
    assert relative_change(pipe, "a photo of a cat") < PRESERVE_CHANGE


def test_many_concepts_fit_in_one_adapter():
    pipe = tiny_sd_pipeline()
    concepts = [f"concept number {i}" for i in range(100)]
    adapter = erase_concept(pipe, concepts, load=False)
    assert len(adapter.concepts) == 100 and adapter.rank == 64  # min(d_text=64, 24 + 8 * 100, 256)
    assert pipe.get_list_ace_adapters() == []


def test_explicit_kind_expands_to_nudity_terms():
    pipe = tiny_sd_pipeline()
    adapter = erase_concept(pipe, "nudity", kind="explicit", load=False)
    expected = load_presets()["kinds"]["explicit"]["expand"]
    assert adapter.concepts[0] == "nudity" and set(expected) <= set(adapter.concepts)
    assert adapter.kind == "explicit" and adapter.neutral[0] == "clothed person"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(concepts="   "), "Empty concept"),
        (dict(concepts=[]), "No concept"),
        (dict(concepts=["ok", 3]), "must be a string"),
        (dict(concepts="cat", kind="animal"), "Unknown concept kind"),
        (dict(concepts="art", kind="style"), "equals its neutral anchor"),
        (dict(concepts="cat", rank=0), "positive integer"),
        (dict(concepts="cat", rank=10_000), "exceeds the text width"),
        (dict(concepts=["a", "b"], neutral=["x", "y", "z"]), "neutral anchors"),
        (dict(concepts="cat", templates=["no placeholder"]), "exactly once"),
    ],
)
def test_bad_arguments_raise_clear_errors(sd_pipe, kwargs, message):
    with pytest.raises(ACEValueError, match=message):
        erase_concept(sd_pipe, **kwargs)
    assert sd_pipe.get_list_ace_adapters() == []


def test_taken_adapter_name_is_refused_before_fitting(sd_pipe):
    erase_concept(sd_pipe, "cat", adapter_name="x")
    with pytest.raises(ACEAdapterNameError, match="already loaded"):
        erase_concept(sd_pipe, "dog", adapter_name="x")


def test_pipeline_method_and_custom_neutral(sd_pipe):
    adapter = sd_pipe.erase_concept("a red apple", neutral="a fruit", preserve=["a banana"])
    assert adapter.neutral == ["a fruit"] and adapter.fit["preserve"] == ["a banana"]
    assert sd_pipe.get_list_ace_adapters() == ["a_red_apple"]


def test_overlong_concept_warns_about_truncation(sd_pipe):
    from ace_diffusers.errors import ACETruncationWarning

    with pytest.warns(ACETruncationWarning, match="truncated"):
        erase_concept(sd_pipe, "a " + "very " * 80 + "long concept", load=False)


def test_thousands_of_concepts_beyond_memory_are_refused_before_work(sd_pipe, monkeypatch):
    monkeypatch.setattr(closed_form, "available_memory", lambda: 64 * 2**20)  # pretend 64 MiB are free
    monkeypatch.setattr(closed_form, "collect_fit_data", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ACEValueError, match="split the concepts"):
        erase_concept(sd_pipe, [f"concept {i}" for i in range(3000)], load=False)


def test_empty_anchors_in_a_list_are_allowed(sd_pipe):
    adapter = erase_concept(sd_pipe, ["cat", "striped"], neutral=["", "plain"], load=False)
    assert adapter.neutral == ["", "plain"]


@pytest.mark.parametrize("new_process", [False, True], ids=["same-process", "new-process"])
def test_prepare_erasure_leaves_a_fit_only_the_concepts_own_prompts(cache_dir, monkeypatch, new_process):
    pipe = tiny_sd_pipeline()
    recorded = record_encoded_prompts(monkeypatch)
    preparation = pipe.prepare_erasure(kind="style")
    assert preparation.kind == "style" and preparation.neutral == ["art"]
    assert preparation.cache_dir == str(cache_dir) and preparation.prompts > 40
    assert pipe.get_list_ace_adapters() == []  # nothing fitted or loaded
    during_preparation = list(recorded)
    if new_process:
        EMBEDDINGS.clear()
        clear_query_banks()
    moments = []
    monkeypatch.setattr(embedding_cache, "save_moment", lambda *a: moments.append(a))
    prepared = erase_concept(pipe, "Van Gogh", kind="style", load=False)
    encoded = recorded[len(during_preparation) :]
    assert [p for p in encoded if "Van Gogh" in p]
    # what preparation encoded (prompts of templates, the empty prompt) is never encoded again; the
    # neighbour miner's probes of vocabulary words, alone or in the kind's first templates, may recur
    # (they depend on the concept: preparation's placeholder and Van Gogh can shortlist the same word)
    probes = [
        re.compile(re.escape(t).replace(r"\{\}", r"[^ ]+") + "$")
        for t in resolve_spec("x", kind="style").templates[:2]
    ]
    again = {p for p in encoded if (" " in p or not p) and not any(probe.match(p) for probe in probes)} & set(
        during_preparation
    )
    assert not again, sorted(again)[:5]
    assert not moments  # the other tokens' second moment was prepared too: read, not recomputed
    EMBEDDINGS.clear()
    monkeypatch.setenv("ACE_DIFFUSERS_CACHE", "off")
    assert relative_gap(prepared, erase_concept(pipe, "Van Gogh", kind="style", load=False)) < 1e-3


def test_prepare_erasure_covers_fits_of_many_concepts_and_each_listed_anchor(cache_dir, monkeypatch):
    """Fits of more than a few concepts encode other templates at full length: those are prepared too."""
    pipe = tiny_sd_pipeline()
    concepts = [f"painter {i}" for i in range(12)]
    full = set().union(
        *(full_length_template_indices(i, len(concepts), 6, FitSettings()) for i in range(len(concepts)))
    )
    assert full == set(range(6))  # between them, these concepts take every template at full length
    plain = FitSettings(neighbours=0)  # the layouts alone (mining's preparation: the test above)
    preparation = prepare_erasure(pipe, kind="style", neutral=["art", "a painting"], settings=plain)
    assert preparation.neutral == ["art", "a painting"]
    EMBEDDINGS.clear()
    encoded = record_encoded_prompts(monkeypatch)
    moments = []
    monkeypatch.setattr(embedding_cache, "save_moment", lambda *a: moments.append(a))
    erase_concept(pipe, concepts, kind="style", load=False, settings=plain)
    erase_concept(pipe, "Van Gogh", kind="style", neutral="a painting", load=False, settings=plain)
    assert encoded and all(any(c in prompt for c in [*concepts, "Van Gogh"]) for prompt in encoded)
    assert len(moments) == 1  # only the 12-concept layout's second moment was formed


@pytest.mark.parametrize(
    "concept, kwargs",
    [
        ("nudity", dict(kind="explicit")),  # the kind's own nudity terms are in every fit: prepared
        ("Van Gogh", dict(kind="style", templates={"Van Gogh": ["a {} canvas", "{} brushwork"]})),
        ("a red apple", dict(kind=None)),  # the empty anchor: the templates' prefixes are prepared anyway
        ("house", dict(kind="object")),  # names one of the full-length unrelated prompts, which it leaves out
    ],
    ids=["explicit", "per-phrase-templates", "empty-anchor", "names-an-unrelated-prompt"],
)
def test_prepare_erasure_covers_every_kind_of_call(cache_dir, monkeypatch, concept, kwargs):
    pipe = tiny_sd_pipeline()
    plain = FitSettings(neighbours=0)  # the closed form's own prompts (with mining: the test above)
    preparation = prepare_erasure(pipe, settings=plain, **kwargs)
    assert preparation.neutral == [load_presets()["kinds"][kwargs["kind"] or "custom"]["neutral"]]
    EMBEDDINGS.clear()  # a new process
    new_prefixes = []
    original = text_module.encode_with_shared_prefixes

    def spy(*args, prefix_store=None, **kwargs):
        before = set(prefix_store)
        out = original(*args, prefix_store=prefix_store, **kwargs)
        new_prefixes.extend(set(prefix_store) - before)
        return out

    monkeypatch.setattr(text_module, "encode_with_shared_prefixes", spy)
    encoded = record_encoded_prompts(monkeypatch)
    adapter = erase_concept(pipe, concept, load=False, settings=plain, **kwargs)
    assert adapter.concepts[0] == concept
    assert encoded and all(concept in prompt for prompt in encoded)  # only the concept's own prompts
    assert not new_prefixes  # and no template prefix either


def test_prepare_erasure_without_a_disk_cache_prepares_this_process(monkeypatch):
    monkeypatch.setenv("ACE_DIFFUSERS_CACHE", "off")
    EMBEDDINGS.clear()
    pipe = tiny_sd_pipeline()
    plain = FitSettings(neighbours=0)
    assert prepare_erasure(pipe, kind="object", settings=plain).cache_dir is None
    encoded = record_encoded_prompts(monkeypatch)
    erase_concept(pipe, "cat", kind="object", load=False, settings=plain)
    assert encoded and all("cat" in prompt for prompt in encoded)
    with pytest.raises(ACEValueError, match="Unknown concept kind"):
        prepare_erasure(pipe, kind="animal")


def test_prepare_erasure_stores_the_dictionary_when_the_fits_mine_it(cache_dir, monkeypatch):
    """``FitSettings(dictionary=True)``: the split English words are encoded by the preparation and
    stored with the vocabulary table, so no later fit (or process) pays for them."""
    from ace_diffusers.fitting import vocabulary

    monkeypatch.setattr(vocabulary, "english_words", lambda count=None: ("rhombus", "lozenge", "painting"))
    pipe = tiny_sd_pipeline()
    embedder = text_module.TextEmbedder(pipe)
    prepare_erasure(pipe, kind="style")
    assert not EMBEDDINGS.memory(embedder).vocabulary.dictionary  # the default fit does not mine them
    prepare_erasure(pipe, kind="style", settings=FitSettings(dictionary=True))
    assert {"rhombus", "lozenge"} <= set(EMBEDDINGS.memory(embedder).vocabulary.rows)
    EMBEDDINGS.clear()  # a new process reads them from disk
    encoded = record_encoded_prompts(monkeypatch)
    erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=FitSettings(dictionary=True))
    assert not {"rhombus", "lozenge"} & set(encoded)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale": float("nan")}, "scale"),
        ({"preserve_weight": -1.0}, "preserve_weight"),
        ({"preserve_weight": float("inf")}, "preserve_weight"),
    ],
)
def test_unusable_numbers_are_refused_before_any_work(sd_pipe, monkeypatch, kwargs, message):
    monkeypatch.setattr(closed_form, "fit_adapter", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ACEValueError, match=message):
        erase_concept(sd_pipe, "Van Gogh", kind="style", **kwargs)
