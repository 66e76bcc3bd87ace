"""The joint-attention closed form (SD3) on a tiny SD3 pipeline with CLIP and T5 encoders."""

import pytest
import torch

from ace_diffusers.deploy.export import export_lora
from ace_diffusers.errors import ACECompatibilityError
from ace_diffusers.fitting.joint import aligned_rows
from ace_diffusers.testing_transformers import tiny_sd3_pipeline

PROMPT, UNRELATED = "a painting by Van Gogh", ["a photo of a cat", "a red car in the city"]


def _images(pipe, prompt=PROMPT):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt, num_inference_steps=2, height=32, width=32, output_type="pt", generator=generator
    ).images


@pytest.fixture(scope="module")
def sd3():
    pipe = tiny_sd3_pipeline(t5=True)
    before = {p: _images(pipe, p) for p in [PROMPT, *UNRELATED]}
    adapter = pipe.erase_concept("Van Gogh", kind="style", adapter_name="vg")
    return pipe, adapter, before


def test_tokens_are_aligned_in_the_clip_and_the_t5_segment():
    pipe = tiny_sd3_pipeline(t5=True)
    pairs = dict(aligned_rows(pipe, (PROMPT, (14, 22), None), ("a painting by art", (14, 17), None)))
    clip = pipe.tokenizer_max_length
    assert pairs[1] == 1 and pairs[clip + 1] == clip + 1  # shared prefix: the same rows in both segments
    assert pairs[4] == 4 and pairs[5] == 4  # "van", "gogh" both become "art"
    assert pairs[clip + 3] == clip + 3 and pairs[clip + 4] == clip + 3


def test_each_block_gets_its_own_gate_and_the_concept_changes_most(sd3):
    pipe, adapter, before = sd3
    assert set(adapter.layers) == {"transformer_blocks.0.attn", "transformer_blocks.1.attn"}
    gates = [f.gate_weight for f in adapter.layers.values()]
    assert not torch.equal(gates[0], gates[1])  # each block reads its own text stream
    assert adapter.pooled is not None and adapter.fit["pooled"]["concept_towards_neutral"] > 0.8
    per_block = adapter.fit["joint_attention"]["per_block"]
    assert all(stats["text_residual"] < 1.0 for stats in per_block.values())
    concept_change = (_images(pipe) - before[PROMPT]).abs().max()
    unrelated_change = max((_images(pipe, p) - before[p]).abs().max() for p in UNRELATED)
    assert concept_change > 3 * unrelated_change


def test_fuse_unfuse_and_a_lora_that_diffusers_loads(sd3, tmp_path):
    pipe, _, _ = sd3
    gated = _images(pipe)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    report = pipe.fuse_ace_adapter("vg")
    assert report["vg"]["concept"]["tokens"] > 0  # fidelity measured on each block's own tokens
    fused = _images(pipe)
    assert not torch.equal(
        pipe.transformer.state_dict()["time_text_embed.text_embedder.linear_1.weight"],
        weights["time_text_embed.text_embedder.linear_1.weight"],
    )  # the pooled edit too
    path = export_lora(pipe, tmp_path / "sd3.safetensors", format="diffusers")  # exported while fused
    pipe.unfuse_ace_adapter()
    assert all(torch.equal(weights[k], v) for k, v in pipe.transformer.state_dict().items())
    assert torch.equal(_images(pipe), gated)
    fresh = tiny_sd3_pipeline(t5=True)
    fresh.load_lora_weights(str(path))
    torch.testing.assert_close(_images(fresh), fused, atol=1e-5, rtol=0)


def test_the_fine_tuning_is_refused_with_the_reason(sd3):
    from ace_diffusers import ACETrainer

    with pytest.raises(ACECompatibilityError, match="joint attention"):
        ACETrainer(sd3[0], "Van Gogh", kind="style")
