"""A closed-form adapter saved as one text map: the file is small, and the factors rebuilt from the model's
weights reproduce the fitted ones."""

import os

import pytest
import torch
from safetensors.torch import load_file

from ace_diffusers.bench.families import adapter_parameters, text_space_parameters
from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.core.text_space import TextSpaceEdit
from ace_diffusers.errors import ACEAdapterFormatError
from ace_diffusers.integration.attach import materialized
from ace_diffusers.integration.modules import layer_shapes
from ace_diffusers.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


def _images(pipe, prompt="a painting by Van Gogh"):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt, num_inference_steps=2, height=32, width=32, output_type="pt", generator=generator
    ).images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_closed_form_file_holds_the_text_map_and_loads_back_to_the_same_erasure(family, tmp_path):
    pipe = tiny_sd_pipeline(text_dim=64) if family == "sd" else tiny_sdxl_pipeline(text_dim=64)
    adapter = pipe.erase_concept("Van Gogh", kind="style", adapter_name="vg", rank=8)
    assert adapter.text_space is not None and adapter.format_version == 3
    erased = _images(pipe)
    adapter.save_pretrained(tmp_path / "vg")
    tensors = load_file(str(tmp_path / "vg" / "ace_adapter.safetensors"))
    stored = sum(t.numel() for t in tensors.values())
    pooled = adapter.pooled.dim if adapter.pooled is not None else 0
    shapes = layer_shapes(pipe.unet)
    assert stored == text_space_parameters(shapes, 8, pooled) == adapter.num_parameters()  # the real file
    assert stored < adapter_parameters(shapes, 8, pooled)  # fewer numbers than every layer's factors

    loaded = ACEAdapter.from_pretrained(tmp_path / "vg")
    assert loaded.pending and loaded.concepts == ["Van Gogh"] and loaded.rank == 8
    with pytest.raises(ACEAdapterFormatError, match="text map"):
        _ = loaded.layers  # no model, no factors: said, not guessed
    rebuilt = materialized(loaded, pipe.unet)
    for name, factors in adapter.layers.items():
        for key, tensor in factors.tensors().items():
            torch.testing.assert_close(getattr(rebuilt.layers[name], key), tensor, atol=1e-5, rtol=1e-4)
    pipe.unload_ace_adapter("vg")
    pipe.load_ace_adapter(str(tmp_path / "vg"), adapter_name="again")
    torch.testing.assert_close(_images(pipe), erased, atol=1e-5, rtol=0)
    again = pipe.get_ace_adapter("again")
    assert not again.pending and again.text_space is not None  # re-saving keeps the small form
    again.save_pretrained(tmp_path / "again")
    assert os.path.getsize(tmp_path / "again" / "ace_adapter.safetensors") == os.path.getsize(
        tmp_path / "vg" / "ace_adapter.safetensors"
    )


def test_a_fine_tuned_or_hand_made_adapter_is_stored_layer_by_layer(tmp_path):
    from ace_diffusers.testing import random_adapter

    pipe = tiny_sd_pipeline()
    adapter = random_adapter(pipe.unet, rank=4)
    assert adapter.text_space is None and adapter.format_version == 1
    adapter.save_pretrained(tmp_path / "r")
    assert not ACEAdapter.from_pretrained(tmp_path / "r").pending


def test_damaged_text_space_files_are_refused_with_the_reason():
    d, k = 8, 4
    parts = dict(basis=torch.zeros(d, k), down_basis=torch.zeros(k, d))
    parts.update(gate_weight=torch.zeros(d), gate_bias=torch.zeros(1))
    rights = {"l": (torch.zeros(k, 2), torch.zeros(k, 2))}
    with pytest.raises(ACEAdapterFormatError, match="do not fit"):
        TextSpaceEdit(rights=rights, **{**parts, "down_basis": torch.zeros(d, k)})
    with pytest.raises(ACEAdapterFormatError, match="right factors"):
        TextSpaceEdit(rights={"l": (torch.zeros(k + 1, 2), torch.zeros(k, 2))}, **parts)
    edit = TextSpaceEdit(rights={"l": (torch.zeros(k, 2), torch.zeros(k, 2))}, **parts)
    tensors = edit.tensors()
    with pytest.raises(ACEAdapterFormatError, match="unexpected tensor"):
        TextSpaceEdit.from_tensors({**tensors, "l.k_down": torch.zeros(2, d)}, "file")
    with pytest.raises(ACEAdapterFormatError, match="missing tensors"):
        TextSpaceEdit.from_tensors({k_: v for k_, v in tensors.items() if k_ != "l.v_right"}, "file")
    with pytest.raises(ACEAdapterFormatError, match="text width"):
        ACEAdapter(None, concepts=["x"], text_space=edit, layer_shapes={"l": (d + 1, 4, 4)})
