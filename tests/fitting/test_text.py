"""Prompts become exactly the embeddings the pipeline cross-attends to, shared prefixes included."""

import pytest
import torch

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
