"""Prompts become exactly the embeddings the pipeline cross-attends to, shared prefixes included."""

import pytest
import torch

from ace_diffusers.fitting import text as text_module
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


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
    monkeypatch.setattr(
        text_module, "PASS_COST_TOKENS", pass_cost
    )  # 0: every shared prefix takes the cached path
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
    calls = [
        (None, None),
        (3, None),
        (3, stores),
        (None, stores),
    ]  # the last call reads the prefixes the third stored
    for extra, prefix_stores in calls:
        ours = embedder.encode(prompts, spans, extra_pad_tokens=extra, prefix_stores=prefix_stores)
        for enc, full in zip(ours, theirs, strict=True):
            torch.testing.assert_close(enc.embeddings, full[: enc.embeddings.shape[0]], rtol=1e-5, atol=1e-5)
    assert all(len(store) == 2 for store in stores)  # the two templates with a prefix of >= 2 tokens
    one = embedder.encode(prompts[:1], spans[:1], extra_pad_tokens=None, prefix_stores=stores)[
        0
    ]  # a lone row uses it too
    torch.testing.assert_close(one.embeddings, theirs[0], rtol=1e-5, atol=1e-5)
