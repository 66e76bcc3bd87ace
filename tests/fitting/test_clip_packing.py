"""Shared prefixes and packed tails give exactly what the encoder gives on each prompt alone."""

import pytest
import torch

from ace_diffusers.fitting import clip_packing
from ace_diffusers.fitting.text import TextEmbedder
from ace_diffusers.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.mark.parametrize(
    "pass_cost, pack, per_pass",
    [(0, 128, 512), (clip_packing.PASS_COST_TOKENS, 128, 512), (0, 24, 48)],
    ids=["always-share", "cost-model", "small-packs"],
)
@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_shared_prefix_encoding_is_exact(builder, pass_cost, pack, per_pass, monkeypatch):
    """Prompts sharing the tokens before their phrase encode that prefix once, rows are packed several
    to a sequence, and stored prefixes are reused by later calls; the numbers are encode_prompt's."""
    monkeypatch.setattr(
        clip_packing, "PASS_COST_TOKENS", pass_cost
    )  # 0: every shared prefix takes the cached path
    monkeypatch.setattr(clip_packing, "PACK_TOKENS", pack)  # 24: rows spread over many packed sequences ...
    monkeypatch.setattr(clip_packing, "PASS_TOKENS", per_pass)  # ... a few per pass
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


def test_prefixes_are_kept_for_later_calls_and_rows_match_the_plain_encoder(sd_pipe):
    from ace_diffusers.fitting.clip_packing import encode_with_shared_prefixes

    tokenizer, encoder = sd_pipe.tokenizer, sd_pipe.text_encoder
    prompts = ["a painting by Van Gogh", "a painting by Monet", "a photo of a cat"]
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    shared, keep = [4, 4, 0], [12, 12, 10]
    store: dict = {}
    rows = encode_with_shared_prefixes(encoder, ids, shared, keep, False, prefix_store=store)
    with torch.no_grad():
        full = encoder(ids)[0]
    for i, row in enumerate(rows):
        torch.testing.assert_close(row, full[i, : keep[i]], rtol=1e-4, atol=1e-5)
    assert len(store) == 1  # "<s> a painting by" once, reused by both rows and kept
