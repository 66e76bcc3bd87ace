"""Mined neighbours in the closed form: recorded, weighted, laid out after the user's prompts, and
their query bank made once per UNet weights state."""

import torch

from ace_diffusers import erase_concept
from ace_diffusers.fitting import neighbours as neighbours_module
from ace_diffusers.fitting.data import FitSettings, fit_jobs
from ace_diffusers.fitting.neighbours import MAX_MINED_CONCEPTS, mining_record, query_bank
from ace_diffusers.fitting.presets import resolve_spec
from ace_diffusers.fitting.text import TextEmbedder


def test_the_fit_records_the_mined_words_and_erases_them_with_the_concept(sd_pipe):
    adapter = erase_concept(sd_pipe, "Van Gogh", kind="style", load=False)
    mined = adapter.fit["mined_neighbours"]["Van Gogh"]
    assert 0 < len(mined) <= FitSettings().neighbours
    assert adapter.concepts == ["Van Gogh"]  # the adapter still names the user's concepts only
    assert (
        adapter.fit["stats"]["concept_tokens"]
        > erase_concept(
            sd_pipe, "Van Gogh", kind="style", load=False, settings=FitSettings(neighbours=0)
        ).fit["stats"]["concept_tokens"]
    )


def test_neighbour_prompts_come_after_the_users_which_are_unchanged():
    spec = resolve_spec("Van Gogh", kind="style")
    settings = FitSettings()
    plain = fit_jobs(spec, settings)
    mined = fit_jobs(spec, settings, {"sunflowers": "Van Gogh", "starry": "Van Gogh"})
    n_new = 2 * settings.neighbour_templates
    assert mined.neighbour_jobs == n_new and plain.neighbour_jobs == 0
    assert mined.concept[: len(plain.concept)] == plain.concept and mined.other == plain.other
    assert all(job[2] == settings.extra_pad_tokens for job in mined.concept[-n_new:])  # few padding tokens
    assert mined.concept[-1][0] == spec.templates[settings.neighbour_templates - 1].format("starry")


def test_mining_is_skipped_and_said_so_for_many_concepts_or_none_asked(sd_pipe, monkeypatch):
    many = [f"concept{i}" for i in range(MAX_MINED_CONCEPTS + 1)]
    adapter = erase_concept(sd_pipe, many, load=False)
    assert "skipped" in adapter.fit["mined_neighbours"]
    spec = resolve_spec("Van Gogh", kind="style")
    assert mining_record(spec, {}, 0) == {"skipped": "neighbours=0"}
    called = []
    monkeypatch.setattr(neighbours_module, "capture_queries", lambda *a, **k: called.append(1))
    erase_concept(sd_pipe, "Monet", load=False, settings=FitSettings(neighbours=0))
    assert not called


def test_the_query_bank_is_made_once_per_weights_state(sd_pipe):
    embedder, spec = TextEmbedder(sd_pipe), resolve_spec("Van Gogh", kind="style")
    first = query_bank(sd_pipe.unet, embedder, spec)
    assert query_bank(sd_pipe.unet, embedder, spec) is first
    with torch.no_grad():
        next(sd_pipe.unet.parameters()).mul_(1.0)  # an in-place change, even one that keeps the values
    assert query_bank(sd_pipe.unet, embedder, spec) is not first
