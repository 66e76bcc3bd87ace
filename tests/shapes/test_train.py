"""The training command end to end on a tiny budget: every artefact written, then resumed from disk."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ace_diffusers.shapes.pipeline import load_shapes_pipeline, weights_present
from ace_diffusers.shapes.train import main

TINY = ["--n-train", "64", "--steps-cls", "3", "--steps-vae", "3", "--steps-unet", "4", "--ckpt-every", "2"]


@pytest.mark.slow
def test_a_tiny_run_writes_a_loadable_world_and_resumes(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    assert main(["--out", str(out), "--work", str(work), *TINY]) == 0
    assert weights_present(out) and (out / "classifier.safetensors").exists()
    meta = json.loads((out / "train_meta.json").read_text())
    assert meta["unet"]["steps"] == 4 and meta["seed"] == 0 and "PAIR_TEMPLATES" in meta["vocabulary"]
    assert (work / "unet_ckpt.safetensors").exists() and (work / "snapshot" / "unet.safetensors").exists()
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no debris
    pipe = load_shapes_pipeline(weights_dir=out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr
    # resuming skips the finished stages and continues the UNet from its last checkpoint (step 2 of 4)
    before = load_file(str(out / "unet.safetensors"))
    assert main(["--out", str(out), "--work", str(work), *TINY, "--resume"]) == 0
    after = load_file(str(out / "unet.safetensors"))
    assert set(after) == set(before)
    assert all(torch.allclose(after[k].float(), before[k].float(), atol=1e-2) for k in before)
    assert json.loads((out / "train_meta.json").read_text())["unet"]["steps"] == 4
