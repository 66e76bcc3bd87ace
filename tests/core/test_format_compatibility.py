"""An adapter saved by the previous release (the flat package, format version 1) loads in this one and gives
the images that release gave: bit-identical on the machine that recorded them, within 1e-5 on other CPUs
(their float kernels round differently, by about 2e-6 here) — four thousand times below the adapter's
own effect on the concept prompt.

``tests/data/adapter_v1`` was written by ace-diffusers at commit 2c9ba47 (before the layered layout):
``erase_concept(tiny_sd_pipeline(seed=0), "Van Gogh", kind="style")`` saved with ``save_pretrained``, and
the images that release generated with it loaded (2 DDIM steps, 32x32, seed 0, one torch thread).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ace_diffusers import ACEAdapter
from ace_diffusers.format import FORMAT_VERSION, read_config
from ace_diffusers.testing import tiny_sd_pipeline

DATA = Path(__file__).resolve().parents[1] / "data" / "adapter_v1"
PROMPTS = ["a painting by Van Gogh", "a photo of a cat"]


def test_the_previous_release_adapter_loads_unchanged():
    config = read_config(DATA / "adapter" / "ace_config.json")
    assert config["format_version"] == 1 <= FORMAT_VERSION
    adapter = ACEAdapter.from_pretrained(DATA / "adapter")
    assert adapter.concepts == ["Van Gogh"] and adapter.kind == "style" and adapter.neutral == ["art"]
    assert adapter.config["fingerprint"] == config["fingerprint"]


def test_the_previous_release_adapter_gives_the_same_images():
    if torch.get_num_threads() != 1:
        pytest.skip("the reference images were generated with one torch thread (tests/conftest.py sets it)")
    expected = load_file(str(DATA / "expected_images.safetensors"))
    pipe = tiny_sd_pipeline(seed=0)
    pipe.load_ace_adapter(DATA / "adapter")
    for i, prompt in enumerate(PROMPTS):
        generator = torch.Generator().manual_seed(0)
        image = pipe(
            prompt, num_inference_steps=2, generator=generator, output_type="pt", height=32, width=32
        ).images
        torch.testing.assert_close(image, expected[f"prompt{i}"], atol=1e-5, rtol=0, msg=prompt)
