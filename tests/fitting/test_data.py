"""The fit data: aligned concept/neutral tokens and which templates are encoded at full length."""

import torch

from ace_diffusers import (
    erase_concept,
)
from ace_diffusers.fitting.data import (
    FitSettings,
    align_tokens,
    context_templates,
    fit_jobs,
    full_length_template_indices,
)
from ace_diffusers.fitting.presets import resolve_spec
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
    # without paired prompts: they are the next test's; here they only move the figure (one per concept
    # leaves ~10 % more of the gap on this random encoder; the miniature world erases as before)
    erase_concept(pipe, names, kind="style", settings=FitSettings(context_prompts=0))
    unsampled = [n for n, c in zip(names, chosen, strict=True) if not c][:4]
    for name in unsampled:
        assert concept_gap_left(pipe, "art by {}", name, "art") < CONCEPT_GAP_LEFT, name
    assert max_gate(pipe, "a photo of a cat") < UNRELATED_GATE


def test_paired_prompts_put_a_kept_phrase_beside_the_concept_the_same_in_every_fit_of_a_kind():
    spec = resolve_spec("Van Gogh", kind="style")
    paired = context_templates(spec, "Van Gogh", 4)
    assert len(paired) == 4 and all(t.count("{}") == 1 for t in paired)
    assert any(" and " in t for t in paired) and any(" with " in t for t in paired)
    assert all(any(p in t for p in spec.preserve) for t in paired)
    # a kept phrase that is itself erased is left out, not replaced: the others keep their prompts
    monet = context_templates(resolve_spec("Claude Monet", kind="style"), "Claude Monet", 4)
    assert not any("Claude Monet" in t for t in monet)
    same = [t.replace("{}", "") for t in paired[1:]]
    assert same == [t.replace("{}", "") for t in monet]
    # jobs: a few per concept within the budget; beyond it one each, the kept phrases taken in turn, so
    # that the fit still pairs its concepts with every one of them (a thousand-concept fit without them
    # kept "a blue triangle" beside an erased circle in half the images: docs/benchmarks.md, bench mass)
    settings = FitSettings()
    one = fit_jobs(spec, settings)
    painters = [f"painter {i}" for i in range(17)]
    many_spec = resolve_spec(painters, kind="style")
    many = fit_jobs(many_spec, settings)
    assert sum(" and " in j[0] or " with " in j[0] for j in one.concept) == settings.context_prompts
    paired_jobs = [j[0] for j in many.concept if " and " in j[0] or " with " in j[0]]
    assert len(paired_jobs) == len(painters)
    assert all(p in j for p, j in zip(painters, paired_jobs, strict=True))
    kept_in_turn = [next(k for k in many_spec.preserve if k in j) for j in paired_jobs]
    assert kept_in_turn == [many_spec.preserve[i % len(many_spec.preserve)] for i in range(len(painters))]
    assert not any(" and " in j[0] or " with " in j[0] for j in fit_jobs(
        many_spec, FitSettings(context_prompts=0)).concept)
