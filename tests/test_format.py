"""The adapter file format: config validation, the tensor naming scheme and the architecture fingerprint."""

import json

import pytest
import torch

from ace_diffusers.errors import ACEAdapterFormatError
from ace_diffusers.format import (
    CONFIG_NAME,
    FORMAT_VERSION,
    MAX_CONFIG_BYTES,
    TENSOR_KEYS,
    fingerprint_of,
    group_layer_tensors,
    read_config,
)


def write(tmp_path, content):
    path = tmp_path / CONFIG_NAME
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_a_valid_config_reads_back(tmp_path):
    config = {"format_version": FORMAT_VERSION, "concepts": ["Van Gogh"], "extra": {"x": 1}}
    assert read_config(write(tmp_path, config)) == config


def test_null_optional_fields_are_fine(tmp_path):
    config = {"format_version": 1, "concepts": ["x"], "fingerprint": None, "extra": None, "rank": 4}
    assert read_config(write(tmp_path, config)) == config


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "JSON object"),
        ({"concepts": ["x"]}, "format_version"),
        ({"format_version": FORMAT_VERSION + 1, "concepts": []}, "Upgrade ace-diffusers"),
        ({"format_version": 1, "concepts": "Van Gogh"}, "list of strings"),
        ({"format_version": True, "concepts": []}, "format_version"),
        ({"format_version": -5, "concepts": []}, "format_version"),
        ({"format_version": 1, "concepts": [], "fingerprint": []}, "'fingerprint' must be a JSON object"),
        ({"format_version": 1, "concepts": [], "extra": "abc"}, "'extra' must be a JSON object"),
        ({"format_version": 1, "concepts": [], "fit": [1, 2]}, "'fit' must be a JSON object"),
        ({"format_version": 1, "concepts": [], "rank": True}, "'rank' must be an integer"),
        ({"format_version": 1, "concepts": [], "neutral": [1]}, "'neutral' must be a list of strings"),
        ({"format_version": 1, "concepts": [], "fingerprint": {"layers": 3}}, "fingerprint.layers"),
        ("[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
    ],
)
def test_bad_configs_say_what_is_wrong(tmp_path, content, message):
    with pytest.raises(ACEAdapterFormatError, match=message):
        read_config(write(tmp_path, content))


def test_missing_and_oversized_configs_are_refused(tmp_path):
    with pytest.raises(ACEAdapterFormatError, match="not an ACE adapter"):
        read_config(tmp_path / CONFIG_NAME)
    path = tmp_path / CONFIG_NAME
    with open(path, "wb") as fh:
        fh.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ACEAdapterFormatError, match="byte limit"):
        read_config(path)


def test_tensors_group_by_layer_and_must_be_complete(tmp_path):
    tensors = {f"b.attn2.{key}": torch.zeros(1) for key in TENSOR_KEYS}
    tensors.update({f"a.attn2.{key}": torch.ones(1) for key in TENSOR_KEYS})
    grouped = group_layer_tensors(tensors, tmp_path)
    assert list(grouped) == ["a.attn2", "b.attn2"] and set(grouped["a.attn2"]) == set(TENSOR_KEYS)
    with pytest.raises(ACEAdapterFormatError, match="missing tensors"):
        group_layer_tensors({"a.attn2.k_down": torch.zeros(1)}, tmp_path)
    with pytest.raises(ACEAdapterFormatError, match="unexpected tensor"):
        group_layer_tensors({"a.attn2.evil": torch.zeros(1)}, tmp_path)


def test_fingerprint_depends_on_shapes_not_order():
    one = fingerprint_of({"b": (8, 4, 4), "a": (8, 4, 4)})
    assert one == fingerprint_of({"a": (8, 4, 4), "b": (8, 4, 4)})
    assert one["hash"] != fingerprint_of({"a": (8, 4, 4), "b": (8, 4, 8)})["hash"]
    assert list(one["layers"]) == ["a", "b"] and len(one["hash"]) == 16
