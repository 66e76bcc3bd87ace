"""Model-level attaching: all-or-nothing, undoable, names and scales checked before anything changes."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.core.factors import LayerFactors
from ace_diffusers.core.processor import ACEAttnProcessor, get_stack
from ace_diffusers.errors import ACEAdapterFormatError, ACEAdapterNameError, ACEValueError
from ace_diffusers.integration.attach import (
    active_adapters,
    adapter_deltas,
    adapter_scale,
    attach_adapter,
    default_adapter_name,
    detach_adapter,
    loaded_adapters,
    set_active_adapters,
    single_loaded_adapter,
    validate_adapter_name,
)
from ace_diffusers.integration.modules import attention_modules, cross_attention_modules
from ace_diffusers.testing import random_adapter


def test_attach_then_detach_restores_the_exact_processors(sd_pipe):
    unet = sd_pipe.unet
    before = {name: m.processor for name, m in attention_modules(unet).items()}
    attach_adapter(unet, random_adapter(unet), "a")
    assert all(isinstance(m.processor, ACEAttnProcessor) for m in attention_modules(unet).values())
    assert all(get_stack(m) is not None for m in cross_attention_modules(unet).values())
    detach_adapter(unet, "a")
    assert {name: m.processor for name, m in attention_modules(unet).items()} == before
    assert all(get_stack(m) is None for m in cross_attention_modules(unet).values())
    assert isinstance(next(iter(before.values())), AttnProcessor2_0)


def test_names_are_validated_and_never_reused(sd_pipe):
    unet = sd_pipe.unet
    adapter = random_adapter(unet, concepts=("Van Gogh",))
    assert default_adapter_name(unet, adapter) == "van_gogh"
    attach_adapter(unet, adapter, "van_gogh")
    assert default_adapter_name(unet, adapter) == "van_gogh_2"
    with pytest.raises(ACEAdapterNameError, match="already loaded"):
        attach_adapter(unet, adapter, "van_gogh")
    for bad in ("", "has space", "x" * 65):
        with pytest.raises(ACEAdapterNameError, match="Invalid adapter name"):
            validate_adapter_name(bad)
    assert single_loaded_adapter(unet, None) == "van_gogh"
    with pytest.raises(ACEAdapterNameError, match="No ACE adapter named"):
        single_loaded_adapter(unet, "other")


def test_active_adapters_and_scales(sd_pipe):
    unet = sd_pipe.unet
    attach_adapter(unet, random_adapter(unet, seed=1), "a")
    attach_adapter(unet, random_adapter(unet, seed=2), "b", scale=0.5)
    assert list(loaded_adapters(unet)) == ["a", "b"] and active_adapters(unet) == ["a", "b"]
    set_active_adapters(unet, ["b"], [2.0])
    assert active_adapters(unet) == ["b"] and adapter_scale(unet, "b") == 2.0
    assert all(float(d.active) == 0.0 for d in adapter_deltas(unet, "a"))
    with pytest.raises(ACEValueError, match="one scale per name"):
        set_active_adapters(unet, ["a", "b"], [1.0])
    with pytest.raises(ACEAdapterNameError, match="Unknown ACE adapter"):
        set_active_adapters(unet, ["c"])
    with pytest.raises(ACEAdapterNameError, match="more than one|2 ACE adapters are loaded"):
        single_loaded_adapter(unet, None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e300, "1", True])
def test_unusable_scales_are_refused_before_anything_changes(sd_pipe, bad):
    unet = sd_pipe.unet
    attach_adapter(unet, random_adapter(unet, seed=1), "a")
    attach_adapter(unet, random_adapter(unet, seed=2), "b")
    with pytest.raises(ACEValueError, match="scale"):
        set_active_adapters(unet, ["a", "b"], [0.5, bad])
    assert adapter_scale(unet, "a") == 1.0 and active_adapters(unet) == ["a", "b"]  # all-or-nothing
    with pytest.raises(ACEValueError, match="scale"):
        attach_adapter(unet, random_adapter(unet, seed=3), "c", scale=bad)
    assert list(loaded_adapters(unet)) == ["a", "b"]


def test_numpy_and_tensor_scales_are_numbers(sd_pipe):
    import numpy as np
    import torch

    unet = sd_pipe.unet
    attach_adapter(unet, random_adapter(unet), "a", scale=torch.tensor(0.5))
    assert adapter_scale(unet, "a") == 0.5
    set_active_adapters(unet, "a", np.float32(0.25))
    assert adapter_scale(unet, "a") == 0.25


def _scaled(adapter, key, factor):
    layers = {}
    for name, f in adapter.layers.items():
        tensors = f.tensors()
        tensors[key] = tensors[key] * factor
        layers[name] = LayerFactors(**tensors)
    return ACEAdapter(layers, concepts=adapter.concepts)


@pytest.mark.parametrize(
    "key, factor, message",
    [
        ("k_up", 1e36, "over 100x the projection"),  # finite in float32, absurd: NaN images before
        ("v_down", 1e6, "over 100x the projection"),
        ("gate_weight", 1e30, "gate values"),
        ("gate_bias", float("inf"), "NaN or Inf"),
    ],
)
def test_absurd_factors_are_refused_before_attaching(sd_pipe, key, factor, message):
    unet = sd_pipe.unet
    adapter = random_adapter(unet, gate_bias=1.0) if key == "gate_bias" else random_adapter(unet)
    if key == "gate_bias":
        with pytest.raises(ACEAdapterFormatError, match=message):
            _scaled(adapter, key, factor)
        return
    before = {name: m.processor for name, m in attention_modules(unet).items()}
    with pytest.raises(ACEAdapterFormatError, match=message):
        attach_adapter(unet, _scaled(adapter, key, factor), "bad")
    assert loaded_adapters(unet) == {}
    assert before == {n: m.processor for n, m in attention_modules(unet).items()}


def test_values_beyond_float16_are_caught_after_the_cast(sd_pipe):
    unet = sd_pipe.unet.to(torch.float16)
    adapter = random_adapter(unet)
    big = {}
    for name, f in adapter.layers.items():  # k_up 1e5 overflows float16; k_down 1e-5 keeps B A normal
        t = f.tensors()
        t["k_up"], t["k_down"] = t["k_up"] * 1e5, t["k_down"] * 1e-5
        big[name] = LayerFactors(**t)
    with pytest.raises(ACEAdapterFormatError, match="not finite in torch.float16"):
        attach_adapter(unet, ACEAdapter(big, concepts=["x"]), "big")
    assert loaded_adapters(unet) == {}
    attach_adapter(unet.to(torch.float32), ACEAdapter(big, concepts=["x"]), "fine_in_float32")
