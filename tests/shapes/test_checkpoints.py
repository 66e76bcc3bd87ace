"""Training state on disk: atomic safetensors + JSON checkpoints (no pickle) and the lr schedule."""

import torch

from ace_diffusers.shapes.checkpoints import (
    has_ckpt,
    load_ckpt,
    load_optimizer,
    lr_at,
    read_json,
    save_ckpt,
    save_tensors,
    write_json,
)


def test_json_and_tensors_round_trip_atomically(tmp_path):
    write_json(tmp_path / "a.json", {"x": (1, 2)})
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    save_tensors(tmp_path / "t.safetensors", {"w": torch.arange(4.0)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "t.safetensors"]  # no temporary files


def test_checkpoints_restore_models_and_the_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert not has_ckpt(tmp_path / "ck")
    save_ckpt(tmp_path / "ck", {"model": model}, opt, {"step": 7})
    assert has_ckpt(tmp_path / "ck")
    tensors, meta = load_ckpt(tmp_path / "ck")
    assert meta["step"] == 7 and torch.equal(tensors["model"]["weight"], model.weight.detach())
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    load_optimizer(fresh, tensors["opt"], meta["param_groups"])
    assert fresh.param_groups[0]["lr"] == 1e-2
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_the_learning_rate_warms_up_then_decays():
    assert lr_at(0, 1000, 1.0, warmup=10) == 0.1
    assert lr_at(9, 1000, 1.0, warmup=10) == 1.0
    assert abs(lr_at(999, 1000, 1.0, warmup=10) - 0.1) < 1e-3
