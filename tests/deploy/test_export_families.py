"""Per model family: the exported LoRA, loaded by plain diffusers in a process that never imports
ace_diffusers, reproduces the fused pipeline (SDXL with its pooled edit, SD3 with its joint attention,
FLUX fitted without its single-stream blocks, Sana behind its instruction)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from ace_diffusers.deploy.export import export_lora
from ace_diffusers.fitting.data import FitSettings
from ace_diffusers.testing import tiny_sdxl_pipeline
from ace_diffusers.testing_transformers import tiny_flux_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline

PROMPTS = ["a painting by Van Gogh", "a photo of a cat"]
CALL = {"num_inference_steps": 2, "output_type": "pt", "height": 32, "width": 32}
SANA_CALL = {**CALL, "output_type": "latent", "height": 256, "width": 256, "use_resolution_binning": False}

PLAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    folder, lora, out = sys.argv[1], sys.argv[2], sys.argv[3]
    prompts, call = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    index = json.load(open(folder + "/model_index.json"))  # components saved as absent (Sana's VAE here)
    absent = {k: None for k, v in index.items() if v == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(folder, **absent)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora)
    images = {}
    for j, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(0)
        images[f"image{j}"] = pipe(prompt, generator=generator, **call).images
    assert not any(name.startswith("ace_diffusers") for name in sys.modules), "ace_diffusers was imported"
    save_file(images, out)
    """
)


def _images(pipe, call):
    return [pipe(prompt, generator=torch.Generator().manual_seed(0), **call).images for prompt in PROMPTS]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "sana"])
def test_plain_diffusers_reproduces_the_fused_pipeline(family, tmp_path):
    torch.set_num_threads(1)  # as in the subprocess: the same float kernels
    builders = {
        "sdxl": lambda: tiny_sdxl_pipeline(text_dim=64),
        "sd3": lambda: tiny_sd3_pipeline(t5=True),
        "flux": tiny_flux_pipeline,
        "sana": tiny_sana_pipeline,
    }
    pipe, call = builders[family](), SANA_CALL if family == "sana" else CALL
    pipe.save_pretrained(tmp_path / "base")  # before anything is erased: the stock weights
    settings = FitSettings(single_stream=False) if family == "flux" else None  # FLUX: fusable blocks only
    adapter = pipe.erase_concept("Van Gogh", kind="style", adapter_name="vg", settings=settings)
    assert (adapter.pooled is not None) == (family != "sana")  # a pooled edit rides in the file too
    pipe.fuse_ace_adapter("vg")
    fused = _images(pipe, call)
    lora = export_lora(pipe, tmp_path / "lora.safetensors", format="diffusers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    args = [str(tmp_path / "base"), str(lora), str(tmp_path / "out.safetensors"), json.dumps(PROMPTS)]
    args.append(json.dumps(call))
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    worst = max(float((got[f"image{j}"] - image).abs().max()) for j, image in enumerate(fused))
    print(f"{family}: max |plain diffusers + LoRA - fused| = {worst:.2e}")
    assert worst < 1e-4
