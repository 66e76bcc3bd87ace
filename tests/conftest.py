"""Shared fixtures. Offline by default: the Hub tests switch on their own 127.0.0.1 server."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub read it at import
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# preset-prompt embeddings cached on disk go to a fresh directory, never the user's ~/.cache
os.environ.setdefault("ACE_DIFFUSERS_CACHE", tempfile.mkdtemp(prefix="ace-test-embeddings-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import ace_diffusers  # noqa: E402,F401  (installs the pipeline verbs)

# The tiny test models are far faster on one thread, and CI machines have only two cores.
torch.set_num_threads(int(os.environ.get("ACE_TEST_THREADS", "1")))
from ace_diffusers.deploy.bake import bake  # noqa: E402
from ace_diffusers.fitting import vocabulary  # noqa: E402
from ace_diffusers.fitting.embedding_cache import EMBEDDINGS  # noqa: E402
from ace_diffusers.fitting.text import TextEmbedder  # noqa: E402
from ace_diffusers.testing import tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

TEST_DICTIONARY = 2000  # English words the tests' trainers mine from (the default list is 100,000)


@pytest.fixture(autouse=True)
def small_dictionary(monkeypatch):
    """The trainer's dictionary of split words, cut to the most frequent :data:`TEST_DICTIONARY`: the
    full list costs a minute or two to encode per text encoder, and the mechanism is the same
    (``tests/fitting/test_vocabulary.py`` checks the full list; ``tests/shapes`` the world's words)."""
    full = vocabulary.english_words
    monkeypatch.setattr(
        vocabulary, "english_words", lambda count=None: full(TEST_DICTIONARY if count is None else count)
    )


@pytest.fixture
def sd_pipe():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture
def sdxl_pipe():
    return tiny_sdxl_pipeline(seed=0)


def generate(pipe, prompt="a photo of a cat", seed=0, steps=2):
    """Deterministic 32x32 images as a tensor (the tiny pipelines' fast path)."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompt, num_inference_steps=steps, generator=generator, output_type="pt", height=32, width=32
    ).images


@pytest.fixture
def run():
    return generate


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty on-disk embedding cache and an empty in-memory one (what a fresh machine starts with)."""
    monkeypatch.setenv("ACE_DIFFUSERS_CACHE", str(tmp_path / "cache"))
    EMBEDDINGS.clear()
    yield tmp_path / "cache"
    EMBEDDINGS.clear()


def record_encoded_prompts(monkeypatch):
    """Every prompt the text embedder encodes from now on (a list that fills as they are encoded)."""
    encoded = []
    original = TextEmbedder.encode
    monkeypatch.setattr(
        TextEmbedder,
        "encode",
        lambda self, prompts, *a, **k: encoded.extend(prompts) or original(self, prompts, *a, **k),
    )
    return encoded


def edit_factors(adapter):
    """The edits ΔW = B A of every layer (the factors themselves are defined up to a rotation)."""
    return torch.cat(
        [(f.k_up @ f.k_down).flatten() for f in adapter.layers.values()]
        + [(f.v_up @ f.v_down).flatten() for f in adapter.layers.values()]
    )


def relative_gap(a, b):
    """How far adapter ``a``'s edits are from ``b``'s, relative to ``b``'s."""
    return float((edit_factors(a) - edit_factors(b)).norm() / edit_factors(b).norm())


class SDPARecorder:
    """Records (query, key, value) of every scaled-dot-product-attention call, in call order."""

    def __init__(self):
        self.calls = []

    def __call__(self, original):
        def wrapper(query, key, value, *args, **kwargs):
            self.calls.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
            return original(query, key, value, *args, **kwargs)

        return wrapper


@pytest.fixture
def sdpa_recorder(monkeypatch):
    recorder = SDPARecorder()
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        recorder(torch.nn.functional.scaled_dot_product_attention),
    )
    return recorder


@pytest.fixture(scope="module")
def fitted():
    """A tiny SD pipeline (no adapter loaded), an adapter fitted on it, and its baked edit."""
    pipe = tiny_sd_pipeline(text_dim=128)
    adapter = pipe.erase_concept("Van Gogh", kind="style", load=False)
    return pipe, adapter, bake(pipe, adapter)
