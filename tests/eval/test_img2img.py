"""The img2img probe: the erased model re-draws pictures of the concept through diffusers' own img2img
pipeline, sharing the UNet (so adapters act); strength and inputs are checked before any work."""

import pytest
import torch

from ace_diffusers.errors import ACEValueError
from ace_diffusers.eval.common import ace_disabled
from ace_diffusers.eval.img2img import img2img_probe
from ace_diffusers.shapes.pipeline import WEIGHTS_DIR, weights_present

TINY = dict(num_inference_steps=4)


def test_the_probe_redraws_with_the_adapter_in_effect(erased_pipe):
    pictures = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    erased = img2img_probe(erased_pipe, "a photo of a cat", pictures, [1, 2], strength=0.5, sampler=TINY)
    assert erased.shape == (2, 3, 16, 16) and 0 <= float(erased.min()) and float(erased.max()) <= 1
    with ace_disabled(erased_pipe):
        plain = img2img_probe(erased_pipe, "a photo of a cat", pictures, [1, 2], strength=0.5, sampler=TINY)
    assert not torch.allclose(erased, plain, atol=1e-3)  # the UNet (and its adapter) is shared
    again = img2img_probe(erased_pipe, "a photo of a cat", pictures, [1, 2], strength=0.5, sampler=TINY)
    assert torch.equal(erased, again)  # seeded


@pytest.mark.parametrize("strength", [0, 1.5, float("nan"), "0.5", True])
def test_bad_strength_is_refused(sd_pipe, strength):
    with pytest.raises(ACEValueError, match="strength must be a number in"):
        img2img_probe(sd_pipe, "a cat", torch.rand(1, 3, 16, 16), [0], strength=strength)


def test_one_seed_per_picture(sd_pipe):
    with pytest.raises(ACEValueError, match="one seed per image"):
        img2img_probe(sd_pipe, "a cat", torch.rand(2, 3, 16, 16), [0])


@pytest.mark.skipif(not weights_present(), reason=f"miniature-world weights absent from {WEIGHTS_DIR}")
def test_the_miniature_world_keeps_its_own_picture_and_its_config():
    """The base world keeps a circle it drew (it is a faithful img2img), and the non-square UNet's
    config is what it was after the img2img pipeline is built."""
    from ace_diffusers.shapes.classifier import load_shapes_classifier
    from ace_diffusers.shapes.pipeline import DEFAULT_SAMPLER, generate, load_shapes_pipeline

    pipe = load_shapes_pipeline()
    size = pipe.unet.config.sample_size
    pictures = generate(pipe, ["a red circle"] * 8, seeds=list(range(8)))
    redrawn = img2img_probe(pipe, "a red circle", pictures, list(range(8)), strength=0.5,
                            sampler=dict(DEFAULT_SAMPLER))
    shapes = load_shapes_classifier().predict(redrawn)["shape"]
    assert sum(s == "circle" for s in shapes) >= 7, shapes
    assert pipe.unet.config.sample_size == size
