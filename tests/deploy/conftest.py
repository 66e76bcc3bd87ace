"""The deploy tests' shared pipeline: a tiny SD pipeline with "Van Gogh" erased, and its images."""

import pytest

from ace_diffusers.deploy.fuse import get_fused_adapters
from ace_diffusers.fitting.data import FitSettings
from ace_diffusers.testing import tiny_sd_pipeline

from ..conftest import generate

# Tolerances reached on tiny random-weight pipelines (256-d text, "Van Gogh" erased in closed form,
# 2 denoising steps; docs/deploy.md explains what they measure). A random text encoder has no
# semantics, so these are mechanics checks; the miniature world gives the meaningful numbers.
TEXT_DIM = 256
CONCEPT_PROMPTS = ["a painting in the style of Van Gogh", "an artwork by Van Gogh", "art by Van Gogh"]
UNRELATED_PROMPTS = ["a photo of a cat", "a bowl of fruit on a wooden table", "a city street at night"]
IMAGE_CONCEPT_TOL = 0.3  # ||fused - gated|| / ||gated - stock|| per concept prompt (reached: <= 0.19)
IMAGE_UNRELATED_TOL = 0.4  # mean unrelated ||fused - stock|| / mean concept ||gated - stock|| (reached: 0.25)
KV_EDIT_TOL = 0.4  # report["concept"]["edit_rel_error"] (reached: 0.21-0.30)
KV_SPECIFICITY_TOL = 0.35  # unrelated fused_change / concept fused_change (reached: 0.25)


@pytest.fixture(scope="module")
def erased():
    """Tiny SD pipeline with 'Van Gogh' erased (gated), plus its stock and gated images."""
    pipe = tiny_sd_pipeline(text_dim=TEXT_DIM)
    prompts = CONCEPT_PROMPTS + UNRELATED_PROMPTS
    stock = {p: generate(pipe, p) for p in prompts}
    # the closed form's core map (no mined neighbours, no paired prompts): in a random tiny encoder those
    # are random words and contexts; what fusing does to a full default fit is measured on the miniature
    # world by `ace-diffusers bench deploy`
    core = FitSettings(neighbours=0, context_prompts=0)
    adapter = pipe.erase_concept("Van Gogh", kind="style", adapter_name="van_gogh", settings=core)
    gated = {p: generate(pipe, p) for p in prompts}
    yield pipe, adapter, stock, gated
    assert get_fused_adapters(pipe) == []  # every test leaves the shared pipeline unfused


def snapshot(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}
