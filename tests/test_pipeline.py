import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file

import ace_diffusers
from ace_diffusers.core.processor import ACEAttnProcessor
from ace_diffusers.errors import ACEAdapterNameError, ACEArchitectureMismatchError, ACECompatibilityError
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline, tiny_sdxl_pipeline

from .conftest import generate


@pytest.mark.parametrize("builder", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_bit_identical_without_effect_and_after_unload(builder):
    pipe = builder()
    stock = generate(pipe)
    name = pipe.load_ace_adapter(random_adapter(pipe.unet))
    assert all(isinstance(p, ACEAttnProcessor) for p in pipe.unet.attn_processors.values())
    edited = generate(pipe)
    assert (edited - stock).abs().max() > 1e-3
    pipe.set_ace_adapters(name, 0.0)
    assert torch.equal(generate(pipe), stock)
    pipe.set_ace_adapters(name, 1.0)
    pipe.disable_ace_adapters()
    assert torch.equal(generate(pipe), stock)
    assert pipe.get_active_ace_adapters() == []
    pipe.enable_ace_adapters()
    assert torch.equal(generate(pipe), edited)
    pipe.unload_ace_adapter(name)
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    assert not any("ace_stack" in n for n, _ in pipe.unet.named_modules())
    assert torch.equal(generate(pipe), stock)


def test_output_difference_grows_with_scale(sd_pipe):
    stock = generate(sd_pipe)
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, magnitude=0.2))
    diffs = []
    for scale in (0.25, 0.5, 1.0):
        sd_pipe.set_ace_adapters(name, scale)
        diffs.append((generate(sd_pipe) - stock).abs().mean().item())
    assert 0 < diffs[0] < diffs[1] < diffs[2]


def test_multiple_adapters_names_and_activation(sd_pipe):
    a = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, seed=1, concepts=("Van Gogh",)))
    b = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, seed=2, concepts=("Van Gogh",)))
    c = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, seed=3), adapter_name="mine")
    assert (a, b, c) == ("van_gogh", "van_gogh_2", "mine")
    assert sd_pipe.get_list_ace_adapters() == [a, b, c]
    assert sd_pipe.get_active_ace_adapters() == [a, b, c]
    scale_buffer = (
        sd_pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.ace_stack.adapters[a].scale
    )
    pointer = scale_buffer.data_ptr()
    sd_pipe.set_ace_adapters([a, c], [0.5, 2.0])
    assert sd_pipe.get_active_ace_adapters() == [a, c]
    assert scale_buffer.data_ptr() == pointer and scale_buffer.item() == 0.5  # updated in place
    with pytest.raises(ACEAdapterNameError, match="already loaded"):
        sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet), adapter_name="mine")
    with pytest.raises(ACEAdapterNameError, match="Invalid adapter name"):
        sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet), adapter_name="has.dot")
    with pytest.raises(ACEAdapterNameError, match="Unknown"):
        sd_pipe.set_ace_adapters(["nope"])
    assert sd_pipe.get_ace_adapter("mine").method == "random"
    sd_pipe.unload_ace_adapter()
    assert sd_pipe.get_list_ace_adapters() == []


def test_two_adapters_compose_at_pipeline_level(sd_pipe):
    stock = generate(sd_pipe)
    a = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, seed=1))
    b = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, seed=2))
    both = generate(sd_pipe)
    sd_pipe.set_ace_adapters([a])
    only_a = generate(sd_pipe)
    sd_pipe.set_ace_adapters([b])
    only_b = generate(sd_pipe)
    assert len({tuple(x.flatten()[:50].tolist()) for x in (stock, both, only_a, only_b)}) == 4


def test_load_from_folder_and_architecture_mismatch(tmp_path):
    sd, sdxl = tiny_sd_pipeline(), tiny_sdxl_pipeline(text_dim=96)
    random_adapter(sd.unet).save_pretrained(tmp_path / "ad")
    stock = generate(sdxl)
    with pytest.raises(
        ACEArchitectureMismatchError,
        match=r"Layer 'down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2'"
        r".*\(64, 64, 64\).*\(96, 64, 64\)",
    ):
        sdxl.load_ace_adapter(tmp_path / "ad")
    assert sdxl.get_list_ace_adapters() == []
    assert torch.equal(generate(sdxl), stock)  # nothing half-loaded
    assert sd.load_ace_adapter(str(tmp_path / "ad")) == "random_concept"


def test_pipeline_save_pretrained_reloads_with_plain_diffusers(sd_pipe, tmp_path):
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    keys = set(sd_pipe.unet.state_dict())
    sd_pipe.save_pretrained(tmp_path / "pipe")
    saved = load_file(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == keys and not any("ace" in k for k in saved)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(reloaded) is StableDiffusionPipeline
    reloaded.set_progress_bar_config(disable=True)
    sd_pipe.unload_ace_adapter()
    assert torch.equal(generate(reloaded), generate(sd_pipe))


def test_peft_lora_and_ace_both_take_effect(sd_pipe, sdpa_recorder):
    from peft import LoraConfig

    def cross_keys(pipe):
        sdpa_recorder.calls.clear()
        generate(pipe, steps=1)
        return [
            k for _, k, _ in sdpa_recorder.calls if k.shape[2] == 77 and k.shape[0] == 2
        ]  # UNet (CFG batch), not CLIP

    stock = cross_keys(sd_pipe)
    torch.manual_seed(0)
    sd_pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_k", "to_v"], init_lora_weights=False))
    lora = cross_keys(sd_pipe)
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    both = cross_keys(sd_pipe)
    sd_pipe.unet.disable_adapters()  # PEFT's switch: LoRA off, ACE on
    ace = cross_keys(sd_pipe)
    for s, l_, b, a in zip(stock, lora, both, ace, strict=True):
        assert (l_ - s).abs().max() > 1e-3 and (a - s).abs().max() > 1e-3
        torch.testing.assert_close(b - l_, a - s, rtol=1e-4, atol=1e-4)
    assert sd_pipe.get_active_ace_adapters() == [name]


def test_load_lora_weights_after_ace(sd_pipe, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = tiny_sd_pipeline()
    torch.manual_seed(1)
    donor.unet.add_adapter(LoraConfig(r=4, target_modules=["to_k", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(donor.unet)
    )
    stock = generate(sd_pipe)
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    ace_only = generate(sd_pipe)
    sd_pipe.load_lora_weights(tmp_path)
    both = generate(sd_pipe)
    assert all(isinstance(p, ACEAttnProcessor) for p in sd_pipe.unet.attn_processors.values())
    assert (both - ace_only).abs().max() > 1e-3
    sd_pipe.disable_ace_adapters()
    lora_only = generate(sd_pipe)
    assert (both - lora_only).abs().max() > 1e-3 and (lora_only - stock).abs().max() > 1e-3


def test_foreign_processor_is_refused_before_anything_changes(sd_pipe):
    class Custom(AttnProcessor2_0):
        pass

    sd_pipe.unet.set_attn_processor(Custom())
    with pytest.raises(ACECompatibilityError, match="Custom"):
        sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    assert sd_pipe.get_list_ace_adapters() == []


def test_functional_api_and_undoable_methods(sd_pipe):
    name = ace_diffusers.load_adapter(sd_pipe, random_adapter(sd_pipe.unet), "x")
    assert ace_diffusers.get_list_adapters(sd_pipe.unet) == [name]
    ace_diffusers.remove_pipeline_methods()
    try:
        assert not hasattr(sd_pipe, "load_ace_adapter")
        ace_diffusers.unload_adapter(sd_pipe)
        assert ace_diffusers.get_list_adapters(sd_pipe) == []
    finally:
        ace_diffusers.install_pipeline_methods()
    assert hasattr(sd_pipe, "load_ace_adapter")


def test_pipeline_without_unet_gets_a_clear_error():
    with pytest.raises(ACECompatibilityError, match="no UNet"):
        ace_diffusers.load_adapter(object(), "whatever")
