"""How far a baked edit is from the gated one: figures on any prompt sets, computed without changing "
"anything."""

import torch

from ace_diffusers.deploy.fuse import (
    fuse_fidelity,
    fused,
    get_fused_adapters,
)

from .conftest import CONCEPT_PROMPTS, UNRELATED_PROMPTS, snapshot


def test_fidelity_is_pure_and_takes_any_prompt_sets(erased):
    pipe, adapter, _, _ = erased
    before = snapshot(pipe.unet)
    sets = {"concept": CONCEPT_PROMPTS, "unrelated": UNRELATED_PROMPTS}
    figures = fuse_fidelity(pipe, adapter, sets)
    assert fuse_fidelity(pipe, "van_gogh", sets) == figures  # by name: the loaded adapter at its scale
    assert set(figures) == set(sets)
    assert figures["concept"]["prompts"] == 3 and figures["concept"]["tokens"] == 3 * 77
    assert figures["concept"]["gated_change"] > figures["unrelated"]["gated_change"]
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert get_fused_adapters(pipe) == []
    with fused(pipe, prompt_sets=sets) as report:
        assert report["van_gogh"] == figures
        assert fuse_fidelity(pipe, adapter, sets) == figures  # measured against the pre-fuse weights
    assert get_fused_adapters(pipe) == []
