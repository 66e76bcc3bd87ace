"""The soft-prompt attack on an erased model: the objectives lower their loss, the reference is the original
model, the pipeline is left unchanged."""

import pytest
import torch

from ace_diffusers.errors import ACECompatibilityError, ACEValueError
from ace_diffusers.eval.common import ace_disabled
from ace_diffusers.eval.soft_prompt import SoftPromptSettings, build_soft_prompt_reference, soft_prompt_attack

from .conftest import encode

TINY = dict(num_inference_steps=2, height=16, width=16)


def test_soft_prompt_attention_objective_reduces_the_gap(erased_pipe):
    pipe = erased_pipe
    before = encode(pipe, "a photo of a cat")
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
    assert torch.equal(encode(pipe, "a photo of a cat"), before)
    images = pipe(prompt_embeds=result.prompt_embeds, output_type="pt", **TINY).images
    assert images.shape == (1, 3, 16, 16)


def test_soft_prompt_reference_is_the_original_model(erased_pipe):
    pipe = erased_pipe
    settings = SoftPromptSettings(steps=0, objective="attention")
    with ace_disabled(pipe):
        reference = build_soft_prompt_reference(pipe, "a photo of a cat", settings)
    # without the adapter the concept prompt reproduces the reference exactly: the attack's zero point
    with ace_disabled(pipe):
        result = soft_prompt_attack(pipe, "a photo of a cat", "cat", reference=reference, settings=settings)
    assert result.initial_loss == pytest.approx(0.0, abs=1e-10)
    erased = soft_prompt_attack(pipe, "a photo of a cat", "cat", reference=reference, settings=settings)
    assert erased.initial_loss > 1e-3


def test_soft_prompt_denoiser_objective(erased_pipe):
    settings = SoftPromptSettings(
        steps=6, reference_images=2, timesteps_per_image=2, batch_size=4, learning_rate=0.1
    )
    result = soft_prompt_attack(erased_pipe, "a photo of a cat", "cat", settings=settings, sampler=TINY)
    assert result.final_loss < result.initial_loss
    assert result.prompt_embeds.shape[0] == 1
    noise = soft_prompt_attack(
        erased_pipe,
        "a photo of a cat",
        "cat",
        sampler=TINY,
        settings=SoftPromptSettings(steps=1, target="noise", reference_images=1, timesteps_per_image=2),
    )
    assert noise.prompt_embeds.shape == result.prompt_embeds.shape


def test_soft_prompt_neutral_init_and_validation(erased_pipe):
    settings = SoftPromptSettings(steps=2, objective="attention", init="neutral")
    result = soft_prompt_attack(erased_pipe, "a photo of a cat", "cat", neutral="animal", settings=settings)
    assert result.prompt_embeds.shape[1] == 77
    with pytest.raises(ACEValueError):
        soft_prompt_attack(
            erased_pipe, "a photo of a cat", "cat", settings=settings
        )  # no anchor to start from
    with pytest.raises(ACEValueError):
        soft_prompt_attack(
            erased_pipe,
            "a photo of a dog",
            "cat",
            settings=SoftPromptSettings(steps=1, objective="attention"),
        )
    with pytest.raises(ACEValueError):
        SoftPromptSettings(objective="magic").validate()


def test_soft_prompt_attack_rejects_sdxl(sdxl_pipe):
    with pytest.raises(ACECompatibilityError):
        soft_prompt_attack(
            sdxl_pipe, "a cat", "cat", settings=SoftPromptSettings(steps=1, objective="attention")
        )


def test_settings_validate_and_serialise():
    settings = SoftPromptSettings(steps=0, t_range=(0.1, 0.9))
    assert settings.validate() is settings
    assert settings.to_dict()["t_range"] == [0.1, 0.9] and settings.to_dict()["steps"] == 0
    bad = [
        dict(target="x"),
        dict(init="random"),
        dict(steps=-1),
        dict(batch_size=0),
        dict(reference_images=True),
        dict(timesteps_per_image=1.5),
        dict(learning_rate=0.0),
    ]
    for kwargs in bad:
        with pytest.raises(ACEValueError):
            SoftPromptSettings(**kwargs).validate()


def test_a_reference_for_another_objective_is_refused(erased_pipe):
    settings = SoftPromptSettings(steps=0, objective="attention")
    reference = build_soft_prompt_reference(erased_pipe, "a photo of a cat", settings)
    assert reference.objective == "attention" and reference.latents is None
    assert len(reference.keys_values) == len(erased_pipe.unet.attn_processors) // 2  # one per cross-attention
    with pytest.raises(ACEValueError, match="objective"):
        soft_prompt_attack(
            erased_pipe,
            "a photo of a cat",
            "cat",
            reference=reference,
            settings=SoftPromptSettings(steps=0, objective="denoiser"),
        )


def test_denoiser_reference_bank(erased_pipe):
    settings = SoftPromptSettings(reference_images=2, timesteps_per_image=3, target="noise")
    reference = build_soft_prompt_reference(erased_pipe, "a photo of a cat", settings, sampler=TINY)
    assert reference.latents.shape[0] == reference.timesteps.shape[0] == reference.targets.shape[0] == 6
    total = len(erased_pipe.scheduler.alphas_cumprod)
    low, high = settings.t_range
    assert all(low * (total - 1) - 1 <= t <= high * (total - 1) + 1 for t in reference.timesteps.tolist())
    again = build_soft_prompt_reference(erased_pipe, "a photo of a cat", settings, sampler=TINY)
    assert torch.equal(again.latents, reference.latents) and torch.equal(again.targets, reference.targets)


def test_checkpoints_give_the_attack_at_every_budget_from_one_run(erased_pipe):
    settings = SoftPromptSettings(steps=4, objective="attention", learning_rate=0.1)
    result = soft_prompt_attack(erased_pipe, "a photo of a cat", "cat", settings=settings,
                                checkpoints=[0, 2, 4])
    assert sorted(result.checkpoint_embeds) == [0, 2, 4]
    torch.testing.assert_close(result.checkpoint_embeds[0], encode(erased_pipe, "a photo of a cat"))
    assert torch.equal(result.checkpoint_embeds[4], result.prompt_embeds)
    two = soft_prompt_attack(erased_pipe, "a photo of a cat", "cat",
                             settings=SoftPromptSettings(steps=2, objective="attention", learning_rate=0.1))
    torch.testing.assert_close(result.checkpoint_embeds[2], two.prompt_embeds)  # the same run, cut short
    with pytest.raises(ACEValueError, match="checkpoints must be step counts from 0 to 4"):
        soft_prompt_attack(erased_pipe, "a photo of a cat", "cat", settings=settings, checkpoints=[5])


def test_progress_is_told_every_step(erased_pipe):
    seen = []
    soft_prompt_attack(erased_pipe, "a photo of a cat", "cat", progress=seen.append,
                       settings=SoftPromptSettings(steps=3, objective="attention"))
    assert seen == [1, 2, 3]
