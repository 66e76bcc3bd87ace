import dataclasses

import pytest
import torch

from ace_diffusers import (
    ACEAdapterNameError,
    ACEValueError,
    erase_concept,
    prepare_erasure,
)
from ace_diffusers.core.processor import get_stack
from ace_diffusers.fitting import closed_form, embedding_cache
from ace_diffusers.fitting import text as text_module
from ace_diffusers.fitting.data import FitSettings, align_tokens, full_length_template_indices
from ace_diffusers.fitting.embedding_cache import EMBEDDINGS
from ace_diffusers.fitting.presets import load_presets
from ace_diffusers.fitting.solvers import FitData, low_rank_edits, solve_text_map
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.integration.modules import cross_attention_modules
from ace_diffusers.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

from ..conftest import generate, record_encoded_prompts, relative_gap

# Tolerances reached on tiny random-weight pipelines with 256-d text tokens (docs/method.md says what
# they measure). A random 2-layer text encoder has no semantics, so generalisation to unseen
# templates/synonyms is measured on the miniature world instead (real pretrained text encoder).
TEXT_DIM = 256
CONCEPT_GAP_LEFT = 0.35  # sqrt(sum ||K_edit(c) - K(n)||^2 / sum ||K(c) - K(n)||^2) over layers, K and V
PRESERVE_CHANGE = 0.03  # sqrt(sum ||K_edit(p) - K(p)||^2 / sum ||K(p)||^2) on preservation prompts
UNRELATED_GATE = 0.05  # max gate value on any token of an unrelated prompt


def keys_values(attn, context):
    """K and V exactly as the ACE processor computes them (base projection + loaded deltas)."""
    key, value = attn.to_k(context), attn.to_v(context)
    stack = get_stack(attn)
    if stack is not None and len(stack.adapters):
        key, value = stack.add_delta(context, key, value)
    return key, value


def encode(pipe, template, phrase):
    start = template.index("{}")
    prompt = template.replace("{}", phrase)
    return TextEmbedder(pipe).encode([prompt], [(start, start + len(phrase))], extra_pad_tokens=None)[0]


def concept_gap_left(pipe, template, concept, neutral):
    """Fraction of the concept->neutral K/V gap that remains after the edit, over all layers."""
    c_enc, n_enc = encode(pipe, template, concept), encode(pipe, template, neutral)
    pairs = [(i, j) for i, j in align_tokens(c_enc, n_enc) if i >= c_enc.span[0]]
    ci, nj = torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])
    left, gap = 0.0, 0.0
    with torch.no_grad():
        for attn in cross_attention_modules(pipe.unet).values():
            k_edit, v_edit = keys_values(attn, c_enc.embeddings[ci])
            k_n, v_n = attn.to_k(n_enc.embeddings[nj]), attn.to_v(n_enc.embeddings[nj])
            k_c, v_c = attn.to_k(c_enc.embeddings[ci]), attn.to_v(c_enc.embeddings[ci])
            left += (k_edit - k_n).norm() ** 2 + (v_edit - v_n).norm() ** 2
            gap += (k_c - k_n).norm() ** 2 + (v_c - v_n).norm() ** 2
    return float((left / gap).sqrt())


def relative_change(pipe, prompt):
    enc = TextEmbedder(pipe).encode([prompt], extra_pad_tokens=None)[0].embeddings
    change, norm = 0.0, 0.0
    with torch.no_grad():
        for attn in cross_attention_modules(pipe.unet).values():
            k_edit, v_edit = keys_values(attn, enc)
            k, v = attn.to_k(enc), attn.to_v(enc)
            change += (k_edit - k).norm() ** 2 + (v_edit - v).norm() ** 2
            norm += k.norm() ** 2 + v.norm() ** 2
    return float((change / norm).sqrt())


def max_gate(pipe, prompt):
    enc = TextEmbedder(pipe).encode([prompt], extra_pad_tokens=None)[0].embeddings
    gates = [
        delta.gate(enc.unsqueeze(0)).max()
        for attn in cross_attention_modules(pipe.unet).values()
        for delta in get_stack(attn).adapters.values()
    ]
    return float(max(gates))


@pytest.fixture(scope="module")
def erased_pipe():
    pipe = tiny_sd_pipeline(text_dim=TEXT_DIM)
    adapter = erase_concept(pipe, "Van Gogh", kind="style")
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
    adapter = erase_concept(pipe, ["Van Gogh", "Claude Monet"], kind="style", adapter_name="two")
    assert adapter.concepts == ["Van Gogh", "Claude Monet"] and pipe.get_list_ace_adapters() == ["two"]
    assert concept_gap_left(pipe, "an artwork by {}", "Van Gogh", "art") < CONCEPT_GAP_LEFT
    assert concept_gap_left(pipe, "an artwork by {}", "Claude Monet", "art") < CONCEPT_GAP_LEFT
    assert relative_change(pipe, "an artwork by Pablo Picasso") < PRESERVE_CHANGE


def test_sdxl_uses_both_text_encoders():
    pipe = tiny_sdxl_pipeline(text_dim=TEXT_DIM)
    adapter = erase_concept(pipe, "Van Gogh", kind="style")
    d_text = next(iter(adapter.layers.values())).shape[0]
    assert d_text == TEXT_DIM  # both encoders' tokens, concatenated
    assert concept_gap_left(pipe, "a painting in the style of {}", "Van Gogh", "art") < CONCEPT_GAP_LEFT
    assert relative_change(pipe, "a photo of a cat") < PRESERVE_CHANGE


@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_text_embedder_matches_pipeline_encode_prompt(builder):
    pipe = builder()
    prompts = ["a painting in the style of Van Gogh", "a cat"]
    ours = torch.stack([e.embeddings for e in TextEmbedder(pipe).encode(prompts, extra_pad_tokens=None)])
    if hasattr(pipe, "text_encoder_2"):
        theirs = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)[0]
    else:
        theirs = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    torch.testing.assert_close(ours, theirs)
    short = TextEmbedder(pipe).encode(prompts, extra_pad_tokens=2)
    for enc, full in zip(short, ours, strict=True):  # causal encoders: truncation keeps the prefix
        assert enc.embeddings.shape[0] == enc.length + 2 < 77  # per prompt, whatever else is in the call
        torch.testing.assert_close(enc.embeddings, full[: enc.embeddings.shape[0]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "pass_cost, pack, per_pass",
    [(0, 128, 512), (text_module.PASS_COST_TOKENS, 128, 512), (0, 24, 48)],
    ids=["always-share", "cost-model", "small-packs"],
)
@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_shared_prefix_encoding_is_exact(builder, pass_cost, pack, per_pass, monkeypatch):
    """Prompts sharing the tokens before their phrase encode that prefix once, rows are packed several
    to a sequence, and stored prefixes are reused by later calls; the numbers are encode_prompt's."""
    monkeypatch.setattr(text_module, "PASS_COST_TOKENS", pass_cost)  # 0: every shared prefix takes the cached path
    monkeypatch.setattr(text_module, "PACK_TOKENS", pack)  # 24: rows spread over many packed sequences ...
    monkeypatch.setattr(text_module, "PASS_TOKENS", per_pass)  # ... a few per pass
    pipe = builder()
    embedder = TextEmbedder(pipe)
    assert embedder._prefix_sharing
    prompts, spans = [], []
    for template in ("a painting in the style of {}", "a photo of a {} in the middle of a room", "{} style"):
        for phrase in ("Van Gogh", "Claude Monet", "cat"):
            start = template.index("{}")
            prompts.append(template.replace("{}", phrase))
            spans.append((start, start + len(phrase)))
    if hasattr(pipe, "text_encoder_2"):
        theirs = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)[0]
    else:
        theirs = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    stores = [{} for _ in embedder.encoders]
    calls = [(None, None), (3, None), (3, stores), (None, stores)]  # the last call reads the prefixes the third stored
    for extra, prefix_stores in calls:
        ours = embedder.encode(prompts, spans, extra_pad_tokens=extra, prefix_stores=prefix_stores)
        for enc, full in zip(ours, theirs, strict=True):
            torch.testing.assert_close(enc.embeddings, full[: enc.embeddings.shape[0]], rtol=1e-5, atol=1e-5)
    assert all(len(store) == 2 for store in stores)  # the two templates with a prefix of >= 2 tokens
    one = embedder.encode(prompts[:1], spans[:1], extra_pad_tokens=None, prefix_stores=stores)[0]  # a lone row uses it too
    torch.testing.assert_close(one.embeddings, theirs[0], rtol=1e-5, atol=1e-5)


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


def test_align_tokens_pairs_prefix_span_and_suffix():
    from ace_diffusers.fitting.text import EncodedPrompt

    def enc(rows, span):
        return EncodedPrompt("", torch.zeros(rows, 1), span, rows)

    # "<s> a [van gogh] painting </s>" vs "<s> a [art] painting </s>": 6 vs 5 tokens
    assert align_tokens(enc(6, (2, 4)), enc(5, (2, 3))) == [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (5, 4)]
    # empty anchor: the concept collapses onto the token that follows it
    assert align_tokens(enc(4, (1, 2)), enc(3, None)) == [(0, 0), (1, 1), (2, 1), (3, 2)]
    assert align_tokens(enc(4, None), enc(4, (1, 2))) == []


def test_empty_anchors_in_a_list_are_allowed(sd_pipe):
    adapter = erase_concept(sd_pipe, ["cat", "striped"], neutral=["", "plain"], load=False)
    assert adapter.neutral == ["", "plain"]


def test_full_length_budget_spreads_over_concepts_and_unsampled_concepts_still_move():
    from ace_diffusers.bench.closed_form import concept_names
    from ace_diffusers.fitting.data import FitSettings, full_length_template_indices

    settings = FitSettings()  # 2 full-length templates per concept, at most 16 in total
    assert full_length_template_indices(0, 1, 6, settings) == {0, 1}
    chosen = [full_length_template_indices(i, 40, 6, settings) for i in range(40)]
    assert sum(len(c) for c in chosen) == settings.full_length_budget
    assert all(len(c) <= 1 for c in chosen)
    # concepts whose prompts were all short-encoded are erased on full-length prompts all the same
    pipe = tiny_sd_pipeline(text_dim=TEXT_DIM)
    names = concept_names(40)
    erase_concept(pipe, names, kind="style")
    unsampled = [n for n, c in zip(names, chosen, strict=True) if not c][:4]
    for name in unsampled:
        assert concept_gap_left(pipe, "art by {}", name, "art") < CONCEPT_GAP_LEFT, name
    assert max_gate(pipe, "a photo of a cat") < UNRELATED_GATE


def test_preservation_and_unrelated_prompts_never_name_an_erased_concept():
    from ace_diffusers.fitting.presets import resolve_spec

    spec = resolve_spec(
        ["circle", "striped"],
        neutral=["", "plain"],
        preserve=["solid", "heart"],
        templates={"solid": ["a {} red circle", "a {} blue heart"], "heart": ["a {}", "a striped {}"], "circle": ["a {}"]},
    )
    assert spec.preserve_prompts() == ["a solid blue heart", "a heart"]
    assert spec.preserve_prompts(1) == ["a heart"]  # "a solid red circle" would fight the erasure
    coffee = resolve_spec("coffee")
    assert "a cup of coffee" in coffee.negatives and "a cup of coffee" not in coffee.unrelated_prompts()
    assert spec.names_concept("a Circle.") and not spec.names_concept("a semicircle")
    assert not spec.names_concept("a red circle", besides="circle") and spec.names_concept("striped circle", besides="circle")


def test_a_concepts_templates_naming_another_erased_concept_are_left_out():
    from ace_diffusers.fitting.presets import resolve_spec

    styles = ["a {} red circle", "a {} blue square", "a {} green heart"]
    spec = resolve_spec(["striped", "square"], neutral=["plain", ""], templates={"striped": styles, "square": ["a {}"]})
    assert spec.templates_for("striped") == ["a {} red circle", "a {} green heart"]
    assert resolve_spec("striped", templates={"striped": styles}).templates_for("striped") == styles


def test_low_rank_edits_are_the_best_rank_r_edit_in_the_objective_metric():
    """The shared-sketch SVDs reach the Eckart–Young optimum of ||(BA − WG) L||, L Lᵀ = M, for every shape."""
    gen = torch.Generator().manual_seed(0)
    d, rank = 96, 8
    basis = torch.randn(d, d, generator=gen)
    metric = basis @ basis.T / d + 0.1 * torch.eye(d)
    root = torch.linalg.cholesky(metric)
    text_map = torch.randn(d, 12, generator=gen) @ torch.randn(12, d, generator=gen) + 0.05 * torch.randn(d, d, generator=gen)
    weights = [torch.randn(rows, d, generator=gen) for rows in (40, 64, 40, 64, 64)]
    edits = low_rank_edits(weights, text_map @ root, root, rank)
    single = low_rank_edits(weights[1:2], text_map @ root, root, rank)[0]
    torch.testing.assert_close(single[1] @ single[0], edits[1][1] @ edits[1][0], rtol=1e-4, atol=1e-4)
    for weight, (down, up) in zip(weights, edits, strict=True):
        assert down.shape == (rank, d) and up.shape == (weight.shape[0], rank)
        target = weight @ text_map
        u, s, vh = torch.linalg.svd(target @ root)
        best = ((u[:, :rank] * s[:rank]) @ vh[:rank] - target @ root).norm()
        ours = ((up @ down - target) @ root).norm()
        assert ours <= best * 1.01 + 1e-6


@pytest.mark.parametrize("concept_tokens", [10, 40], ids=["fewer-tokens-than-dims", "more-tokens-than-dims"])
def test_solve_text_map_is_the_closed_form_minimiser(concept_tokens):
    """h = G L with G = R M⁻¹ (both solve routes), and the statistics equal their explicit sums."""
    gen = torch.Generator().manual_seed(1)
    d = 24
    concept = torch.randn(concept_tokens, d, generator=gen) + 2.0
    target = concept + 0.3 * torch.randn(concept_tokens, d, generator=gen)
    others = torch.randn(60, d, generator=gen) + 1.0
    data = FitData(concept, target, torch.ones(concept_tokens, dtype=torch.bool), others)
    settings = FitSettings()
    gate_w, gate_b = 0.05 * torch.randn(d, generator=gen), torch.tensor([0.5])
    h, root, stats = solve_text_map(data, gate_w, gate_b, settings)

    c, n, p = concept.double(), target.double(), others.double()
    g = torch.sigmoid(c @ gate_w.double() + gate_b.double())
    m_concept, m_other = (c * g[:, None] ** 2).T @ c / len(c), p.T @ p / len(p)
    energy = (m_concept.trace() + m_other.trace()) / (2 * d)
    metric = m_concept + settings.preserve_weight * m_other + settings.ridge * energy * torch.eye(d, dtype=torch.float64)
    text_map = ((n - c) * g[:, None]).T @ c / len(c) @ torch.linalg.inv(metric)
    torch.testing.assert_close(root @ root.T, metric, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(h.double(), text_map @ root, rtol=1e-4, atol=1e-6)
    residual = (g[:, None] * (c @ text_map.T) - (n - c)).norm() / (n - c).norm()
    assert stats["text_residual"] == pytest.approx(float(residual), rel=1e-3)
    assert stats["preserve_drift"] == pytest.approx(float((p @ text_map.T).norm() / p.norm()), rel=1e-3)
    assert stats["concept_tokens"] == concept_tokens and stats["other_tokens"] == 60
    moment_given = dataclasses.replace(data, others_moment=m_other)
    torch.testing.assert_close(solve_text_map(moment_given, gate_w, gate_b, settings)[0], h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("new_process", [False, True], ids=["same-process", "new-process"])
def test_prepare_erasure_leaves_a_fit_only_the_concepts_own_prompts(cache_dir, monkeypatch, new_process):
    pipe = tiny_sd_pipeline()
    preparation = pipe.prepare_erasure(kind="style")
    assert preparation.kind == "style" and preparation.neutral == ["art"]
    assert preparation.cache_dir == str(cache_dir) and preparation.prompts > 40
    assert pipe.get_list_ace_adapters() == []  # nothing fitted or loaded
    if new_process:
        EMBEDDINGS.clear()
    encoded = record_encoded_prompts(monkeypatch)
    moments = []
    monkeypatch.setattr(embedding_cache, "save_moment", lambda *a: moments.append(a))
    prepared = erase_concept(pipe, "Van Gogh", kind="style", load=False)
    assert encoded and all("Van Gogh" in prompt for prompt in encoded)
    assert not moments  # the other tokens' second moment was prepared too: read, not recomputed
    EMBEDDINGS.clear()
    monkeypatch.setenv("ACE_DIFFUSERS_CACHE", "off")
    assert relative_gap(prepared, erase_concept(pipe, "Van Gogh", kind="style", load=False)) < 1e-3


def test_prepare_erasure_covers_fits_of_many_concepts_and_each_listed_anchor(cache_dir, monkeypatch):
    """Fits of more than a few concepts encode other templates at full length: those are prepared too."""
    pipe = tiny_sd_pipeline()
    concepts = [f"painter {i}" for i in range(12)]
    full = set().union(*(full_length_template_indices(i, len(concepts), 6, FitSettings()) for i in range(len(concepts))))
    assert full == set(range(6))  # between them, these concepts take every template at full length
    preparation = prepare_erasure(pipe, kind="style", neutral=["art", "a painting"])
    assert preparation.neutral == ["art", "a painting"]
    EMBEDDINGS.clear()
    encoded = record_encoded_prompts(monkeypatch)
    moments = []
    monkeypatch.setattr(embedding_cache, "save_moment", lambda *a: moments.append(a))
    erase_concept(pipe, concepts, kind="style", load=False)
    erase_concept(pipe, "Van Gogh", kind="style", neutral="a painting", load=False)
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
    preparation = prepare_erasure(pipe, **kwargs)
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
    adapter = erase_concept(pipe, concept, load=False, **kwargs)
    assert adapter.concepts[0] == concept
    assert encoded and all(concept in prompt for prompt in encoded)  # only the concept's own prompts
    assert not new_prefixes  # and no template prefix either
def test_prepare_erasure_without_a_disk_cache_prepares_this_process(monkeypatch):
    monkeypatch.setenv("ACE_DIFFUSERS_CACHE", "off")
    EMBEDDINGS.clear()
    pipe = tiny_sd_pipeline()
    assert prepare_erasure(pipe, kind="object").cache_dir is None
    encoded = record_encoded_prompts(monkeypatch)
    erase_concept(pipe, "cat", kind="object", load=False)
    assert encoded and all("cat" in prompt for prompt in encoded)
    with pytest.raises(ACEValueError, match="Unknown concept kind"):
        prepare_erasure(pipe, kind="animal")
