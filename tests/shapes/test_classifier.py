"""The bundled miniature-world classifier recognises renders (>= 98 % per head)."""

from __future__ import annotations

import torch

from ace_diffusers.shapes.render import render_dataset
from ace_diffusers.shapes.vocab import COLOURS, SHAPES, STYLES

from .conftest import NEEDS_CLASSIFIER


@NEEDS_CLASSIFIER
def test_classifier_on_fresh_renders(shapes_classifier):
    data = render_dataset(600, seed=987_654)  # a seed never used in training
    x = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255
    pred = shapes_classifier.predict(x)
    assert set(pred) == {"shape", "colour", "style"}
    for key, names in (("shape", SHAPES), ("colour", COLOURS), ("style", STYLES)):
        assert len(pred[key]) == 600
        acc = sum(p == names[i] for p, i in zip(pred[key], data[key], strict=True)) / 600
        assert acc >= 0.98, (key, acc)


@NEEDS_CLASSIFIER
def test_classifier_is_robust_to_mild_noise(shapes_classifier):
    data = render_dataset(300, seed=13_579)
    x = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(0)
    x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    pred = shapes_classifier.predict(x)
    for key, names in (("shape", SHAPES), ("colour", COLOURS)):
        acc = sum(p == names[i] for p, i in zip(pred[key], data[key], strict=True)) / 300
        assert acc >= 0.95, (key, acc)
