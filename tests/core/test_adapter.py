import json

import pytest
import torch
from safetensors.torch import save_file

from ace_diffusers.core.adapter import CONFIG_NAME, WEIGHTS_NAME, ACEAdapter
from ace_diffusers.errors import ACEAdapterFormatError, ACEArchitectureMismatchError
from ace_diffusers.format import FORMAT_VERSION
from ace_diffusers.integration.modules import layer_shapes
from ace_diffusers.testing import random_adapter, tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def unet():
    return tiny_sd_pipeline().unet


@pytest.fixture
def adapter(unet):
    return random_adapter(unet, rank=3, seed=1, concepts=("cat", "dog"))


def test_save_load_round_trip_is_exact(adapter, tmp_path):
    adapter.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = ACEAdapter.from_pretrained(tmp_path / "a")
    assert loaded.config == adapter.config
    assert loaded.state_dict().keys() == adapter.state_dict().keys()
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_config_records_metadata_and_fingerprint(adapter, unet):
    config = adapter.config
    assert config["format_version"] == 1  # no pooled edit: the format every release reads
    assert config["concepts"] == ["cat", "dog"] and config["rank"] == 3
    assert config["fingerprint"]["layers"] == {k: list(v) for k, v in sorted(layer_shapes(unet).items())}
    json.dumps(config)  # serialisable


def test_saving_over_an_adapter_replaces_it_and_keeps_other_files(adapter, unet, tmp_path):
    target = tmp_path / "a"
    adapter.save_pretrained(target)
    (target / "README.md").write_text("card")
    other = random_adapter(unet, rank=2, seed=5, concepts=("bird",))
    other.save_pretrained(target)
    assert ACEAdapter.from_pretrained(target).concepts == ["bird"]
    assert (target / "README.md").read_text() == "card"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no staging or backup folders left behind


def test_to_converts_dtype(adapter):
    half = adapter.to(torch.float16)
    assert all(t.dtype == torch.float16 for t in half.state_dict().values())
    assert adapter.state_dict()[next(iter(adapter.state_dict()))].dtype == torch.float32


def test_architecture_mismatch_names_first_layer(adapter):
    sdxl_shapes = layer_shapes(tiny_sdxl_pipeline().unet)
    with pytest.raises(ACEArchitectureMismatchError, match="different"):
        adapter.check_compatible(sdxl_shapes)
    shapes = {k: tuple(v) for k, v in adapter.fingerprint["layers"].items()}
    first = sorted(shapes)[0]
    shapes[first] = (shapes[first][0] + 1, *shapes[first][1:])
    with pytest.raises(ACEArchitectureMismatchError, match=f"Layer '{first}'"):
        adapter.check_compatible(shapes)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / CONFIG_NAME).unlink(), "not an ACE adapter"),
        (lambda d: (d / WEIGHTS_NAME).unlink(), "incomplete"),
        (lambda d: (d / CONFIG_NAME).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), "JSON object"),
        (lambda d: _edit_config(d, format_version=FORMAT_VERSION + 1), "Upgrade ace-diffusers"),
        (lambda d: _edit_config(d, concepts="cat"), "list of strings"),
        (
            lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:100]),
            "truncated or corrupted",
        ),
        (lambda d: _edit_tensors(d, nan=True), "NaN or Inf"),
        (lambda d: _edit_tensors(d, extra=True), "unexpected tensor"),
        (lambda d: _edit_tensors(d, drop=True), "missing tensors"),
    ],
)
def test_broken_folders_raise_format_errors(adapter, tmp_path, corrupt, message):
    adapter.save_pretrained(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(ACEAdapterFormatError, match=message):
        ACEAdapter.from_pretrained(tmp_path)


def _flip_data_bytes(folder):
    """Change tensor bytes, keep the safetensors header intact (a bit flip on disk, or tampering)."""
    raw = bytearray((folder / WEIGHTS_NAME).read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header + 5] ^= 0x01
    (folder / WEIGHTS_NAME).write_bytes(bytes(raw))


def test_altered_weight_bytes_fail_the_checksum(adapter, tmp_path):
    adapter.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert len(config["weights_sha256"]) == 64
    ACEAdapter.from_pretrained(tmp_path)  # intact: loads
    _flip_data_bytes(tmp_path)
    with pytest.raises(ACEAdapterFormatError, match="checksum"):
        ACEAdapter.from_pretrained(tmp_path)


def test_configs_without_a_checksum_still_load(adapter, tmp_path):
    adapter.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["weights_sha256"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    assert ACEAdapter.from_pretrained(tmp_path).state_dict().keys() == adapter.state_dict().keys()


def _edit_config(folder, **changes):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _edit_tensors(folder, nan=False, extra=False, drop=False):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / WEIGHTS_NAME))
    first = sorted(tensors)[0]
    if nan:
        tensors[first] = tensors[first].clone()
        tensors[first].view(-1)[0] = float("nan")
    if extra:
        tensors["something.else"] = torch.zeros(1)
    if drop:
        del tensors[first]
    save_file(tensors, str(folder / WEIGHTS_NAME))


@pytest.mark.parametrize("subfolder", ["../outside", "a/../../outside", "/etc", "C:/temp"])
def test_a_subfolder_may_not_leave_the_adapter_folder(adapter, tmp_path, subfolder):
    from ace_diffusers.errors import ACEValueError

    adapter.save_pretrained(tmp_path / "outside")  # a real adapter the traversal would reach
    (tmp_path / "repo").mkdir()
    with pytest.raises(ACEValueError, match="subfolder"):
        ACEAdapter.from_pretrained(tmp_path / "repo", subfolder=subfolder)


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME])
@pytest.mark.parametrize(
    "target, expected",
    [("/dev/zero", "a device, pipe or socket"), ("folder", "a folder"), ("missing", "a broken link")],
)
def test_an_adapter_file_that_is_no_regular_file_says_what_it_is(adapter, tmp_path, name, target, expected):
    adapter.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / name
    path.unlink()
    if target == "folder":
        (tmp_path / "elsewhere").mkdir()
        target = tmp_path / "elsewhere"
    elif target == "missing":
        target = tmp_path / "gone"
    path.symlink_to(target)
    with pytest.raises(ACEAdapterFormatError, match=f"is {expected}.*not a regular file"):
        ACEAdapter.from_pretrained(tmp_path / "a")
