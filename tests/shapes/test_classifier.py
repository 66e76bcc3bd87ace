"""The slot classifier: per-slot labels with ``none``, and the image's main object."""

from __future__ import annotations

import numpy as np
import torch

from ace_diffusers.shapes.classifier import HEADS, SLOT_KEYS, ShapesClassifier
from ace_diffusers.shapes.render import render_dataset, slot_crops
from ace_diffusers.shapes.vocab import COLOURS, NONE, SHAPES, STYLES

from .conftest import NEEDS_CLASSIFIER


def _float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def test_predictions_name_every_slot_and_the_main_object():
    model = ShapesClassifier(width=8)
    pred = model.predict(torch.rand(3, 3, 32, 64))
    assert set(pred) == set(HEADS) | set(SLOT_KEYS)
    assert all(len(v) == 3 for v in pred.values()) and HEADS["shape"][-1] == NONE
    for i in range(3):  # the main object is one of the two slots
        assert pred["shape"][i] in (pred["left_shape"][i], pred["right_shape"][i])
    assert model.predict(torch.rand(0, 3, 32, 64))["shape"] == []
    assert set(model.predict(torch.rand(2, 3, 32, 32))) >= {"shape", "left_shape"}  # one slot alone


@NEEDS_CLASSIFIER
def test_the_bundled_classifier_reads_fresh_scenes(shapes_classifier):
    data = render_dataset(500, seed=987_654)  # a seed never used in training
    crops = slot_crops(data)
    pred = shapes_classifier.predict_indices(_float(crops["images"]))
    assert (pred["shape"].numpy() == crops["shape"]).mean() >= 0.98
    drawn = crops["colour"] >= 0
    for head, names in (("colour", COLOURS), ("style", STYLES)):
        assert len(names) == len(HEADS[head])
        assert (pred[head].numpy()[drawn] == crops[head][drawn]).mean() >= 0.97, head


@NEEDS_CLASSIFIER
def test_single_objects_are_found_in_either_slot_and_blanks_are_none(shapes_classifier):
    data = render_dataset(300, seed=24_680, kind="single")
    pred = shapes_classifier.predict(_float(data["images"]))
    truth = np.minimum(data["left_shape"], data["right_shape"])
    assert np.mean([p == SHAPES[t] for p, t in zip(pred["shape"], truth, strict=True)]) >= 0.97
    blank = shapes_classifier.predict(_float(render_dataset(100, seed=13_579, kind="blank")["images"]))
    assert np.mean([p == NONE for p in blank["shape"]]) >= 0.98
