"""The fit data: aligned concept/neutral tokens and which templates are encoded at full length."""

import torch

from ace_diffusers import (
    erase_concept,
)
from ace_diffusers.fitting.data import FitSettings, align_tokens, full_length_template_indices
from ace_diffusers.testing import tiny_sd_pipeline

from .conftest import CONCEPT_GAP_LEFT, TEXT_DIM, UNRELATED_GATE, concept_gap_left, max_gate


def test_align_tokens_pairs_prefix_span_and_suffix():
    from ace_diffusers.fitting.text import EncodedPrompt

    def enc(rows, span):
        return EncodedPrompt("", torch.zeros(rows, 1), span, rows)

    # "<s> a [van gogh] painting </s>" vs "<s> a [art] painting </s>": 6 vs 5 tokens
    assert align_tokens(enc(6, (2, 4)), enc(5, (2, 3))) == [(0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (5, 4)]
    # empty anchor: the concept collapses onto the token that follows it
    assert align_tokens(enc(4, (1, 2)), enc(3, None)) == [(0, 0), (1, 1), (2, 1), (3, 2)]
    assert align_tokens(enc(4, None), enc(4, (1, 2))) == []


def test_full_length_budget_spreads_over_concepts_and_unsampled_concepts_still_move():
    from ace_diffusers.bench.closed_form import concept_names

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
