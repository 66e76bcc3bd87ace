"""ACE works everywhere a diffusers user goes, and never silently loses an adapter.

Pipelines (SD1/SD2-like, img2img, inpaint, SDXL, SDXL img2img, from_pipe), PEFT LoRA in any order,
every diffusers call that replaces attention processors (see docs/compatibility.md for the decisions),
torch.compile, dtypes/devices/offloading and textual inversion. Tiny pipelines, 1-2 denoising steps.
"""

import copy
import os
import shutil
import time

import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
    SlicedAttnProcessor,
)
from safetensors.torch import save_file

from ace_diffusers.core.processor import (
    ACEAttnProcessor,
    ACEIPAdapterAttnProcessor,
    ACESlicedAttnProcessor,
    get_stack,
)
from ace_diffusers.errors import ACECompatibilityError
from ace_diffusers.fitting.erase import erase_concept
from ace_diffusers.integration.compat import base_processor
from ace_diffusers.integration.modules import attention_modules, cross_attention_modules
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline

from ..conftest import generate

IMAGE = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
MASK = torch.zeros(1, 1, 32, 32)
MASK[..., 8:24, 8:24] = 1.0


def differs(a, b, atol=1e-3):
    return (a - b).abs().max().item() > atol


def processors(pipe_or_unet):
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    return dict(unet.attn_processors)


def assert_ace_active(pipe, run, name=None):
    """The adapter changes ``run(pipe)`` and switching it off gives the output without it."""
    edited = run(pipe)
    pipe.disable_ace_adapters()
    plain = run(pipe)
    pipe.enable_ace_adapters()
    assert differs(edited, plain)
    if name is not None:
        assert name in pipe.get_active_ace_adapters()
    return edited, plain


# ====================================================================== pipelines
@pytest.mark.parametrize(
    "kwargs", [{}, {"text_dim": 96, "prediction_type": "v_prediction"}], ids=["sd1_like", "sd2_like_vpred"]
)
def test_sd1_and_sd2_like_pipelines(kwargs):
    pipe = tiny_sd_pipeline(**kwargs)
    stock = generate(pipe)
    name = pipe.load_ace_adapter(random_adapter(pipe.unet))
    edited, plain = assert_ace_active(pipe, generate, name)
    assert torch.equal(plain, stock)
    pipe.set_ace_adapters(name, 0.0)
    assert torch.equal(generate(pipe), stock)


def img2img(pipe, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        "a photo of a cat",
        image=IMAGE,
        strength=1.0,
        num_inference_steps=2,
        generator=generator,
        output_type="pt",
        **kwargs,
    ).images


def inpaint(pipe, seed=0):
    return img2img(pipe, seed, mask_image=MASK, height=32, width=32)


def test_from_pipe_img2img_and_inpaint_share_the_adapter(sd_pipe):
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    i2i = StableDiffusionImg2ImgPipeline.from_pipe(sd_pipe)
    legacy_inpaint = StableDiffusionInpaintPipeline(
        **sd_pipe.components
    )  # 4-channel UNet: blended inpainting
    for derived, run in ((i2i, img2img), (legacy_inpaint, inpaint)):
        derived.set_progress_bar_config(disable=True)
        assert derived.unet is sd_pipe.unet
        assert derived.get_list_ace_adapters() == [name]
        assert_ace_active(derived, run, name)
    # switching in one pipeline switches in all: it is one UNet
    edited = img2img(i2i)
    sd_pipe.set_ace_adapters(name, 0.0)
    assert differs(img2img(i2i), edited)
    sd_pipe.unload_ace_adapter()
    assert i2i.get_list_ace_adapters() == []
    assert all(type(p) is AttnProcessor2_0 for p in processors(i2i).values())


def test_inpaint_pipeline_with_9_channel_unet():
    base = tiny_sd_pipeline()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**{**base.unet.config, "in_channels": 9})
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    stock = inpaint(pipe)
    name = pipe.load_ace_adapter(random_adapter(unet))
    _, plain = assert_ace_active(pipe, inpaint, name)
    assert torch.equal(plain, stock)


def test_sdxl_erase_concept_takes_effect_and_reads_both_encoders(sdxl_pipe, sdpa_recorder):
    def cross_kv(prompt):
        sdpa_recorder.calls.clear()
        generate(sdxl_pipe, prompt, steps=1)
        return [(k, v) for _, k, v in sdpa_recorder.calls if k.shape[0] == 2 and k.shape[2] == 77]

    concept, unrelated = "a painting by Van Gogh", "a photo of a cat"
    before = {p: cross_kv(p) for p in (concept, unrelated)}
    stock = generate(sdxl_pipe, concept)
    adapter = erase_concept(sdxl_pipe, "Van Gogh", kind="style")
    assert differs(generate(sdxl_pipe, concept), stock)

    def relative_change(prompt):
        num = den = 0.0
        for (k0, v0), (k1, v1) in zip(before[prompt], cross_kv(prompt), strict=True):
            num += (k1 - k0).norm() ** 2 + (v1 - v0).norm() ** 2
            den += k0.norm() ** 2 + v0.norm() ** 2
        return float((num / den).sqrt())

    assert relative_change(concept) > 3 * relative_change(unrelated)
    # SDXL cross-attends to [text_encoder | text_encoder_2] (32 + 32 dims here): the fit uses both halves
    layer = next(iter(adapter.layers.values()))
    for factor in (layer.k_down, layer.v_down, layer.gate_weight.reshape(1, -1)):
        first, second = factor[:, :32].norm(), factor[:, 32:].norm()
        assert first > 0.2 * second and second > 0.2 * first


def test_sdxl_img2img_from_pipe(sdxl_pipe):
    name = sdxl_pipe.load_ace_adapter(random_adapter(sdxl_pipe.unet))
    i2i = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl_pipe)
    i2i.set_progress_bar_config(disable=True)
    assert i2i.unet is sdxl_pipe.unet
    assert_ace_active(i2i, img2img, name)


# ====================================================================== PEFT LoRA
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = tiny_sd_pipeline()
    torch.manual_seed(1)
    donor.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(donor.unet))
    return folder


@pytest.mark.parametrize("ace_first", [True, False], ids=["ace_then_lora", "lora_then_ace"])
def test_lora_lifecycle_with_ace_in_any_order(sd_pipe, lora_dir, ace_first):
    stock = generate(sd_pipe)
    adapter = random_adapter(sd_pipe.unet)
    if ace_first:
        name = sd_pipe.load_ace_adapter(adapter)
        ace_only = generate(sd_pipe)
        sd_pipe.load_lora_weights(lora_dir, adapter_name="style")
    else:
        sd_pipe.load_lora_weights(lora_dir, adapter_name="style")
        name = sd_pipe.load_ace_adapter(adapter)
        sd_pipe.disable_lora()
        ace_only = generate(sd_pipe)
        sd_pipe.enable_lora()
    both = generate(sd_pipe)
    sd_pipe.disable_ace_adapters()
    lora_only = generate(sd_pipe)
    sd_pipe.enable_ace_adapters()
    assert differs(both, ace_only) and differs(both, lora_only) and differs(lora_only, stock)

    sd_pipe.set_adapters(["style"], adapter_weights=[0.0])  # diffusers' PEFT verbs leave ACE alone
    torch.testing.assert_close(generate(sd_pipe), ace_only, atol=1e-5, rtol=0)
    sd_pipe.set_adapters(["style"], adapter_weights=[1.0])
    assert sd_pipe.get_active_ace_adapters() == [name]

    sd_pipe.fuse_lora()
    torch.testing.assert_close(generate(sd_pipe), both, atol=1e-4, rtol=0)
    sd_pipe.unfuse_lora()
    torch.testing.assert_close(generate(sd_pipe), both, atol=1e-4, rtol=0)

    sd_pipe.unload_lora_weights()
    torch.testing.assert_close(generate(sd_pipe), ace_only, atol=1e-5, rtol=0)
    assert sd_pipe.get_active_ace_adapters() == [name]
    sd_pipe.unload_ace_adapter()
    torch.testing.assert_close(generate(sd_pipe), stock, atol=1e-5, rtol=0)


# ====================================================================== processor replacers
def ip_adapter_state_dict(unet, image_dim=16, seed=0):
    """A tiny IP-Adapter (plain ``ImageProjection`` + per-cross-attention ``to_k_ip``/``to_v_ip``)."""
    generator = torch.Generator().manual_seed(seed)
    text_dim = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * text_dim, image_dim, generator=generator) * 0.1,
        "proj.bias": torch.zeros(4 * text_dim),
        "norm.weight": torch.ones(text_dim),
        "norm.bias": torch.zeros(text_dim),
    }
    ip_layers, key_id = (
        {},
        1,
    )  # diffusers numbers cross-attention layers 1, 3, 5, ... in attn_processors order
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            hidden = attention_modules(unet)[name.removesuffix(".processor")].to_k.weight.shape[0]
            ip_layers[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, text_dim, generator=generator) * 0.3
            ip_layers[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, text_dim, generator=generator) * 0.3
            key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def load_tiny_ip_adapter(pipe, folder):
    state = ip_adapter_state_dict(pipe.unet)
    flat = {f"{group}.{k}": v for group in ("image_proj", "ip_adapter") for k, v in state[group].items()}
    save_file(flat, str(folder / "ip-adapter_tiny.safetensors"))
    pipe.load_ip_adapter(
        folder, subfolder="", weight_name="ip-adapter_tiny.safetensors", image_encoder_folder=None
    )


def with_image_prompt(pipe, **kwargs):
    embeds = torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))  # (negative, positive)
    return generate_kw(pipe, ip_adapter_image_embeds=[embeds], **kwargs)


def generate_kw(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        generator=generator,
        output_type="pt",
        height=32,
        width=32,
        **kwargs,
    ).images


@pytest.mark.parametrize("ace_first", [True, False], ids=["ace_then_ip", "ip_then_ace"])
def test_ip_adapter_load_unload_keeps_ace(sd_pipe, tmp_path, ace_first):
    stock = generate(sd_pipe)
    adapter = random_adapter(sd_pipe.unet)
    if ace_first:
        sd_pipe.load_ace_adapter(adapter)
        ace_only = generate(sd_pipe)
        load_tiny_ip_adapter(sd_pipe, tmp_path)
    else:
        load_tiny_ip_adapter(sd_pipe, tmp_path)
        sd_pipe.set_ip_adapter_scale(0.0)
        sd_pipe.load_ace_adapter(adapter)
        ace_only = with_image_prompt(sd_pipe)
        sd_pipe.set_ip_adapter_scale(1.0)
    cross = {type(p) for n, p in processors(sd_pipe).items() if "attn2" in n}
    assert cross == {ACEIPAdapterAttnProcessor}
    both = with_image_prompt(sd_pipe)
    sd_pipe.disable_ace_adapters()
    ip_only = with_image_prompt(sd_pipe)
    sd_pipe.enable_ace_adapters()
    assert differs(both, ip_only) and differs(both, ace_only) and differs(ip_only, stock)
    sd_pipe.set_ip_adapter_scale(0.0)  # diffusers' own verb reaches the shared scale list
    torch.testing.assert_close(with_image_prompt(sd_pipe), ace_only, atol=1e-6, rtol=0)
    sd_pipe.set_ip_adapter_scale(1.0)

    if ace_first:
        sd_pipe.unload_ip_adapter()
        assert all(isinstance(p, ACEAttnProcessor) for p in processors(sd_pipe).values())
        assert torch.equal(generate(sd_pipe), ace_only)
        sd_pipe.unload_ace_adapter()
        assert all(type(p) is AttnProcessor2_0 for p in processors(sd_pipe).values())
    else:
        sd_pipe.unload_ace_adapter()  # the IP-Adapter processors (same weights) come back
        assert {type(p) for n, p in processors(sd_pipe).items() if "attn2" in n} == {
            IPAdapterAttnProcessor2_0
        }
        assert torch.equal(with_image_prompt(sd_pipe), ip_only)
        sd_pipe.unload_ip_adapter()
    assert torch.equal(generate(sd_pipe), stock)


def test_ip_adapter_processor_matches_diffusers_with_masks(sd_pipe):
    """With ACE switched off, the ACE IP-Adapter processor is bit-identical to diffusers' (masked path "
    "too)."""
    sd_pipe.load_ip_adapter(
        ip_adapter_state_dict(sd_pipe.unet), subfolder="", weight_name="", image_encoder_folder=None
    )
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, :16] = 1.0
    kwargs = {"cross_attention_kwargs": {"ip_adapter_masks": [mask]}}
    stock, stock_masked = with_image_prompt(sd_pipe), with_image_prompt(sd_pipe, **kwargs)
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    sd_pipe.disable_ace_adapters()
    assert torch.equal(with_image_prompt(sd_pipe), stock)
    assert torch.equal(with_image_prompt(sd_pipe, **kwargs), stock_masked)
    assert differs(stock, stock_masked)


def test_attention_slicing_is_supported(sd_pipe):
    stock = generate(sd_pipe)
    sd_pipe.enable_attention_slicing(1)
    sliced_stock = generate(sd_pipe)
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))  # load onto a sliced pipeline
    assert all(type(p) is ACESlicedAttnProcessor and p.slice_size == 1 for p in processors(sd_pipe).values())
    edited_sliced, plain = assert_ace_active(sd_pipe, generate, name)
    assert torch.equal(plain, sliced_stock)  # bit-identical to diffusers' SlicedAttnProcessor when off

    sd_pipe.disable_attention_slicing()
    assert all(type(p) is ACEAttnProcessor for p in processors(sd_pipe).values())
    edited = generate(sd_pipe)
    torch.testing.assert_close(edited, edited_sliced, atol=1e-4, rtol=0)
    sd_pipe.enable_attention_slicing()  # "auto": slicing switched on while ACE is loaded
    assert all(type(p) is ACESlicedAttnProcessor for p in processors(sd_pipe).values())
    torch.testing.assert_close(generate(sd_pipe), edited, atol=1e-4, rtol=0)

    sd_pipe.unload_ace_adapter()  # the processors ACE stood in for come back
    assert all(type(p) is SlicedAttnProcessor for p in processors(sd_pipe).values())
    sd_pipe.disable_attention_slicing()
    torch.testing.assert_close(generate(sd_pipe), stock, atol=1e-5, rtol=0)


def test_fuse_qkv_projections_is_refused_before_anything_changes(sd_pipe):
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    edited = generate(sd_pipe)
    before = processors(sd_pipe)
    state_keys = set(sd_pipe.unet.state_dict())
    with pytest.raises(
        ACECompatibilityError, match=r"fuse_qkv_projections.*bypasses the ACE K/V edit.*Nothing was changed"
    ):
        sd_pipe.fuse_qkv_projections()
    with pytest.raises(ACECompatibilityError, match="fuse_qkv_projections"):
        sd_pipe.unet.fuse_qkv_projections()
    assert processors(sd_pipe) == before and set(sd_pipe.unet.state_dict()) == state_keys  # no to_qkv / to_kv
    sd_pipe.unfuse_qkv_projections()  # the pipeline believes it fused: unfusing is a harmless no-op
    assert processors(sd_pipe) == before
    assert torch.equal(generate(sd_pipe), edited)
    # the other order: a fused UNet refuses the adapter, with the way out in the message
    sd_pipe.unload_ace_adapter(name)
    sd_pipe.fuse_qkv_projections()
    with pytest.raises(ACECompatibilityError, match="unfuse_qkv_projections"):
        sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    sd_pipe.unfuse_qkv_projections()
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    assert torch.equal(generate(sd_pipe), edited)


def test_xformers_is_refused_and_disabling_keeps_ace(sd_pipe):
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    edited = generate(sd_pipe)
    before = processors(sd_pipe)
    # refused before diffusers even looks for xformers/CUDA, so this runs on any machine
    with pytest.raises(
        ACECompatibilityError, match="enable_xformers_memory_efficient_attention.*XFormersAttnProcessor"
    ):
        sd_pipe.unet.enable_xformers_memory_efficient_attention()
    assert processors(sd_pipe) == before
    # resets every module to AttnProcessor2_0 in diffusers
    sd_pipe.disable_xformers_memory_efficient_attention()
    assert all(isinstance(p, ACEAttnProcessor) for p in processors(sd_pipe).values())
    assert torch.equal(generate(sd_pipe), edited)


def test_xformers_on_a_real_gpu(sd_pipe):
    pytest.importorskip(
        "xformers", reason="xformers is not installed (it needs CUDA); the refusal is tested above"
    )
    if not torch.cuda.is_available():
        pytest.skip("xformers memory-efficient attention needs a CUDA device")
    pipe = sd_pipe.to("cuda")
    pipe.load_ace_adapter(random_adapter(pipe.unet))
    with pytest.raises(ACECompatibilityError):
        pipe.enable_xformers_memory_efficient_attention()
    assert all(isinstance(p, ACEAttnProcessor) for p in processors(pipe).values())


def test_set_default_attn_processor_keeps_ace(sd_pipe):
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    edited = generate(sd_pipe)
    sd_pipe.unet.set_default_attn_processor()  # raised ValueError on ACE processors before the guard
    assert all(type(p) is ACEAttnProcessor for p in processors(sd_pipe).values())
    assert all(type(base_processor(a)) is AttnProcessor for a in attention_modules(sd_pipe.unet).values())
    torch.testing.assert_close(generate(sd_pipe), edited, atol=1e-5, rtol=0)
    sd_pipe.unload_ace_adapter(name)
    assert all(type(p) is AttnProcessor for p in processors(sd_pipe).values())


def test_user_set_attn_processor(sd_pipe):
    class Custom(AttnProcessor2_0):
        pass

    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    edited = generate(sd_pipe)
    before = processors(sd_pipe)
    with pytest.raises(
        ACECompatibilityError, match=r"set_attn_processor.*attn2.*Custom.*Nothing was changed"
    ):
        sd_pipe.unet.set_attn_processor(Custom())
    mixed = {n: (Custom() if n.endswith("attn2.processor") else AttnProcessor2_0()) for n in before}
    with pytest.raises(ACECompatibilityError):
        sd_pipe.unet.set_attn_processor(mixed)
    attn2 = sd_pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    with pytest.raises(ACECompatibilityError, match="Custom"):
        attn2.set_processor(Custom())  # the per-module door is guarded as well
    assert processors(sd_pipe) == before

    # stock processors and diffusers' ``proc.__class__()`` rebuilds keep ACE
    sd_pipe.unet.set_attn_processor(AttnProcessor2_0())
    sd_pipe.unet.set_attn_processor({n: p.__class__() for n, p in processors(sd_pipe).items()})
    assert all(type(p) is ACEAttnProcessor for p in processors(sd_pipe).values())
    assert torch.equal(generate(sd_pipe), edited)
    # custom processors on self-attention do not bypass ACE (it edits cross-attention only): allowed
    self_custom = {n: (Custom() if n.endswith("attn1.processor") else AttnProcessor2_0()) for n in before}
    sd_pipe.unet.set_attn_processor(self_custom)
    assert torch.equal(generate(sd_pipe), edited)
    sd_pipe.unload_ace_adapter()
    assert {type(p) for p in processors(sd_pipe).values()} == {Custom, AttnProcessor2_0}
    assert "set_attn_processor" not in sd_pipe.unet.__dict__  # guards leave with the last adapter
    doors = [a.__dict__.get("set_processor") for a in attention_modules(sd_pipe.unet).values()]
    assert all(type(d).__name__ == "_StockOnly" for d in doors)  # only the stale-snapshot filter stays
    sd_pipe.unet.set_attn_processor(Custom())  # which lets any processor through
    assert {type(p) for p in processors(sd_pipe).values()} == {Custom}


def test_a_stale_processor_snapshot_restored_after_unloading_leaves_no_ace_processor(sd_pipe):
    sd_pipe.enable_attention_slicing(2)
    stock = generate(sd_pipe)
    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    snapshot = sd_pipe.unet.attn_processors  # ACE processors, taken while the adapter is loaded
    assert any(isinstance(p, ACEAttnProcessor) for p in snapshot.values())
    sd_pipe.unload_ace_adapter()
    sd_pipe.unet.set_attn_processor(snapshot)
    kinds = {type(p) for p in processors(sd_pipe).values()}
    assert kinds == {SlicedAttnProcessor}, kinds
    assert torch.equal(generate(sd_pipe), stock)


def test_saving_a_unet_with_an_unfused_adapter_warns_that_it_is_not_erased(sd_pipe, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sd_pipe.unet.save_pretrained(tmp_path / "plain")  # no adapter: silent
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    with pytest.warns(UserWarning, match=rf"\['{name}'\] are loaded but not fused.*fuse_ace_adapter"):
        sd_pipe.save_pretrained(tmp_path / "pipe")  # the pipeline's save reaches the UNet's
    sd_pipe.set_ace_adapters(name, 0.0)  # switched off: the saved model is what the pipeline draws
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sd_pipe.unet.save_pretrained(tmp_path / "off")


def test_guards_follow_a_deepcopied_unet(sd_pipe):
    class Custom(AttnProcessor2_0):
        pass

    sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    twin = copy.deepcopy(sd_pipe.unet)
    with pytest.raises(ACECompatibilityError):
        twin.set_attn_processor(Custom())
    twin.set_attn_processor(AttnProcessor2_0())
    assert all(type(p) is ACEAttnProcessor for p in twin.attn_processors.values())
    assert twin.__dict__["set_attn_processor"].__self__ is twin
    assert all(a.__dict__["set_processor"].attn is a for a in attention_modules(twin).values())


# ====================================================================== torch.compile
def _one_block_unet():
    """One cross-attention block (4 layers): compiles in seconds."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32,),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def test_torch_compile_fullgraph_does_not_recompile_on_scale_or_toggle():
    """A compiled UNet inside a pipeline: the pipeline verbs reach the adapter through the compile wrapper,
    and changing scales, the active set or the on/off switch reuses the one compiled graph."""
    unet = _one_block_unet()
    pipe = StableDiffusionPipeline(**{**tiny_sd_pipeline(text_dim=32).components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    a = pipe.load_ace_adapter(random_adapter(unet, seed=1), "a")
    b = pipe.load_ace_adapter(random_adapter(unet, seed=2), "b")
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    changes = [
        lambda: None,
        lambda: pipe.set_ace_adapters([a, b], [0.3, 2.0]),
        lambda: pipe.set_ace_adapters([a]),
        lambda: pipe.disable_ace_adapters(),
        lambda: pipe.enable_ace_adapters(),
        lambda: pipe.set_ace_adapters([a, b], 1.0),
    ]

    def outputs():
        results = []
        for change in changes:
            change()
            results.append(generate(pipe, steps=1))
        return results

    eager = outputs()
    pipe.unet = torch.compile(unet, fullgraph=True, backend=counting_backend)
    compiled = outputs()
    assert len(graphs) == 1
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=0)
    assert differs(compiled[0], compiled[3]) and torch.equal(compiled[0], compiled[-1])
    assert pipe.get_list_ace_adapters() == [a, b]  # verbs see through the compile wrapper
    pipe.unload_ace_adapter()
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor needs a C++ compiler"
)
def test_torch_compile_inductor_matches_eager_and_keeps_one_graph_across_scales():
    """The default backend (inductor: generated C++ kernels) on a UNet with two adapters: outputs match
    eager, and rescaling or switching adapters off reuses the compiled graph (no recompilation)."""
    unet = _one_block_unet().eval()
    pipe = StableDiffusionPipeline(**{**tiny_sd_pipeline(text_dim=32).components, "unet": unet})
    a = pipe.load_ace_adapter(random_adapter(unet, seed=1), "a")
    b = pipe.load_ace_adapter(random_adapter(unet, seed=2), "b")
    generator = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 7, 32, generator=generator)

    def states():
        outputs = []
        for scales in ([1.0, 1.0], [0.3, 2.0], [0.0, 0.0], [1.0, 1.0]):
            pipe.set_ace_adapters([a, b], scales)
            with torch.no_grad():
                outputs.append(pipe.unet(sample, 10, context).sample)
        return outputs

    eager = states()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    pipe.unet = torch.compile(unet)
    started = time.perf_counter()
    compiled = states()
    print(f"inductor: compiled and ran 4 adapter states in {time.perf_counter() - started:.1f} s")
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)
    assert differs(compiled[0], compiled[2]) and torch.equal(compiled[0], compiled[3])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    pipe.unload_ace_adapter()


# ====================================================================== dtypes, devices, offloading
def unet_call(pipe):
    """One UNet evaluation on fixed small inputs in the pipeline's dtype (a bf16 CPU pipeline run is slow)."""
    generator = torch.Generator().manual_seed(0)
    dtype = pipe.unet.dtype
    sample = torch.randn(2, 4, 4, 4, generator=generator).to(dtype)
    with torch.no_grad():
        context = torch.cat(pipe.encode_prompt("a photo of a cat", "cpu", 1, True)[::-1]).to(dtype)
        return pipe.unet(sample, 10, context).sample.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_load_onto_or_convert_after(dtype):
    reference = tiny_sd_pipeline()
    adapter = random_adapter(reference.unet)
    onto = tiny_sd_pipeline().to(dtype)
    onto.load_ace_adapter(adapter)  # adapter cast to the pipeline's dtype at load
    after = tiny_sd_pipeline()
    after.load_ace_adapter(adapter)
    after.to(dtype)  # buffers follow pipe.to(dtype)
    for pipe in (onto, after):
        assert {b.dtype for b in pipe.unet.buffers()} == {dtype}
        assert_ace_active(pipe, unet_call)
    assert torch.equal(unet_call(onto), unet_call(after))
    reference.load_ace_adapter(adapter)
    torch.testing.assert_close(unet_call(onto), unet_call(reference), atol=0.05, rtol=0.05)
    assert torch.isfinite(generate(onto, steps=1)).all()  # and the whole pipeline runs


def test_pipe_to_moves_adapters():
    pipe = tiny_sd_pipeline()
    pipe.load_ace_adapter(random_adapter(pipe.unet))
    pipe.unet.to("meta")  # the only other device on a CPU-only machine: every ACE tensor must follow
    assert {b.device.type for b in pipe.unet.buffers()} == {"meta"}
    stack = get_stack(next(iter(cross_attention_modules(pipe.unet).values())))
    assert all(t.device.type == "meta" for t in stack.buffers())
    if torch.cuda.is_available():
        pipe = tiny_sd_pipeline()
        pipe.load_ace_adapter(random_adapter(pipe.unet))
        pipe.to("cuda")
        assert {b.device.type for b in pipe.unet.buffers()} == {"cuda"}
        assert_ace_active(pipe, unet_call)


def test_model_cpu_offload_keeps_the_adapter(sd_pipe):
    pytest.importorskip("accelerate")
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    edited = generate(sd_pipe)
    # no accelerator here: offload "to" the CPU, which still installs accelerate's hooks on every component
    sd_pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(sd_pipe.unet, "_hf_hook")
    assert torch.equal(generate(sd_pipe), edited)
    sd_pipe.set_ace_adapters(name, 0.0)
    assert differs(generate(sd_pipe), edited)
    sd_pipe.remove_all_hooks()


def test_sequential_offload_hooks_keep_the_adapter(sd_pipe):
    """What ``enable_sequential_cpu_offload`` does per component: weights to ``meta``, streamed in per "
    "call."""
    accelerate = pytest.importorskip("accelerate")
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    edited = generate(sd_pipe)
    accelerate.cpu_offload(sd_pipe.unet, execution_device=torch.device("cpu"))
    assert {p.device.type for p in sd_pipe.unet.parameters()} == {"meta"}
    assert torch.equal(generate(sd_pipe), edited)  # ACE tensors are non-persistent buffers: they stay put
    sd_pipe.set_ace_adapters(name, 0.0)
    assert differs(generate(sd_pipe), edited)


def test_enable_sequential_cpu_offload(sd_pipe):
    pytest.importorskip("accelerate")
    with torch.no_grad():
        embeds = sd_pipe.encode_prompt("a photo of a cat", "cpu", 1, True)
    kwargs = {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}
    name = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet))
    edited = generate_embeds(sd_pipe, **kwargs)
    sd_pipe.enable_sequential_cpu_offload(device="cpu")
    try:
        offloaded = generate_embeds(sd_pipe, **kwargs)
    except TypeError as err:
        if "requires_grad" not in str(err):
            raise
        sd_pipe.unload_ace_adapter()
        with pytest.raises(TypeError, match="requires_grad"):  # the stock pipeline fails the same way here
            generate_embeds(sd_pipe, **kwargs)
        first_line = str(err).splitlines()[0]
        pytest.skip(
            "enable_sequential_cpu_offload fails in this accelerate/torch combination without ACE too: "
            f"{first_line}"
        )
    assert torch.equal(offloaded, edited)
    assert sd_pipe.get_active_ace_adapters() == [name]


def generate_embeds(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        num_inference_steps=2, generator=generator, output_type="pt", height=32, width=32, **kwargs
    ).images


# ====================================================================== textual inversion
def kv_change(pipe, prompt):
    """Relative change of K/V that the loaded adapters make for ``prompt`` (over all cross-attention "
    "layers)."""
    with torch.no_grad():
        context = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        num = den = 0.0
        for attn in cross_attention_modules(pipe.unet).values():
            key, value = attn.to_k(context), attn.to_v(context)
            edited_key, edited_value = get_stack(attn).add_delta(context, key, value)
            num += (edited_key - key).norm() ** 2 + (edited_value - value).norm() ** 2
            den += key.norm() ** 2 + value.norm() ** 2
    return float((num / den).sqrt())


def test_textual_inversion_tokens_pass_through_erasure():
    pipe = tiny_sd_pipeline()
    pipe.tokenizer = copy.deepcopy(pipe.tokenizer)  # the test tokenizer is shared (cached): never mutate it
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    cat_row = embeddings[pipe.tokenizer.convert_tokens_to_ids("cat</w>")].detach().clone()
    new_row = (
        torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(0)) * cat_row.norm() / 8
    )
    pipe.load_textual_inversion({"<kitty>": cat_row})  # a learned alias of an erased concept
    pipe.load_textual_inversion({"<my-style>": new_row})  # a brand-new concept
    assert pipe.tokenizer.tokenize("a photo of <kitty>")[-1] == "<kitty>"

    # 1. an adapter erasing "cat" sees the embedding, not the token id: the alias is erased too
    erase_concept(pipe, "cat", neutral="dog", adapter_name="cat")
    unrelated = kv_change(pipe, "a photo of a house")
    assert kv_change(pipe, "a photo of a <kitty>") == pytest.approx(kv_change(pipe, "a photo of a cat"))
    assert kv_change(pipe, "a photo of a <kitty>") > 100 * unrelated
    pipe.unload_ace_adapter("cat")

    # 2. erase_concept on the new token's phrase: prompts with it change, others do not
    erase_concept(pipe, "<my-style>", neutral="art", adapter_name="style")
    for prompt in ("a painting in <my-style>", "<my-style>, a photo of a dog"):
        assert kv_change(pipe, prompt) > 20 * kv_change(pipe, "a painting of a dog")
