"""The training command's pieces: atomic safetensors/JSON checkpoints, the learning-rate schedule."""

import torch

from ace_diffusers.shapes.train import load_ckpt, lr_at, read_json, save_ckpt, save_tensors, write_json


def test_json_and_tensors_round_trip_atomically(tmp_path):
    write_json(tmp_path / "a.json", {"x": (1, 2)})
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    save_tensors(tmp_path / "t.safetensors", {"w": torch.arange(4.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "t.safetensors"]  # no temporary files


def test_checkpoints_keep_models_optimizer_and_meta(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_ckpt(tmp_path / "ck", {"model": model}, opt, {"step": 7})
    tensors, meta = load_ckpt(tmp_path / "ck")
    assert meta["step"] == 7 and torch.equal(tensors["model"]["weight"], model.weight.detach())


def test_the_learning_rate_warms_up_then_decays():
    assert lr_at(0, 1000, 1.0, warmup=10) == 0.1
    assert lr_at(9, 1000, 1.0, warmup=10) == 1.0
    assert abs(lr_at(999, 1000, 1.0, warmup=10) - 0.1) < 1e-3
