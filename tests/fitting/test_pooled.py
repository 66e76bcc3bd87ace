"""The closed form on SDXL's pooled text embedding (tiny SDXL pipelines with random CLIP encoders)."""

import pytest
import torch

from ace_diffusers.fitting.pooled import PooledEncoder, describe_pooled_shift, pooled_shift
from ace_diffusers.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

UNSEEN_UNRELATED = [
    "a red bicycle leaning on a wall",
    "two dogs playing in the snow",
    "a bowl of soup",
    "a mountain lake at dawn",
]


@pytest.fixture(scope="module")
def erased():
    pipe = tiny_sdxl_pipeline(text_dim=256)
    adapter = pipe.erase_concept("Van Gogh", kind="style", load=False)
    return pipe, adapter


def test_the_encoder_gives_the_pipelines_pooled_embedding():
    pipe = tiny_sdxl_pipeline()
    prompts = ["Van Gogh", "a cat", "a very long prompt " * 20, ""]
    _, _, expected, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(PooledEncoder(pipe).encode(prompts, batch_size=3), expected, atol=1e-6, rtol=0)


def test_sdxl_fits_get_a_pooled_edit_that_moves_the_concept_and_not_the_rest(erased):
    pipe, adapter = erased
    assert adapter.pooled is not None and adapter.pooled.dim == 128
    assert adapter.fit["pooled"]["concept_towards_neutral"] > 0.8
    encoder = PooledEncoder(pipe)
    templates = adapter.fit["templates"]
    concept = encoder.encode([t.format("Van Gogh") for t in templates])
    neutral = encoder.encode([t.format(adapter.neutral[0]) for t in templates])
    shift = pooled_shift(adapter.pooled, concept, neutral, encoder.encode(UNSEEN_UNRELATED))
    assert shift["concept_towards_neutral"] > 0.8  # the concept's prompts end near the anchor's
    assert shift["unrelated_moved"] < 0.01  # prompts the fit never saw stay where they were
    line = describe_pooled_shift(adapter.fit["pooled"])
    assert line.startswith("pooled text embedding: the concept prompts move") and "%" in line


def test_the_erase_command_prints_the_pooled_shift(erased, capsys, tmp_path, monkeypatch):
    from ace_diffusers.cli import erase

    pipe, _ = erased
    monkeypatch.setattr(erase, "load_model", lambda model: pipe)
    erase.main(
        ["--model", "tiny", "--concept", "Van Gogh", "--kind", "style", "--steps", "0"]
        + ["--output", str(tmp_path / "a")]
    )
    assert "pooled text embedding: the concept prompts move" in capsys.readouterr().out


def test_sd_fits_have_no_pooled_edit():
    adapter = tiny_sd_pipeline().erase_concept("Van Gogh", kind="style", load=False)
    assert adapter.pooled is None and "pooled" not in adapter.fit
    assert not any(key.startswith("pooled.") for key in adapter.state_dict())


def test_the_pooled_path_itself_is_erased_in_a_pipeline_call(erased):
    """Fails if only the K/V were edited: what add_embedding receives for the concept prompt moves to the
    anchor prompt's pooled embedding; an unrelated prompt's stays as it was."""
    pipe, adapter = erased
    seen = []
    linear = pipe.unet.add_embedding.linear_1  # its input: after the ACE hook on add_embedding
    handle = linear.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, :128]))

    def pooled_input(prompt):
        seen.clear()
        pipe(prompt, num_inference_steps=1, output_type="pt", height=32, width=32, guidance_scale=1.0)
        return seen[-1][0]

    try:
        template = adapter.fit["templates"][0]  # a phrasing the fit used
        prompt, anchor = template.format("Van Gogh"), template.format(adapter.neutral[0])
        stock_concept, stock_anchor, stock_other = (
            pooled_input(p) for p in (prompt, anchor, UNSEEN_UNRELATED[0])
        )
        pipe.load_ace_adapter(adapter, adapter_name="vg")
        erased_concept, erased_other = pooled_input(prompt), pooled_input(UNSEEN_UNRELATED[0])
        pipe.unload_ace_adapter("vg")
    finally:
        handle.remove()
    gap = (stock_concept - stock_anchor).norm()
    assert (erased_concept - stock_anchor).norm() < 0.3 * gap
    assert (erased_other - stock_other).norm() < 0.01 * stock_other.norm()


def test_the_trainer_fine_tunes_sdxl_and_keeps_the_pooled_edit():
    from ace_diffusers import ACETrainer

    pipe = tiny_sdxl_pipeline()
    adapter = ACETrainer(pipe, "Van Gogh", kind="style", steps=3, adversarial=False, progress=False).fit()
    assert adapter.method == "ace" and adapter.fit["fine_tuning"]["steps_run"] == 3
    assert adapter.pooled is not None and "pooled" in adapter.fit  # kept from the closed form
    pipe.load_ace_adapter(adapter, adapter_name="vg")
    assert pipe.get_active_ace_adapters() == ["vg"]
