"""The pooled-embedding edit (SDXL's ``text_embeds``): its store and hook, on a tiny SDXL pipeline."""

import warnings

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.core.pooled import ACEPooledStack, get_pooled_stack
from ace_diffusers.errors import ACEAdapterFormatError, ACEArchitectureMismatchError, ACEPooledPathWarning
from ace_diffusers.format import CONFIG_NAME, WEIGHTS_NAME
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline, tiny_sdxl_pipeline

POOLED_DIM = 32  # tiny_sdxl_pipeline: two 32-d encoders, the second's projection is the pooled embedding


@pytest.fixture(scope="module")
def pipe():
    return tiny_sdxl_pipeline()


def _images(pipe, prompt="a painting by Van Gogh", **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt, num_inference_steps=2, generator=generator, output_type="pt", height=32, width=32, **kwargs
    ).images


def _pooled_only(unet, **kwargs):
    """An adapter whose K/V edits are zero: only the pooled edit can change anything."""
    adapter = random_adapter(unet, pooled_dim=POOLED_DIM, magnitude=2.0, **kwargs)
    for factors in adapter.layers.values():
        factors.k_up.zero_()
        factors.v_up.zero_()
    return adapter


def test_the_stack_edits_the_pooled_columns_by_the_shared_formula(pipe):
    adapter = random_adapter(pipe.unet, pooled_dim=POOLED_DIM, gate_bias=1.0)
    stack = ACEPooledStack(torch.zeros(1), POOLED_DIM)
    from ace_diffusers.core.pooled import ACEPooledDelta

    stack.adapters["a"] = ACEPooledDelta(**adapter.pooled.tensors(), scale=0.5)
    embeds = torch.randn(3, POOLED_DIM + 48)
    out = stack.edit(embeds)
    pooled = embeds[:, :POOLED_DIM]
    assert torch.allclose(out[:, :POOLED_DIM], pooled + adapter.pooled.delta(pooled, "p", 0.5), atol=1e-6)
    assert torch.equal(out[:, POOLED_DIM:], embeds[:, POOLED_DIM:])


def test_an_unused_pooled_edit_is_bit_identical_and_unloading_removes_the_hook(pipe):
    base = _images(pipe)
    pipe.load_ace_adapter(_pooled_only(pipe.unet), adapter_name="p")
    module = pipe.unet.add_embedding
    assert get_pooled_stack(module) is not None and len(module._forward_pre_hooks) == 1
    changed = _images(pipe)
    assert not torch.equal(changed, base)  # only the pooled path carries this adapter's edit
    pipe.set_ace_adapters("p", 0.0)
    assert torch.equal(_images(pipe), base)
    pipe.set_ace_adapters("p", 1.0)
    pipe.disable_ace_adapters()
    assert torch.equal(_images(pipe), base)
    pipe.enable_ace_adapters()
    assert torch.equal(_images(pipe), changed)
    pipe.unload_ace_adapter("p")
    assert get_pooled_stack(module) is None and len(module._forward_pre_hooks) == 0
    assert "ace_pooled_stack" not in pipe.unet.state_dict() and torch.equal(_images(pipe), base)


def test_the_edit_also_reaches_pooled_embeddings_passed_in(pipe):
    prompt_embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a painting by Van Gogh")
    kwargs = dict(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
    )
    base = _images(pipe, None, **kwargs)
    pipe.load_ace_adapter(_pooled_only(pipe.unet), adapter_name="p")
    try:
        assert not torch.equal(_images(pipe, None, **kwargs), base)
    finally:
        pipe.unload_ace_adapter("p")


def test_pooled_adapters_save_as_format_2_and_load_exactly(pipe, tmp_path):
    adapter = random_adapter(pipe.unet, pooled_dim=POOLED_DIM, seed=3)
    assert adapter.format_version == 2 and adapter.config["fingerprint"]["pooled"] == POOLED_DIM
    adapter.save_pretrained(tmp_path / "a")
    with safe_open(str(tmp_path / "a" / WEIGHTS_NAME), "pt") as f:
        assert f.metadata()["ace_format_version"] == "2"
    loaded = ACEAdapter.from_pretrained(tmp_path / "a")
    assert loaded.config == adapter.config
    for key, tensor in adapter.pooled.tensors().items():
        assert torch.equal(loaded.pooled.tensors()[key], tensor), key
    plain = random_adapter(pipe.unet, seed=3)
    assert plain.fingerprint["hash"] != adapter.fingerprint["hash"] and "pooled" not in plain.fingerprint


def test_a_pooled_edit_with_a_missing_tensor_or_an_old_version_is_refused(pipe, tmp_path):
    folder = random_adapter(pipe.unet, pooled_dim=POOLED_DIM).save_pretrained(tmp_path / "a")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    del tensors["pooled.p_up"]
    save_file(tensors, str(folder / WEIGHTS_NAME))
    with pytest.raises(ACEAdapterFormatError, match="pooled.p_up"):
        ACEAdapter.from_pretrained(folder)
    folder = random_adapter(pipe.unet, pooled_dim=POOLED_DIM).save_pretrained(tmp_path / "b")
    config = (folder / CONFIG_NAME).read_text().replace('"format_version": 2', '"format_version": 1')
    (folder / CONFIG_NAME).write_text(config)
    with pytest.raises(ACEAdapterFormatError, match="format version 1"):
        ACEAdapter.from_pretrained(folder)


def test_a_kv_only_adapter_on_sdxl_warns_and_on_sd_does_not(pipe):
    with pytest.warns(ACEPooledPathWarning, match="pooled text embedding"):
        pipe.load_ace_adapter(random_adapter(pipe.unet), adapter_name="kv")
    pipe.unload_ace_adapter("kv")
    sd = tiny_sd_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ACEPooledPathWarning)
        sd.load_ace_adapter(random_adapter(sd.unet), adapter_name="kv")


def test_a_pooled_edit_of_the_wrong_width_is_refused_before_anything_changes(pipe):
    adapter = random_adapter(pipe.unet, pooled_dim=POOLED_DIM - 12)  # 80 - 20 is no whole number of 8-d ids
    with pytest.raises(ACEArchitectureMismatchError, match="20-d pooled text embedding"):
        pipe.load_ace_adapter(adapter, adapter_name="bad")
    assert pipe.get_list_ace_adapters() == []
    assert get_pooled_stack(pipe.unet.add_embedding) is None


def test_an_absurd_pooled_edit_is_refused_before_anything_changes(pipe):
    adapter = random_adapter(pipe.unet, pooled_dim=POOLED_DIM)
    adapter.pooled.p_up.mul_(1e6)
    with pytest.raises(ACEAdapterFormatError, match="pooled-embedding edit has norm"):
        pipe.load_ace_adapter(adapter, adapter_name="bad")
    assert pipe.get_list_ace_adapters() == [] and get_pooled_stack(pipe.unet.add_embedding) is None


def test_a_deepcopied_unet_owns_its_pooled_hook(pipe):
    import copy

    from ace_diffusers.integration.attach import attach_adapter, detach_adapter

    unet = copy.deepcopy(pipe.unet)  # leave the shared pipeline alone
    embeds = torch.randn(2, POOLED_DIM + 48, generator=torch.Generator().manual_seed(0))
    base = unet.add_embedding(embeds)
    attach_adapter(unet, _pooled_only(unet), "p")
    on = unet.add_embedding(embeds)
    twin = copy.deepcopy(unet)
    assert torch.equal(twin.add_embedding(embeds), on)
    detach_adapter(twin, "p")  # removes the twin's hook, not the original's
    assert torch.equal(twin.add_embedding(embeds), base) and not twin.add_embedding._forward_pre_hooks
    assert torch.equal(unet.add_embedding(embeds), on)
