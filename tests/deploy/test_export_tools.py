"""Each tool's published LoRA key rules, copied as data (sources named), applied to our exports.

The rules say which key names a tool maps onto an SD UNet's cross-attention ``to_k``/``to_v``; the tests
check that every tensor of an export is one the tool reads and that it lands on the right module.
"""

import logging
import re

import pytest
import torch

from ace_diffusers.deploy.export import CLI_DEFAULT_FORMAT, TOOL_FORMATS, lora_state_dict, save_lora
from ace_diffusers.errors import ACEValueError
from ace_diffusers.integration.modules import cross_attention_modules
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline

RULES = {
    "comfyui": {
        "source": "comfyanonymous/ComfyUI comfy/lora.py::model_lora_keys_unet @41444b52 "
        "(names from comfy/utils.py::unet_to_diffusers) and comfy/weight_adapter/lora.py @6fd406fb",
        # SD1.x/2.x UNet: "lora_unet_" + diffusers module name with "." -> "_"; the generic
        # "diffusion_model.<LDM name>" form and the diffusers ".processor.to_k" spelling; no plain PEFT name
        "base": lambda module: {"lora_unet_" + module.replace(".", "_")},
        "factors": [
            (".lora_up.weight", ".lora_down.weight"),
            ("_lora.up.weight", "_lora.down.weight"),
            (".lora_B.weight", ".lora_A.weight"),
            (".lora.up.weight", ".lora.down.weight"),
        ],
        "extra": [".alpha"],
    },
    "a1111": {
        "source": "AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py::"
        "convert_diffusers_name_to_compvis @873edba4; keys split at the first '.'",
        "factors": [(".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")],
        "extra": [".alpha", ".scale"],
        "convert": [
            (
                r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)",
                lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}",
            ),
            (
                r"lora_unet_mid_block_attentions_(\d+)_(.+)",
                lambda m: f"diffusion_model_middle_block_1_{m[2]}",
            ),
            (
                r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)",
                lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}",
            ),
        ],
    },
    "kohya": {
        "source": "kohya-ss/sd-scripts networks/lora.py @48d368fa: lora_name = 'lora_unet' + module path, "
        "'.' -> '_'; LoRAModule holds lora_down, lora_up and an alpha buffer",
        "base": lambda module: {"lora_unet_" + module.replace(".", "_")},
        "factors": [(".lora_up.weight", ".lora_down.weight")],
        "extra": [".alpha"],
    },
}


def ldm_name(module: str) -> str:
    """The original-LDM name of an SD UNet module (3 = layers_per_block + 1; kohya model_util, ComfyUI
    unet_to_diffusers): down_blocks.i.attentions.j -> input_blocks.(3i+j+1).1, mid_block.attentions.0 ->
    middle_block.1, up_blocks.i.attentions.j -> output_blocks.(3i+j).1."""
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{m[1]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module)
    return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1.{m[3]}"


@pytest.fixture(scope="module")
def export():
    pipe = tiny_sd_pipeline()  # layers_per_block=2, as SD1.5 (the rules' factor 3)
    modules = [f"{n}.to_{p}" for n in cross_attention_modules(pipe.unet) for p in ("k", "v")]
    adapter = random_adapter(pipe.unet)
    return modules, lora_state_dict(adapter, format=CLI_DEFAULT_FORMAT, mode="ungated")[0]


def split(key, rule):
    for pair in rule["factors"]:
        for suffix in (*pair, *rule["extra"]):
            if key.endswith(suffix):
                return key[: -len(suffix)], suffix
    return None, None


@pytest.mark.parametrize("tool", ["comfyui", "kohya"])
def test_every_key_is_read_by_the_tool_and_every_module_is_covered(export, tool):
    modules, tensors = export
    rule = RULES[tool]
    accepted = {name: module for module in modules for name in rule["base"](module)}
    hit = set()
    for key in tensors:
        base, suffix = split(key, rule)
        assert base in accepted, f"{tool} ({rule['source']}) does not read {key}"
        hit.add(accepted[base])
    assert hit == set(modules)  # all 12 of 12 cross-attention K/V modules


def test_a1111_maps_every_key_onto_the_right_ldm_module(export):
    modules, tensors = export
    rule = RULES["a1111"]
    expected = {"diffusion_model_" + ldm_name(m).replace(".", "_"): m for m in modules}
    hit = set()
    for key in tensors:
        assert "." not in key.partition(".")[0]  # A1111 cuts at the first dot: the module part has none
        base, suffix = split(key, rule)
        assert suffix is not None, key
        converted = next(
            (convert(m) for pattern, convert in rule["convert"] if (m := re.fullmatch(pattern, base))), None
        )
        assert converted in expected, (key, converted)
        hit.add(expected[converted])
    assert hit == set(modules)


def test_tool_names_resolve_to_layouts_and_unknown_tools_are_refused():
    pipe = tiny_sd_pipeline()
    adapter = random_adapter(pipe.unet)
    kohya = lora_state_dict(adapter, format="kohya", mode="ungated")[0]
    for tool in ("comfyui", "a1111"):
        assert lora_state_dict(adapter, format=tool, mode="ungated")[0].keys() == kohya.keys()
    assert all(k.startswith("unet.") for k in lora_state_dict(adapter, format="diffusers", mode="ungated")[0])
    assert set(TOOL_FORMATS) >= {"diffusers", "comfyui", "a1111", "kohya"}
    with pytest.raises(ACEValueError, match="name the tool"):
        lora_state_dict(adapter, format="invokeai", mode="ungated")


def test_the_unet_only_load_call_logs_nothing_about_text_encoder_keys(tmp_path):
    from diffusers.utils import logging as diffusers_logging

    pipe = tiny_sd_pipeline()
    path = save_lora(
        random_adapter(pipe.unet), tmp_path / "ace.safetensors", format="diffusers", mode="ungated"
    )
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = diffusers_logging.get_logger("diffusers")
    logger.addHandler(handler)
    try:
        pipe.unet.load_lora_adapter(str(path), prefix="unet", adapter_name="ace")
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "No LoRA keys" in r.getMessage()]
    assert "ace" in pipe.unet.peft_config
    before = [r for r in records]
    pipe.unet.delete_adapters("ace")
    assert before == records and torch.isfinite(next(pipe.unet.parameters())).all()
