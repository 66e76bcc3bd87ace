"""The joint-attention closed form on tiny SD3 (CLIP and T5 encoders) and FLUX pipelines."""

import pytest
import torch

from ace_diffusers.deploy.export import export_lora, save_lora
from ace_diffusers.errors import ACECompatibilityError
from ace_diffusers.fitting.joint import aligned_rows, block_streams
from ace_diffusers.testing_transformers import tiny_flux_pipeline, tiny_sd3_pipeline

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


# ---------------------------------------------------------------------- FLUX
@pytest.fixture(scope="module")
def flux():
    pipe = tiny_flux_pipeline()
    before = {p: _images(pipe, p) for p in [PROMPT, *UNRELATED]}
    adapter = pipe.erase_concept("Van Gogh", kind="style", adapter_name="vg")
    return pipe, adapter, before


def test_flux_rows_are_aligned_in_its_t5_segment_alone():
    pipe = tiny_flux_pipeline()
    segments = block_streams(pipe).segments()
    assert [(tokenizer, offset) for tokenizer, _, offset in segments] == [(pipe.tokenizer_2, 0)]
    anchor = ("a painting by art", (14, 17), None)
    pairs = dict(aligned_rows(pipe, (PROMPT, (14, 22), None), anchor, segments))
    assert pairs[2] == 2 and pairs[3] == 3 and pairs[4] == 3  # "van", "gogh" both become "art"


def test_flux_fits_every_double_and_single_stream_block_and_the_pooled_path(flux, tmp_path):
    pipe, adapter, before = flux
    assert set(adapter.layers) == {
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    }
    gates = [f.gate_weight for f in adapter.layers.values()]
    assert not torch.equal(gates[0], gates[1]) and not torch.equal(gates[1], gates[2])
    assert adapter.pooled is not None and adapter.fit["pooled"]["concept_towards_neutral"] > 0.8
    erased = _images(pipe)
    concept_change = (erased - before[PROMPT]).abs().max()
    unrelated_change = max((_images(pipe, p) - before[p]).abs().max() for p in UNRELATED)
    assert concept_change > 3 * unrelated_change
    adapter.save_pretrained(tmp_path / "vg")  # the adapter file round-trips on FLUX too
    pipe.unload_ace_adapter("vg")
    assert torch.equal(_images(pipe), before[PROMPT])
    pipe.load_ace_adapter(str(tmp_path / "vg"), adapter_name="vg")
    assert torch.equal(_images(pipe), erased)


def test_flux_weight_edits_are_refused_before_anything_changes(flux, tmp_path):
    pipe, adapter, _ = flux
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(ACECompatibilityError, match="single-stream"):
        pipe.fuse_ace_adapter("vg")
    with pytest.raises(ACECompatibilityError, match="single-stream"):
        export_lora(pipe, tmp_path / "flux.safetensors", "vg", mode="ungated")
    with pytest.raises(ACECompatibilityError, match="single-stream"):  # no pipeline: read from the names
        save_lora(adapter, tmp_path / "flux.safetensors", mode="ungated")
    assert not list(tmp_path.iterdir())
    assert all(torch.equal(weights[k], v) for k, v in pipe.transformer.state_dict().items())
    assert pipe.get_active_ace_adapters() == ["vg"]


def test_a_flux_fit_without_single_stream_blocks_fuses_unfuses_and_exports(tmp_path):
    from ace_diffusers.fitting.data import FitSettings

    pipe = tiny_flux_pipeline()
    before = _images(pipe)
    adapter = pipe.erase_concept(
        "Van Gogh", kind="style", adapter_name="vg", settings=FitSettings(single_stream=False)
    )
    single = [n for n in adapter.layers if n.startswith("single_transformer_blocks.")]
    assert single and not any(adapter.layers[n].edits() for n in single)
    assert adapter.layers["transformer_blocks.0.attn"].edits()
    gated = _images(pipe)
    assert not torch.equal(gated, before)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.fuse_ace_adapter("vg")
    fused = _images(pipe)
    path = export_lora(pipe, tmp_path / "flux.safetensors", format="diffusers")
    pipe.unfuse_ace_adapter()
    assert all(torch.equal(weights[k], v) for k, v in pipe.transformer.state_dict().items())
    assert torch.equal(_images(pipe), gated)
    fresh = tiny_flux_pipeline()
    fresh.load_lora_weights(str(path))
    targets = next(iter(fresh.transformer.peft_config.values())).target_modules
    assert targets and not any("single_transformer_blocks" in n for n in targets)
    torch.testing.assert_close(_images(fresh), fused, atol=1e-5, rtol=0)


def test_flux_image_ids_are_the_pipelines_own():
    from diffusers import FluxPipeline

    from ace_diffusers.fitting.joint import flux_image_ids

    ids = FluxPipeline._prepare_latent_image_ids(1, 3, 3, "cpu", torch.float32)
    assert torch.equal(flux_image_ids(3), ids)
