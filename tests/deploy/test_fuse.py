import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.deploy.bake import BakeSettings, bake
from ace_diffusers.deploy.fuse import (
    fuse_adapter,
    fused,
    fused_reports,
    get_fused_adapters,
    unfuse_adapter,
)
from ace_diffusers.errors import ACEAdapterNameError, ACEValueError
from ace_diffusers.integration.attach import adapter_deltas
from ace_diffusers.integration.modules import cross_attention_modules
from ace_diffusers.testing import random_adapter, tiny_sdxl_pipeline

from ..conftest import generate
from .conftest import (
    CONCEPT_PROMPTS,
    IMAGE_CONCEPT_TOL,
    IMAGE_UNRELATED_TOL,
    KV_EDIT_TOL,
    KV_SPECIFICITY_TOL,
    TEXT_DIM,
    UNRELATED_PROMPTS,
    snapshot,
)


def ungated_images(pipe, adapter, prompts):
    """Images with the adapter's gate forced open on every token (what dropping the gate would give)."""
    layers = {
        name: dataclasses.replace(
            f, gate_weight=torch.zeros_like(f.gate_weight), gate_bias=torch.tensor([30.0])
        )
        for name, f in adapter.layers.items()
    }
    pipe.load_ace_adapter(ACEAdapter(layers, concepts=adapter.concepts), adapter_name="ungated")
    pipe.set_ace_adapters("ungated")
    try:
        return {p: generate(pipe, p) for p in prompts}
    finally:
        pipe.unload_ace_adapter("ungated")
        pipe.set_ace_adapters("van_gogh")


def test_fused_outputs_match_gated_on_concept_and_stay_close_on_unrelated(erased):
    pipe, adapter, stock, gated = erased
    ungated = ungated_images(pipe, adapter, stock)
    report = pipe.fuse_ace_adapter()
    try:
        assert list(report) == ["van_gogh"] and fused_reports(pipe) == report
        figures = report["van_gogh"]
        assert set(figures) == {"concept", "neutral", "preserve", "unrelated"}
        assert figures["concept"]["edit_rel_error"] < KV_EDIT_TOL
        assert figures["unrelated"]["fused_change"] < KV_SPECIFICITY_TOL * figures["concept"]["fused_change"]
        assert (
            figures["concept"]["gated_change"] > 10 * figures["unrelated"]["gated_change"]
        )  # the gate's specificity
        json.dumps(report)  # plain numbers, storable

        fused_images = {p: generate(pipe, p) for p in stock}
    finally:
        pipe.unfuse_ace_adapter()

    def change(images, reference, prompts):
        return [float((images[p] - reference[p]).norm()) for p in prompts]

    for p, err, edit in zip(
        CONCEPT_PROMPTS,
        change(fused_images, gated, CONCEPT_PROMPTS),
        change(gated, stock, CONCEPT_PROMPTS),
        strict=True,
    ):
        assert err < IMAGE_CONCEPT_TOL * edit, p
    fused_drift = change(fused_images, stock, UNRELATED_PROMPTS)
    ungated_drift = change(ungated, stock, UNRELATED_PROMPTS)
    concept_change = change(gated, stock, CONCEPT_PROMPTS)
    assert all(
        f < u for f, u in zip(fused_drift, ungated_drift, strict=True)
    )  # baking beats dropping the gate
    assert sum(fused_drift) < IMAGE_UNRELATED_TOL * sum(concept_change)


def test_unfuse_restores_weights_and_outputs_bit_exactly(erased):
    pipe, _, _, gated = erased
    before = snapshot(pipe.unet)
    deltas = list(adapter_deltas(pipe.unet, "van_gogh"))
    weight = next(iter(cross_attention_modules(pipe.unet).values())).to_k.weight
    version = weight._version
    pipe.fuse_ace_adapter("van_gogh")
    assert weight._version > version  # caches keyed on version counters (the miner's) see the change
    after = pipe.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    assert len(changed) == 2 * len(cross_attention_modules(pipe.unet))
    assert all(float(d.active) == 0.0 for d in deltas)  # gated path off: nothing applied twice
    assert pipe.get_active_ace_adapters() == []
    version = weight._version
    assert pipe.unfuse_ace_adapter() == ["van_gogh"]
    assert weight._version > version
    restored = pipe.unet.state_dict()
    assert all(torch.equal(before[k], restored[k]) for k in before)
    assert all(float(d.active) == 1.0 for d in deltas)
    assert pipe.get_active_ace_adapters() == ["van_gogh"]
    for p in CONCEPT_PROMPTS[:2]:
        assert torch.equal(generate(pipe, p), gated[p])


def test_fuse_unload_save_then_unfuse(erased, tmp_path):
    """diffusers' fuse_lora workflow: fuse, unload the adapter, save; unfuse still restores the originals."""
    pipe, adapter, _, gated = erased
    before = snapshot(pipe.unet)
    pipe.fuse_ace_adapter()
    fused_weights = snapshot(pipe.unet)
    image = generate(pipe, CONCEPT_PROMPTS[0])
    pipe.unload_ace_adapter("van_gogh")
    assert torch.equal(generate(pipe, CONCEPT_PROMPTS[0]), image)  # stock processors, same fused weights
    pipe.save_pretrained(tmp_path / "pipe")
    saved = load_file(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(fused_weights) and all(torch.equal(saved[k], fused_weights[k]) for k in saved)
    pipe.unfuse_ace_adapter()
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    pipe.load_ace_adapter(adapter, adapter_name="van_gogh")
    assert torch.equal(generate(pipe, CONCEPT_PROMPTS[0]), gated[CONCEPT_PROMPTS[0]])


PLAIN_DIFFUSERS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(1)
    folder, prompts_file, out = sys.argv[1:4]
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = open(prompts_file).read().splitlines()
    images = {}
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(0)
        images[str(i)] = pipe(prompt, num_inference_steps=2, generator=generator, output_type="pt",
                              height=32, width=32).images
    assert not any(name.startswith("ace_diffusers") for name in sys.modules), "ace_diffusers was imported"
    save_file(images, out)
    print(type(pipe).__name__)
    """
)


def run_plain_diffusers(script, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_fused_pipeline_saved_and_reloaded_by_plain_diffusers(erased, tmp_path):
    pipe, _, stock, gated = erased
    pipe.fuse_ace_adapter()
    try:
        prompts = CONCEPT_PROMPTS[:2] + UNRELATED_PROMPTS[:1]
        expected = [generate(pipe, p) for p in prompts]
        pipe.save_pretrained(tmp_path / "fused")
    finally:
        pipe.unfuse_ace_adapter()
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    out = run_plain_diffusers(
        PLAIN_DIFFUSERS_SCRIPT, tmp_path / "fused", tmp_path / "prompts.txt", tmp_path / "out.safetensors"
    )
    assert out.strip() == "StableDiffusionPipeline"
    images = load_file(str(tmp_path / "out.safetensors"))
    for i, prompt in enumerate(prompts):
        assert torch.allclose(images[str(i)], expected[i], atol=1e-5), prompt
    # the reloaded plain model carries the erasure: concept prompts look like the gated (erased) pipeline
    for i, prompt in enumerate(CONCEPT_PROMPTS[:2]):
        assert (images[str(i)] - gated[prompt]).norm() < IMAGE_CONCEPT_TOL * (
            gated[prompt] - stock[prompt]
        ).norm()


def test_errors(erased):
    pipe, _, _, _ = erased
    with pytest.raises(ValueError, match="nothing to unfuse"):
        pipe.unfuse_ace_adapter()
    with pytest.raises(ACEAdapterNameError, match="No ACE adapter named 'nope'"):
        pipe.fuse_ace_adapter("nope")
    before = snapshot(pipe.unet)
    with pytest.raises(ACEValueError, match="rank must be"):
        pipe.fuse_ace_adapter(settings=BakeSettings(rank=0))
    assert get_fused_adapters(pipe) == [] and all(
        torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items()
    )
    pipe.fuse_ace_adapter("van_gogh")
    try:
        with pytest.raises(ACEValueError, match="already fused"):
            pipe.fuse_ace_adapter("van_gogh")
        with pytest.raises(ACEValueError, match="No active ACE adapter to fuse.*already fused"):
            pipe.fuse_ace_adapter()
        with pytest.raises(ACEValueError, match="fused into the weights"):
            pipe.set_ace_adapters("van_gogh")
        with pytest.raises(ACEValueError, match="already fused"):
            with fused(pipe):
                pass
    finally:
        pipe.unfuse_ace_adapter()
    with pytest.raises(ValueError, match="nothing to unfuse"):
        unfuse_adapter(pipe)


def test_several_adapters_with_per_layer_gates_fuse_and_unfuse(sd_pipe):
    a = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, seed=1, magnitude=0.2), adapter_name="a")
    b = sd_pipe.load_ace_adapter(random_adapter(sd_pipe.unet, seed=2, magnitude=0.2), adapter_name="b")
    sd_pipe.set_ace_adapters(["a", "b"], [0.5, 1.0])
    before = snapshot(sd_pipe.unet)
    gated = generate(sd_pipe, "random concept")
    report = fuse_adapter(sd_pipe)  # None: every active adapter
    assert list(report) == ["a", "b"] and get_fused_adapters(sd_pipe) == ["a", "b"]
    attn_name, attn = next(iter(cross_attention_modules(sd_pipe.unet).items()))
    expected = before[f"{attn_name}.to_k.weight"].double()
    for name, scale in ((a, 0.5), (b, 1.0)):
        expected = expected + bake(sd_pipe, sd_pipe.get_ace_adapter(name), scale=scale).layers[
            attn_name
        ].delta_weight("k")
    assert torch.allclose(attn.to_k.weight.double(), expected, atol=1e-6)
    fused_image = generate(sd_pipe, "random concept")
    assert (fused_image - gated).abs().max() > 0  # an approximation, not the gated model
    unfuse_adapter(sd_pipe)
    assert all(torch.equal(before[k], v) for k, v in sd_pipe.unet.state_dict().items())
    assert sd_pipe.get_active_ace_adapters() == ["a", "b"]
    assert torch.equal(generate(sd_pipe, "random concept"), gated)


def test_sdxl_fuse_matches_gated_and_unfuses_exactly():
    pipe = tiny_sdxl_pipeline(text_dim=TEXT_DIM)
    prompt = CONCEPT_PROMPTS[0]
    stock = generate(pipe, prompt)
    pipe.erase_concept("Van Gogh", kind="style")
    gated = generate(pipe, prompt)
    before = snapshot(pipe.unet)
    report = pipe.fuse_ace_adapter()
    assert next(iter(report.values()))["concept"]["edit_rel_error"] < KV_EDIT_TOL
    key = "add_embedding.linear_1.weight"  # the pooled-embedding edit is fused too
    assert not torch.equal(pipe.unet.state_dict()[key], before[key])
    assert (generate(pipe, prompt) - gated).norm() < IMAGE_CONCEPT_TOL * (gated - stock).norm()
    pipe.unfuse_ace_adapter()
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(generate(pipe, prompt), gated)


def test_weights_changed_after_fuse_are_kept_on_unfuse(erased):
    pipe, _, _, _ = erased
    before = snapshot(pipe.unet)
    pipe.fuse_ace_adapter()
    attn_name, attn = next(iter(cross_attention_modules(pipe.unet).items()))
    with torch.no_grad():
        attn.to_k.weight.add_(1.0)  # e.g. another library fused its own LoRA meanwhile
    with pytest.warns(UserWarning, match="changed after fuse_ace_adapter"):
        pipe.unfuse_ace_adapter()
    key = f"{attn_name}.to_k.weight"
    assert torch.allclose(pipe.unet.state_dict()[key], before[key] + 1.0, atol=1e-5)
    with torch.no_grad():
        attn.to_k.weight.copy_(before[key])
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_disabling_adapters_warns_that_fused_ones_stay_in_effect(erased):
    pipe = erased[0]
    pipe.fuse_ace_adapter("van_gogh")
    try:
        with pytest.warns(UserWarning, match="leaves the fused adapter"):
            pipe.disable_ace_adapters()
    finally:
        pipe.enable_ace_adapters()
        pipe.unfuse_ace_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing fused: no warning
        pipe.disable_ace_adapters()
        pipe.enable_ace_adapters()
