"""The eval-unlearn technique ``ace``: registered by entry point, built from keyword arguments the way
the harness builds techniques, ``generate(prompts, seed=None)`` returns one PIL image per prompt."""

from importlib.metadata import entry_points

import numpy as np
import pytest

from ace_diffusers.errors import ACEValueError
from ace_diffusers.eval.harness import ACETechnique
from ace_diffusers.testing import tiny_sd_pipeline

FAST = {"num_inference_steps": 2, "guidance_scale": 1.0}


def registered():
    (entry,) = [e for e in entry_points(group="eval_unlearn.techniques") if e.name == "ace"]
    return entry.load()


def test_the_technique_is_found_through_the_harness_entry_point_group():
    assert registered() is ACETechnique


def test_fit_then_generate_like_the_harness_runner():
    factory = registered()
    technique = factory(pipeline=tiny_sd_pipeline(), concepts="Van Gogh", kind="style", **FAST)
    assert technique.pipe.get_list_ace_adapters() == [technique.adapter_name]
    prompts = ["a painting in the style of Van Gogh", "a photo of a cat"]
    images = technique.generate(prompts=prompts, seed=0, height=32, width=32)
    assert len(images) == 2 and images[0].size == (32, 32)
    again = technique.generate(prompts=prompts, seed=0, height=32, width=32)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True))


def test_a_published_adapter_is_loaded_instead_of_fitting(tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.erase_concept("Van Gogh", kind="style", load=False).save_pretrained(tmp_path / "adapter")
    technique = ACETechnique(pipeline=pipe, adapter=str(tmp_path / "adapter"), **FAST)
    assert len(technique.pipe.get_list_ace_adapters()) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"concepts": "x", "steps": 3}, "Unknown ace technique setting"),
        ({}, "exactly one of 'adapter'"),
        ({"concepts": "x", "adapter": "org/x"}, "exactly one of 'adapter'"),
        ({"concepts": "x", "method": "esd"}, "method must be one of"),
    ],
)
def test_bad_configs_are_refused_before_loading_anything(kwargs, message):
    with pytest.raises(ACEValueError, match=message):
        ACETechnique(**kwargs)
