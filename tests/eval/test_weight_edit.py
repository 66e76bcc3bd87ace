"""The undo handle of an in-place weight edit: bit-exact restore, re-apply, the original model for a while."""

import pytest
import torch
from torch import nn

from ace_diffusers.eval import baselines
from ace_diffusers.eval.weight_edit import WeightEdit


def _edited_linear():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(0.5)
    edit = WeightEdit("test", {"w": layer.weight}, {"w": original}, {"scale": 0.5}, 1.25, {"note": 1})
    return layer, original, edit


def test_restore_and_reapply_are_bit_exact_and_idempotent():
    layer, original, edit = _edited_linear()
    edited = layer.weight.detach().clone()
    assert torch.equal(edit.edited_weights["w"], edited) and edit.applied  # snapshot taken on creation
    edit.restore()
    edit.restore()
    assert torch.equal(layer.weight, original) and not edit.applied
    edit.reapply()
    assert torch.equal(layer.weight, edited) and edit.applied


def test_original_is_temporary_and_keeps_the_previous_state():
    layer, original, edit = _edited_linear()
    edited = layer.weight.detach().clone()
    with edit.original():
        assert torch.equal(layer.weight, original)
    assert torch.equal(layer.weight, edited)
    with pytest.raises(RuntimeError), edit.original():
        raise RuntimeError("inside")
    assert torch.equal(layer.weight, edited)  # put back after an error too
    edit.restore()
    with edit.original():
        pass
    assert torch.equal(layer.weight, original) and not edit.applied  # it was restored before: stays restored


def test_with_block_restores_on_exit():
    layer, original, edit = _edited_linear()
    with edit as handle:
        assert handle is edit and not torch.equal(layer.weight, original)
    assert torch.equal(layer.weight, original)


def test_summary_and_relative_change():
    layer, original, edit = _edited_linear()
    expected = float((layer.weight.detach() - original).norm() / original.norm())
    assert edit.relative_change() == {"w": pytest.approx(expected)}
    info = edit.to_dict()
    assert info == {
        "method": "test",
        "settings": {"scale": 0.5},
        "seconds": 1.25,
        "parameters": 1,
        "mean_relative_change": pytest.approx(expected),
        "stats": {"note": 1},
    }
    assert repr(edit) == "WeightEdit(method='test', parameters=1, seconds=1.25, applied=True)"


def test_still_importable_from_the_baselines():
    assert baselines.WeightEdit is WeightEdit
