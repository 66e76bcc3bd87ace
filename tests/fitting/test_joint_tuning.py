"""Fine-tuning on joint attention (SD3, FLUX): the trainer's model of each block against the block itself,
the stream-space adversaries, and ACETrainer end to end on tiny pipelines."""

import pytest
import torch

from ace_diffusers import ACETrainer
from ace_diffusers.core.flux import is_single_stream
from ace_diffusers.errors import ACECompatibilityError
from ace_diffusers.fitting.joint import TIMESTEPS, block_streams
from ace_diffusers.fitting.joint_tuning import (
    capture_image_queries,
    collect_joint_data,
    joint_output,
    stream_adversary,
)
from ace_diffusers.fitting.presets import resolve_spec
from ace_diffusers.integration.attach import attach_adapter, detach_adapter
from ace_diffusers.testing import random_adapter
from ace_diffusers.testing_transformers import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPT, UNRELATED = "a painting by Van Gogh", "a photo of a cat"
BUILDERS = {"sd3": lambda: tiny_sd3_pipeline(t5=True), "flux": tiny_flux_pipeline}


def _images(pipe, prompt):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt, num_inference_steps=2, height=32, width=32, output_type="pt", generator=generator
    ).images


def _block_outputs(streams, blocks_of):
    """What each block's attention gives its image tokens (before any output projection), per call."""
    outputs, hooks = {name: [] for name in streams.modules}, []
    for name, attn in streams.modules.items():
        if is_single_stream(attn):  # FLUX single-stream: [text; image] rows out of the attention
            hooks.append(attn.register_forward_hook(lambda m, a, out, n=name: outputs[n].append(out)))
        else:  # the image rows enter to_out
            hooks.append(
                attn.to_out[0].register_forward_pre_hook(lambda m, a, n=name: outputs[n].append(a[0]))
            )
    try:
        blocks = blocks_of()
    finally:
        for handle in hooks:
            handle.remove()
    return blocks, outputs


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_virtual_image_token_reproduces_every_blocks_attention(family):
    """The image tokens' part of a joint attention, folded into one logit and one value per query,
    plus the text rows' keys/values made as the block makes them (projection, gated delta, norm, FLUX's
    rotary embedding), give exactly what the block's own attention gives its image tokens — with an
    adapter (the ACE processors running) and without, on SD3's joint blocks and FLUX's double- and
    single-stream blocks."""
    pipe = BUILDERS[family]()
    streams = block_streams(pipe)
    adapter = random_adapter(pipe.transformer, rank=4, seed=1, pooled_dim={"sd3": 32, "flux": 16}[family])
    text_length = streams.encode([PROMPT])[0].shape[1]
    for loaded in (False, True):
        if loaded:
            attach_adapter(pipe.transformer, adapter, "r")
        blocks, real = _block_outputs(
            streams, lambda: capture_image_queries(streams, [PROMPT], per_block=None, seed=0)
        )
        rows = streams.capture([PROMPT])
        for block in blocks:
            got = joint_output(block, rows[block.name], adapter.layers[block.name] if loaded else None)
            for step in range(len(TIMESTEPS)):
                want = real[block.name][step][0]
                want = want[text_length:] if is_single_stream(block.attn) else want
                torch.testing.assert_close(got[step, 0].detach(), want, atol=1e-5, rtol=1e-4)
    detach_adapter(pipe.transformer, "r")
    assert {is_single_stream(b.attn) for b in blocks} == ({False, True} if family == "flux" else {False})


def test_stream_adversaries_move_only_the_concepts_rows_within_the_ball_and_slip_through():
    pipe = BUILDERS["sd3"]()
    streams = block_streams(pipe)
    blocks = capture_image_queries(streams, ["a painting by art"], per_block=16, seed=0)
    data = collect_joint_data(streams, blocks, resolve_spec("Van Gogh", kind="style"), [])
    adapter = pipe.erase_concept("Van Gogh", kind="style", load=False)
    params = {name: {k: v.clone() for k, v in vars(f).items()} for name, f in adapter.layers.items()}
    rows = data.phrase[0]
    assert rows  # "van gogh" in the CLIP and in the T5 segment
    found = stream_adversary(blocks, params, data, 0, radius=0.25, steps=6)
    for block in blocks:
        source, moved = data.source[block.name][:, :1], found[block.name]
        others = [i for i in range(source.shape[2]) if i not in rows]
        assert torch.equal(moved[:, :, others], source[:, :, others])
        shift = (moved[:, :, rows] - source[:, :, rows]).norm(dim=-1)
        assert bool((shift <= 0.25 * source[:, :, rows].norm(dim=-1) + 1e-4).all()) and float(shift.max()) > 0
        factors = adapter.layers[block.name]
        wanted = joint_output(block, source, None)
        slip = [((joint_output(block, x, factors) - wanted) ** 2).mean() for x in (source, moved)]
        assert slip[1] < slip[0]  # the edited block reads the moved rows more like the concept


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_trainer_fine_tunes_joint_attention_block_by_block(family, tmp_path):
    """ACETrainer on SD3 and FLUX: the closed form, then the block-by-block fine-tuning with stream-space
    adversaries; the loss falls, every block keeps its own gate, the pooled edit stays, the adapter saves
    and reloads, and it changes the concept more than an unrelated prompt."""
    pipe = BUILDERS[family]()
    before = {p: _images(pipe, p) for p in (PROMPT, UNRELATED)}
    trainer = ACETrainer(
        pipe,
        "Van Gogh",
        kind="style",
        steps=40,
        adversarial_every=20,
        adversarial_steps=3,
        queries_per_layer=32,
        batch_size=8,
        progress=False,
    )
    adapter = trainer.fit()
    tuning = adapter.fit["fine_tuning"]
    assert adapter.method == "ace" and tuning["adversaries_found"] == 2
    assert tuning["adversaries_kind"] == "stream rows per block" and tuning["mined_synonyms"] == []
    assert tuning["dictionary"] is False  # no mining on joint attention
    assert trainer.final_loss < trainer.initial_loss and len(trainer.history) == 40
    assert adapter.pooled is not None and len({float(f.gate_bias) for f in adapter.layers.values()}) > 1
    adapter.save_pretrained(tmp_path / "a")
    pipe.load_ace_adapter(str(tmp_path / "a"), adapter_name="vg")
    concept_change = (_images(pipe, PROMPT) - before[PROMPT]).abs().max()
    assert concept_change > 3 * (_images(pipe, UNRELATED) - before[UNRELATED]).abs().max()


def test_defences_that_model_one_text_encoder_are_refused_on_joint_attention():
    pipe = BUILDERS["sd3"]()
    with pytest.raises(ACECompatibilityError, match="search_phrases=0"):
        ACETrainer(pipe, "Van Gogh", kind="style", search_phrases=2)
    with pytest.raises(ACECompatibilityError, match="concept_vectors=0"):
        ACETrainer(pipe, "Van Gogh", kind="style", concept_vectors=1)
