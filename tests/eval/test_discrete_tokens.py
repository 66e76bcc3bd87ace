"""The discrete-token attack: a text prompt of real tokens, found by coordinate search, that lowers the
attack loss on an erased model; the pipeline is left unchanged; bad settings are refused before work."""

import pytest
import torch

from ace_diffusers.errors import ACEValueError
from ace_diffusers.eval.discrete_tokens import DiscreteTokenSettings, discrete_token_attack
from ace_diffusers.eval.soft_prompt import SoftPromptSettings
from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present

from .conftest import encode

TINY = dict(num_inference_steps=2, height=16, width=16)
# the whole bank in every batch: each step's loss is the full loss, so the search never goes up
REFERENCE = SoftPromptSettings(reference_images=1, timesteps_per_image=2, batch_size=8)


@pytest.mark.parametrize("placement", ["replace", "prepend"])
def test_search_finds_real_tokens_that_lower_the_loss(erased_pipe, placement):
    pipe = erased_pipe
    before = encode(pipe, "a photo of a cat")
    settings = DiscreteTokenSettings(steps=4, candidates=6, top_k=8, placement=placement, reference=REFERENCE)
    result = discrete_token_attack(pipe, "a photo of a cat", "cat", settings=settings, sampler=TINY)
    assert len(result.tokens) == 3 and len(result.losses) == 4
    assert all(b <= a for a, b in zip(result.losses, result.losses[1:], strict=False))
    assert result.final_loss <= result.initial_loss
    # a text prompt made of whole words, never the concept's own token, re-tokenised as searched
    assert result.exact and all(t.isalpha() for t in result.tokens)
    cat_ids = pipe.tokenizer("cat", add_special_tokens=False)["input_ids"]
    assert not set(cat_ids) & set(result.token_ids)
    if placement == "replace":
        assert "cat" not in result.prompt.split() and result.prompt.startswith("a photo of a ")
    else:
        assert result.prompt.endswith("a photo of a cat")
    assert torch.equal(encode(pipe, "a photo of a cat"), before)  # no hook left behind
    images = pipe(result.prompt, output_type="pt", **TINY).images
    assert images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize(
    "settings, message",
    [
        (DiscreteTokenSettings(n_tokens=0), "n_tokens must be an integer"),
        (DiscreteTokenSettings(top_k=True), "top_k must be an integer"),
        (DiscreteTokenSettings(placement="append"), "placement must be one of"),
        (
            DiscreteTokenSettings(reference=SoftPromptSettings(objective="attention")),
            "denoiser objective",
        ),
        (DiscreteTokenSettings(n_tokens=200), "attackable tokens"),
    ],
)
def test_bad_settings_are_refused(erased_pipe, settings, message):
    with pytest.raises(ACEValueError, match=message):
        discrete_token_attack(erased_pipe, "a photo of a cat", "cat", settings=settings, sampler=TINY)


@pytest.mark.skipif(not weights_present(), reason=f"miniature-world weights absent from {WEIGHTS_DIR}")
def test_a_real_attack_on_the_miniature_world():
    """From random tokens, with the concept's own word never allowed, the default search finds a prompt
    that the un-erased world draws as the concept (ASR >= 80 % over 32 images)."""
    from ace_diffusers.shapes.classifier import load_shapes_classifier
    from ace_diffusers.shapes.pipeline import DEFAULT_SAMPLER, generate, load_shapes_pipeline

    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    result = discrete_token_attack(pipe, "a red circle", "circle", sampler=dict(DEFAULT_SAMPLER))
    assert "circle" not in result.prompt.split() and result.exact  # "circles" is a fair find
    shapes = load_shapes_classifier().predict(generate(pipe, [result.prompt] * 32, seeds=list(range(32))))
    assert sum(s == "circle" for s in shapes["shape"]) >= 0.8 * 32, (result.prompt, shapes["shape"])
