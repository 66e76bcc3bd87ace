"""The on-disk cache of preset prompt embeddings: reused across processes, keyed by the encoder's weights."""

import copy
import warnings

import pytest
import torch

from ace_diffusers import erase_concept
from ace_diffusers.fitting import clip_packing, embedding_cache
from ace_diffusers.fitting.data import FitSettings
from ace_diffusers.fitting.embedding_cache import EMBEDDINGS
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

from ..conftest import edit_factors, record_encoded_prompts, relative_gap

# what is cached here is the closed form's own prompts; the neighbour miner's (which add query-bank and
# probe prompts to a fit) are covered by test_closed_form's preparation test
PLAIN = FitSettings(neighbours=0)


def cached_files(root):
    return sorted(root.rglob("*.safetensors"))


def test_a_new_process_reads_preset_embeddings_from_disk(cache_dir, monkeypatch):
    pipe = tiny_sd_pipeline()
    first = erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    files = cached_files(cache_dir)
    assert files, "the preset prompts were not written"
    EMBEDDINGS.clear()  # what a new process starts with
    encoded = record_encoded_prompts(monkeypatch)
    second = erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    assert encoded and all("Van Gogh" in p for p in encoded)  # only the concept's own prompts were encoded
    assert relative_gap(second, first) < 1e-3  # float rounding only (the batches differ)
    assert cached_files(cache_dir) == files  # nothing rewritten


def test_a_new_process_reads_the_other_tokens_second_moment_from_disk(cache_dir, monkeypatch):
    """The d x d second moment of the kind's other tokens is stored once and read back, not recomputed."""
    pipe = tiny_sd_pipeline()
    erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    (kept,) = EMBEDDINGS.memory(TextEmbedder(pipe)).moments.values()
    assert len(sorted((cache_dir / "moments").rglob("*.safetensors"))) == 1
    EMBEDDINGS.clear()  # what a new process starts with
    loaded = []
    original = embedding_cache.load_moment
    monkeypatch.setattr(embedding_cache, "load_moment", lambda *a: loaded.append(original(*a)) or loaded[-1])
    # another concept, the same preset prompts
    erase_concept(pipe, "Zed Zulu", kind="style", load=False, settings=PLAIN)
    assert len(loaded) == 1 and loaded[0] is not None
    torch.testing.assert_close(loaded[0].double(), kept, rtol=0, atol=0)
    assert len(sorted((cache_dir / "moments").rglob("*.safetensors"))) == 1


@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_a_new_process_reuses_the_stored_template_prefixes(cache_dir, monkeypatch, builder):
    """The templates' prefixes are computed once (keys/values of every layer) and read back from disk."""
    pipe = builder()
    first = erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    prefix_files = sorted((cache_dir / "prefixes").rglob("*.safetensors"))
    n_encoders = len(TextEmbedder(pipe).encoders)
    assert (
        len(prefix_files) == 5 * n_encoders
    )  # the style templates whose prefix has >= 2 tokens, per encoder
    EMBEDDINGS.clear()  # what a new process starts with
    passes = []
    original = clip_packing.run_clip_layers
    monkeypatch.setattr(
        clip_packing, "run_clip_layers", lambda *a, **k: passes.append(a[-1]) or original(*a, **k)
    )
    second = erase_concept(pipe, "Claude Monet", kind="style", load=False, settings=PLAIN)
    assert passes and all(
        prefix_kv is not None for prefix_kv in passes
    )  # no prefix pass: every tail reads stored ones
    assert sorted((cache_dir / "prefixes").rglob("*.safetensors")) == prefix_files
    EMBEDDINGS.clear()
    monkeypatch.setenv("ACE_DIFFUSERS_CACHE", "off")  # the same fit computed from scratch
    fresh = erase_concept(pipe, "Claude Monet", kind="style", load=False, settings=PLAIN)
    assert relative_gap(second, fresh) < 1e-3 and relative_gap(first, fresh) > 0.01


def test_a_text_encoder_moved_to_another_dtype_does_not_reuse_kept_prefixes(cache_dir):
    """``.to(dtype)`` leaves weight versions alone; the in-memory cache must still start afresh."""
    pipe = tiny_sd_pipeline()
    erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    pipe.text_encoder.to(torch.bfloat16)
    adapter = erase_concept(pipe, "Claude Monet", kind="style", load=False, settings=PLAIN)
    assert torch.isfinite(edit_factors(adapter)).all()
    stores = EMBEDDINGS.memory(TextEmbedder(pipe)).prefixes
    assert stores[0] and all(out.dtype == torch.bfloat16 for out, _ in stores[0].values())


def test_changed_weights_get_their_own_entries(cache_dir):
    pipe = tiny_sd_pipeline()
    erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    key = embedding_cache.fingerprint(TextEmbedder(pipe))
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight.mul_(1.01)  # e.g. a fine-tuned text encoder
    assert embedding_cache.fingerprint(TextEmbedder(pipe)) != key
    erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    assert len({f.parent.name for f in cached_files(cache_dir)}) == 2


def test_unreadable_cache_files_are_reencoded_with_a_warning(cache_dir):
    pipe = tiny_sd_pipeline()
    first = erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    for path in cached_files(cache_dir):
        path.write_bytes(b"not a safetensors file")
    EMBEDDINGS.clear()
    with pytest.warns(UserWarning, match="unreadable or altered embedding cache"):
        again = erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    assert relative_gap(again, first) < 1e-3


def _rewrite_tensors(path, change):
    """Rewrite a cache file with its metadata (and so its recorded checksum) unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    save_file({k: change(t) for k, t in tensors.items()}, str(path), metadata=meta)


@pytest.mark.parametrize(
    "change",
    [torch.zeros_like, lambda t: t.reshape(-1)[:3].clone()],
    ids=["values-replaced", "wrong-shape"],
)
def test_altered_cache_entries_are_recomputed_replaced_and_warned_once(cache_dir, change):
    pipe = tiny_sd_pipeline()
    first = erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    for path in cached_files(cache_dir):
        _rewrite_tensors(path, change)
    EMBEDDINGS.clear()
    with pytest.warns(UserWarning, match="altered embedding cache") as caught:
        again = erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    assert len([w for w in caught if "embedding cache" in str(w.message)]) <= 3  # one per kind of file
    assert relative_gap(again, first) < 1e-3  # the same adapter, not one fitted on zeros
    EMBEDDINGS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entries were replaced: a third fit reads them silently
        third = erase_concept(pipe, "Van Gogh", kind="style", load=False, settings=PLAIN)
    assert relative_gap(third, first) < 1e-3


@pytest.mark.parametrize("setting", ["off", "0"])
def test_the_cache_can_be_turned_off(tmp_path, monkeypatch, setting):
    monkeypatch.setenv("ACE_DIFFUSERS_CACHE", setting)
    monkeypatch.chdir(tmp_path)
    EMBEDDINGS.clear()
    erase_concept(tiny_sd_pipeline(), "Van Gogh", kind="style", load=False, settings=PLAIN)
    assert embedding_cache.cache_root() is None and not list(tmp_path.rglob("*.safetensors"))


def test_an_unwritable_cache_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("ACE_DIFFUSERS_CACHE", str(blocker))
    EMBEDDINGS.clear()
    with pytest.warns(UserWarning, match="Could not write the embedding cache"):
        adapter = erase_concept(tiny_sd_pipeline(), "Van Gogh", kind="style", load=False, settings=PLAIN)
    assert adapter.concepts == ["Van Gogh"]


def test_a_different_padding_token_gets_its_own_entries(cache_dir):
    pipe = tiny_sd_pipeline()
    key = embedding_cache.fingerprint(TextEmbedder(pipe))
    pipe.tokenizer = copy.deepcopy(pipe.tokenizer)  # the test tokenizer is shared by every tiny pipeline
    pipe.tokenizer.pad_token = "!"  # SD2-style padding: every padded position reads another token
    assert embedding_cache.fingerprint(TextEmbedder(pipe)) != key
