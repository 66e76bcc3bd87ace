"""``ace-diffusers export``: an adapter folder in, a plain LoRA file out, errors as messages."""

import torch
from safetensors.torch import load_file

from ace_diffusers.cli import main as cli_main
from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.deploy.export import lora_state_dict
from ace_diffusers.testing import tiny_sd_pipeline


def test_cli_export(fitted, tmp_path, capsys):
    pipe, adapter, baked = fitted
    adapter.save_pretrained(tmp_path / "adapter")
    pipe.save_pretrained(tmp_path / "base")
    out = tmp_path / "kohya.safetensors"
    code = cli_main(
        [
            "export",
            "--adapter",
            str(tmp_path / "adapter"),
            "--format",
            "kohya",
            "--output",
            str(out),
            "--base",
            str(tmp_path / "base"),
        ]
    )
    assert code == 0 and "wrote" in capsys.readouterr().out
    expected = lora_state_dict(adapter, format="kohya", baked=baked)[0]
    written = load_file(str(out))
    assert set(written) == set(expected)
    # float rounding only: the token embeddings may come from batches of another size (cache)
    assert all(torch.allclose(written[k], expected[k], atol=1e-5, rtol=1e-4) for k in expected)
    # no recorded base model and no --base: a clear error; --mode ungated needs no base
    assert (
        cli_main(
            ["export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "x.safetensors")]
        )
        == 1
    )
    assert "--base" in capsys.readouterr().err
    ungated = ["--output", str(tmp_path / "u.safetensors"), "--mode", "ungated", "--dtype", "float16"]
    # the closed form's file is a text map: even the ungated export needs the base model's K/V weights
    assert cli_main(["export", "--adapter", str(tmp_path / "adapter"), *ungated]) == 1
    assert "K/V weights" in capsys.readouterr().err
    base = ["--base", str(tmp_path / "base")]
    assert cli_main(["export", "--adapter", str(tmp_path / "adapter"), *ungated, *base]) == 0
    assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / "u.safetensors")).values())
    # an adapter stored layer by layer (as fine-tuning writes) exports ungated without a base
    whole = ACEAdapter(adapter.layers, concepts=adapter.concepts, neutral=adapter.neutral, kind=adapter.kind)
    whole.save_pretrained(tmp_path / "whole")
    assert cli_main(["export", "--adapter", str(tmp_path / "whole"), *ungated]) == 0
    other = tiny_sd_pipeline(text_dim=64)
    other.save_pretrained(tmp_path / "other")
    assert (
        cli_main(
            [
                "export",
                "--adapter",
                str(tmp_path / "adapter"),
                "--output",
                str(tmp_path / "y.safetensors"),
                "--base",
                str(tmp_path / "other"),
            ]
        )
        == 1
    )
    assert "different base model" in capsys.readouterr().err


def test_cli_export_of_an_sdxl_adapter_carries_the_pooled_edit(tmp_path, capsys):
    from ace_diffusers.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    pipe.erase_concept("Van Gogh", kind="style", load=False).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "sdxl.safetensors"
    code = cli_main(
        [
            "export",
            "--adapter",
            str(tmp_path / "adapter"),
            "--format",
            "diffusers",
            "--output",
            str(out),
            "--base",
            str(tmp_path / "base"),
        ]
    )
    assert code == 0 and "wrote" in capsys.readouterr().out
    assert "unet.add_embedding.linear_1.lora_A.weight" in load_file(str(out))
