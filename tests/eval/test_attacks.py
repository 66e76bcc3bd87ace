import pytest
import torch

from ace_diffusers.errors import ACECompatibilityError, ACEValueError
from ace_diffusers.eval.attacks import (
    SoftPromptSettings,
    build_soft_prompt_reference,
    misspellings,
    prompt_attacks,
    replace_concept,
    soft_prompt_attack,
    weighted_variants,
)
from ace_diffusers.testing import random_adapter

TINY = dict(num_inference_steps=2, height=16, width=16)


def test_misspellings_are_deterministic_distinct_edits():
    out = misspellings("circle")
    assert out == misspellings("circle")
    assert out == ["cicrle", "cirle", "cirrcle", "cyrcle", "cir cle"]
    assert len(set(out)) == len(out) and "circle" not in out
    assert misspellings("circle", 2) == out[:2]
    multi = misspellings("Van Gogh")
    assert all(m.startswith("Van ") or m.startswith("Va") for m in multi) and "Van Gogh" not in multi
    assert misspellings("ab") == ["abb", "aab"]
    with pytest.raises(ACEValueError):
        misspellings("  ")


def test_weighted_variants_and_replacement():
    assert weighted_variants("star") == ["(star:1.5)", "((star))", "star star star"]
    assert replace_concept("a red Circle, dotted", "circle", "X") == "a red X, dotted"
    assert replace_concept("circles and a circle", "circle", "X") == "circles and a X"  # whole words only
    with pytest.raises(ACEValueError):
        replace_concept("a red square", "circle", "X")


def test_prompt_attacks_one_variant_per_base_prompt():
    base = ["a red circle", "a blue circle", "a green circle"]
    out = prompt_attacks(base, "circle", neutral="shape", others=["square", "star", "circle"])
    assert set(out) == {"misspelling", "weighting", "context", "negative"}
    assert all(len(v) == 3 for v in out.values())
    assert [a.prompt for a in out["misspelling"]] == ["a red cicrle", "a blue cirle", "a green cirrcle"]
    assert out["weighting"][0].prompt == "a red (circle:1.5)" and out["weighting"][2].prompt == "a green circle circle circle"
    assert all("circle" in a.prompt and ("square" in a.prompt or "star" in a.prompt) for a in out["context"])
    assert out["negative"][0].negative_prompt == "shape" and out["negative"][0].prompt == "a red circle"
    assert out["negative"][1].negative_prompt == "square, star"  # the concept itself is never an "other"
    assert all(a.base_prompt in base for v in out.values() for a in v)
    assert set(prompt_attacks(base, "circle", attacks=["misspelling"])) == {"misspelling"}
    with pytest.raises(ACEValueError):
        prompt_attacks(base, "circle", attacks=["telepathy"])
    with pytest.raises(ACEValueError):
        prompt_attacks(["a red square"], "circle")


@pytest.fixture
def erased_pipe(sd_pipe):
    # a random adapter with an open gate: every prompt is changed, which is all the mechanics need
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, gate_bias=6.0, magnitude=2.0), "erase")
    return sd_pipe


def _encode(pipe, text):
    return pipe.encode_prompt(text, pipe._execution_device, 1, False)[0]


def test_soft_prompt_attention_objective_reduces_the_gap(erased_pipe):
    pipe = erased_pipe
    before = _encode(pipe, "a photo of a cat")
    settings = SoftPromptSettings(steps=15, objective="attention", learning_rate=0.1)
    result = soft_prompt_attack(pipe, "a photo of a cat", "cat", settings=settings)
    assert result.prompt_embeds.shape == before.shape
    assert result.final_loss < 0.9 * result.initial_loss and len(result.losses) == 15
    start, end = result.token_span
    assert end > start >= 1
    # tokens before the concept are untouched (causal CLIP), the rest moved
    assert torch.equal(result.prompt_embeds[:, :start], before[:, :start])
    assert not torch.equal(result.prompt_embeds[:, start:], before[:, start:])
    # the hook is gone and the pipeline unchanged; the embeddings drive the pipeline directly
    assert torch.equal(_encode(pipe, "a photo of a cat"), before)
    images = pipe(prompt_embeds=result.prompt_embeds, output_type="pt", **TINY).images
    assert images.shape == (1, 3, 16, 16)


def test_soft_prompt_reference_is_the_original_model(erased_pipe):
    pipe = erased_pipe
    settings = SoftPromptSettings(steps=0, objective="attention")
    with pipe_disabled(pipe):
        reference = build_soft_prompt_reference(pipe, "a photo of a cat", settings)
    # without the adapter the concept prompt reproduces the reference exactly: the attack's zero point
    with pipe_disabled(pipe):
        result = soft_prompt_attack(pipe, "a photo of a cat", "cat", reference=reference, settings=settings)
    assert result.initial_loss == pytest.approx(0.0, abs=1e-10)
    erased = soft_prompt_attack(pipe, "a photo of a cat", "cat", reference=reference, settings=settings)
    assert erased.initial_loss > 1e-3


def pipe_disabled(pipe):
    from ace_diffusers.eval.common import ace_disabled

    return ace_disabled(pipe)


def test_soft_prompt_denoiser_objective(erased_pipe):
    settings = SoftPromptSettings(steps=6, reference_images=2, timesteps_per_image=2, batch_size=4,
                                  learning_rate=0.1)
    result = soft_prompt_attack(erased_pipe, "a photo of a cat", "cat", settings=settings, sampler=TINY)
    assert result.final_loss < result.initial_loss
    assert result.prompt_embeds.shape[0] == 1
    noise = soft_prompt_attack(erased_pipe, "a photo of a cat", "cat", sampler=TINY,
                               settings=SoftPromptSettings(steps=1, target="noise", reference_images=1,
                                                           timesteps_per_image=2))
    assert noise.prompt_embeds.shape == result.prompt_embeds.shape


def test_soft_prompt_neutral_init_and_validation(erased_pipe):
    settings = SoftPromptSettings(steps=2, objective="attention", init="neutral")
    result = soft_prompt_attack(erased_pipe, "a photo of a cat", "cat", neutral="animal", settings=settings)
    assert result.prompt_embeds.shape[1] == 77
    with pytest.raises(ACEValueError):
        soft_prompt_attack(erased_pipe, "a photo of a cat", "cat", settings=settings)  # no anchor to start from
    with pytest.raises(ACEValueError):
        soft_prompt_attack(erased_pipe, "a photo of a dog", "cat", settings=SoftPromptSettings(steps=1, objective="attention"))
    with pytest.raises(ACEValueError):
        SoftPromptSettings(objective="magic").validate()


def test_soft_prompt_attack_rejects_sdxl(sdxl_pipe):
    with pytest.raises(ACECompatibilityError):
        soft_prompt_attack(sdxl_pipe, "a cat", "cat", settings=SoftPromptSettings(steps=1, objective="attention"))
