import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ace_diffusers.deploy.bake import BakeSettings, bake
from ace_diffusers.deploy.export import lora_state_dict, save_lora, to_diffusers_lora
from ace_diffusers.deploy.fuse import pooled_weight_delta
from ace_diffusers.errors import ACEValueError
from ace_diffusers.integration.modules import cross_attention_modules, projection_weight
from ace_diffusers.testing import tiny_sd_pipeline

from ..conftest import generate

TEXT_DIM = 128
KOHYA_KEY = re.compile(
    r"^lora_unet_(down_blocks|mid_block|up_blocks)_\w+_attn2_to_[kv]\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
PROMPTS = ["a painting in the style of Van Gogh", "a photo of a cat"]


def tokens(seed=0, n=7):
    return torch.randn(1, n, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def predicted_kv(pipe, baked, x):
    """K/V of every cross-attention layer with the baked edit added to the base weights."""
    out = {}
    for name, attn in cross_attention_modules(pipe.unet).items():
        for proj, linear in (("k", attn.to_k), ("v", attn.to_v)):
            weight = projection_weight(linear).detach().double() + baked.layers[name].delta_weight(proj)
            out[f"{name}.{proj}"] = (x.double() @ weight.T).float()
    return out


def actual_kv(pipe, x):
    with torch.no_grad():
        return {
            f"{name}.{proj}": getattr(attn, f"to_{proj}")(x)
            for name, attn in cross_attention_modules(pipe.unet).items()
            for proj in ("k", "v")
        }


def test_diffusers_format_keys_shapes_and_config(fitted, tmp_path):
    pipe, adapter, baked = fitted
    state = to_diffusers_lora(adapter, baked=baked)
    layers = sorted(cross_attention_modules(pipe.unet))
    assert len(state) == 4 * len(layers)
    for name in layers:
        for proj in ("k", "v"):
            down, up = (
                state[f"unet.{name}.to_{proj}.lora_A.weight"],
                state[f"unet.{name}.to_{proj}.lora_B.weight"],
            )
            assert down.shape == (adapter.rank, TEXT_DIM) and up.shape[1] == adapter.rank
            assert torch.allclose(
                (up.double() @ down.double()), baked.layers[name].delta_weight(proj), atol=1e-6
            )
    path = save_lora(adapter, tmp_path / "lora.safetensors", baked=baked)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == config["unet.lora_alpha"] == adapter.rank  # scaling 1
    assert sorted(config["unet.target_modules"]) == sorted(f"{n}.to_{p}" for n in layers for p in ("k", "v"))
    assert json.loads(meta["ace_concepts"]) == ["Van Gogh"] and meta["ace_mode"] == "baked"
    assert set(load_file(str(path))) == set(state)


def test_kohya_format_keys(fitted):
    pipe, adapter, baked = fitted
    state, meta = lora_state_dict(adapter, format="kohya", baked=baked)
    assert all(KOHYA_KEY.match(k) for k in state), [k for k in state if not KOHYA_KEY.match(k)][:3]
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    down, up, alpha = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"], state[f"{key}.alpha"]
    assert alpha.ndim == 0 and float(alpha) == down.shape[0]  # alpha / rank = 1
    delta = baked.layers["down_blocks.1.attentions.0.transformer_blocks.0.attn2"].delta_weight("k")
    assert torch.allclose(up.double() @ down.double(), delta, atol=1e-6)
    assert "lora_adapter_metadata" not in meta and meta["ss_network_dim"] == str(down.shape[0])


@pytest.mark.parametrize("fmt", ["diffusers-lora", "kohya"])
def test_load_lora_weights_changes_kv_as_predicted(fitted, tmp_path, fmt):
    pipe, adapter, baked = fitted
    path = save_lora(adapter, tmp_path / f"{fmt}.safetensors", baked=baked, format=fmt)
    x = tokens()
    expected, base = predicted_kv(pipe, baked, x), actual_kv(pipe, x)
    pipe.load_lora_weights(str(path), adapter_name="ace_export")
    try:
        got = actual_kv(pipe, x)
    finally:
        pipe.unload_lora_weights()
    for key in expected:
        assert not torch.allclose(got[key], base[key], atol=1e-4), key  # the LoRA does something
        assert torch.allclose(got[key], expected[key], atol=1e-5), key
    assert all(torch.equal(base[k], v) for k, v in actual_kv(pipe, x).items())  # unloaded cleanly


def test_modes_rank_and_dtype(fitted):
    pipe, adapter, baked = fitted
    ungated = to_diffusers_lora(adapter, mode="ungated", scale=0.5)
    name = sorted(adapter.layers)[0]
    assert torch.equal(ungated[f"unet.{name}.to_k.lora_A.weight"], adapter.layers[name].k_down)
    assert torch.equal(ungated[f"unet.{name}.to_k.lora_B.weight"], 0.5 * adapter.layers[name].k_up)
    low = to_diffusers_lora(adapter, pipe, rank=4, dtype=torch.float16)
    assert low[f"unet.{name}.to_v.lora_A.weight"].shape == (4, TEXT_DIM)
    assert all(t.dtype == torch.float16 for t in low.values())
    assert to_diffusers_lora(adapter, pipe)[f"unet.{name}.to_k.lora_A.weight"].shape[0] == adapter.rank


def test_bad_input(fitted, tmp_path):
    pipe, adapter, baked = fitted
    with pytest.raises(ACEValueError, match="Unknown LoRA format"):
        to_diffusers_lora(adapter, baked=baked, format="lycoris")
    with pytest.raises(ACEValueError, match="Unknown export mode"):
        to_diffusers_lora(adapter, baked=baked, mode="gated")
    with pytest.raises(ACEValueError, match="needs the base pipeline"):
        to_diffusers_lora(adapter)
    with pytest.raises(ACEValueError, match="rank must be"):
        to_diffusers_lora(adapter, pipe, rank=0)
    with pytest.raises(ACEValueError, match="is a folder"):
        save_lora(adapter, tmp_path, baked=baked)
    with pytest.raises(ACEValueError, match="conflicts"):
        to_diffusers_lora(adapter, baked=baked, rank=3)


def test_export_from_fused_pipeline_writes_the_fused_edit(tmp_path):
    pipe = tiny_sd_pipeline(text_dim=TEXT_DIM)
    pipe.erase_concept("Van Gogh", kind="style", adapter_name="vg")
    pipe.set_ace_adapters("vg", 0.7)
    pipe.fuse_ace_adapter()
    x = tokens(1)
    fused_kv = actual_kv(pipe, x)
    path = pipe.export_ace_lora(tmp_path / "vg.safetensors")
    pipe.unfuse_ace_adapter()
    pipe.unload_ace_adapter()
    pipe.load_lora_weights(str(path))
    for key, value in actual_kv(pipe, x).items():
        assert torch.allclose(value, fused_kv[key], atol=1e-5), key
    with safe_open(str(path), "pt") as fh:
        assert float(fh.metadata()["ace_scale"]) == pytest.approx(0.7)


PLAIN_LORA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(1)
    folder, tokens_file, out = sys.argv[1:4]
    loras = sys.argv[4:]
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    x = load_file(tokens_file)["x"]
    results = {}
    for i, lora in enumerate(loras):
        pipe.load_lora_weights(lora, adapter_name=f"ace{i}")
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                with torch.no_grad():
                    results[f"{i}/{name}.k"] = module.to_k(x)
                    results[f"{i}/{name}.v"] = module.to_v(x)
        for j, prompt in enumerate(["a painting in the style of Van Gogh", "a photo of a cat"]):
            generator = torch.Generator().manual_seed(0)
            results[f"{i}/image{j}"] = pipe(prompt, num_inference_steps=2, generator=generator,
            output_type="pt",
                                            height=32, width=32).images
        pipe.unload_lora_weights()
    assert not any(name.startswith("ace_diffusers") for name in sys.modules), "ace_diffusers was imported"
    save_file(results, out)
    """
)


@pytest.mark.slow
def test_plain_diffusers_loads_both_formats(fitted, tmp_path):
    pipe, adapter, baked = fitted
    pipe.save_pretrained(tmp_path / "base")
    files = [
        save_lora(adapter, tmp_path / f"{fmt}.safetensors", baked=baked, format=fmt)
        for fmt in ("diffusers-lora", "kohya")
    ]
    x = tokens(2)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_LORA_SCRIPT,
            str(tmp_path / "base"),
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "out.safetensors"),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))

    expected_kv = predicted_kv(pipe, baked, x)
    pipe.load_ace_adapter(adapter, adapter_name="vg")
    pipe.fuse_ace_adapter()
    try:
        fused_images = [generate(pipe, p) for p in PROMPTS]
    finally:
        pipe.unfuse_ace_adapter()
        pipe.unload_ace_adapter()
    for i in range(len(files)):
        for key, value in expected_kv.items():
            assert torch.allclose(got[f"{i}/{key}"], value, atol=1e-5), (files[i].name, key)
        for j, image in enumerate(fused_images):  # the LoRA pipeline behaves like the fused pipeline
            assert torch.allclose(got[f"{i}/image{j}"], image, atol=1e-4), (files[i].name, PROMPTS[j])


@pytest.mark.parametrize("fmt", ["diffusers-lora", "kohya"])
def test_sdxl_exports_load(fmt, tmp_path):
    from ace_diffusers.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(text_dim=64)
    adapter = pipe.erase_concept("Van Gogh", kind="style", load=False)
    baked = bake(pipe, adapter, settings=BakeSettings(rank=8))
    with pytest.raises(ACEValueError, match="pooled text embedding"):  # the pooled edit needs the weights
        save_lora(adapter, tmp_path / "no.safetensors", baked=baked, format=fmt)
    assert not (tmp_path / "no.safetensors").exists()
    path = save_lora(adapter, tmp_path / "sdxl.safetensors", pipe, baked=baked, format=fmt)
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3))
    expected = predicted_kv(pipe, baked, x)
    linear = pipe.unet.add_embedding.linear_1
    pooled_in = torch.randn(2, linear.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # the LoRA's add_embedding.linear_1 = the weight pooled_weight_delta fuses
        expected_pooled = (
            pooled_in.double() @ (linear.weight.double() + pooled_weight_delta(pipe.unet, adapter, 1.0)).T
        )
        expected_pooled = expected_pooled.float() + linear.bias
    pipe.load_lora_weights(str(path))
    for key, value in actual_kv(pipe, x).items():
        assert torch.allclose(value, expected[key], atol=1e-5), key
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.unet.add_embedding.linear_1(pooled_in), expected_pooled, atol=1e-5, rtol=0
        )
