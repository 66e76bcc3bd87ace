"""Issue 11's acceptance test: a fused miniature-world model, saved with ``save_pretrained`` and reloaded
by plain diffusers (the subprocess never imports ace_diffusers), still erases within the bounds that
``docs/deploy.md`` states (``RELOAD_BOUNDS``, written there by ``ace-diffusers bench deploy``)."""

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from ace_diffusers.bench.deploy import RELOAD_BOUNDS, RELOAD_TEST_SHAPE
from ace_diffusers.shapes.erasure import erase_arguments, metric_sets
from ace_diffusers.shapes.pipeline import DEFAULT_SAMPLER, TOKENIZER_MAX_LENGTH, load_shapes_pipeline

from ..deploy.test_fuse import run_plain_diffusers
from .conftest import NEEDS_CLASSIFIER, NEEDS_WEIGHTS

# Plain diffusers only: reload the saved folder, denoise the given latents, save the images.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(1)
    folder, request_file, out = sys.argv[1:4]
    request = json.load(open(request_file))
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    latents = load_file(request["latents"])["latents"] * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        images = pipe(request["prompts"], latents=latents, output_type="pt", **request["sampler"]).images
    assert not any(name.startswith("ace_diffusers") for name in sys.modules), "ace_diffusers was imported"
    save_file({"images": images.float().clamp(0, 1).contiguous()}, out)
    print(type(pipe).__name__, pipe.tokenizer.model_max_length)
    """
)


@pytest.mark.slow
@NEEDS_WEIGHTS
@NEEDS_CLASSIFIER
def test_fused_shapes_pipeline_reloaded_by_plain_diffusers_still_erases(shapes_classifier, tmp_path):
    pipe = load_shapes_pipeline()  # our own copy: the session pipeline must stay unedited
    pipe.erase_concept(**erase_arguments(RELOAD_TEST_SHAPE), adapter_name="erased")
    pipe.fuse_ace_adapter()
    pipe.unload_ace_adapter()  # the documented workflow: nothing of ACE is left but the fused weights
    pipe.save_pretrained(tmp_path / "fused")

    sets = metric_sets(RELOAD_TEST_SHAPE)
    prompts = sets["erased"].prompts + sets["others"].prompts
    labels = [lab["shape"] for lab in sets["erased"].labels + sets["others"].labels]
    # the latents ace_diffusers.shapes.pipeline.generate draws (seed 0 per image, as
    # measure(images_per_prompt=1))
    shape = (pipe.unet.config.in_channels, 8, 16)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(0)) for _ in prompts])
    save_file({"latents": latents}, str(tmp_path / "latents.safetensors"))
    request = {
        "prompts": prompts,
        "latents": str(tmp_path / "latents.safetensors"),
        "sampler": DEFAULT_SAMPLER,
    }
    (tmp_path / "request.json").write_text(json.dumps(request))

    out = run_plain_diffusers(
        RELOAD_SCRIPT, tmp_path / "fused", tmp_path / "request.json", tmp_path / "images.safetensors"
    )
    assert out.split() == ["StableDiffusionPipeline", str(TOKENIZER_MAX_LENGTH)]
    images = load_file(str(tmp_path / "images.safetensors"))["images"]
    assert images.shape == (len(prompts), 3, 32, 64)

    predicted = shapes_classifier.predict(images)["shape"]
    n_erased = len(sets["erased"].prompts)
    acc_e = sum(p == RELOAD_TEST_SHAPE for p in predicted[:n_erased]) / n_erased
    others = list(zip(predicted[n_erased:], labels[n_erased:], strict=True))
    acc_s = sum(p == want for p, want in others) / len(others)
    assert acc_e <= RELOAD_BOUNDS["acc_e_max"], (
        f"the reloaded model still draws the {RELOAD_TEST_SHAPE}: Acc_e {acc_e:.3f}"
    )
    assert acc_s >= RELOAD_BOUNDS["acc_s_min"], (
        f"the other shapes are no longer recognised: Acc_s {acc_s:.3f}"
    )
