"""Renderer and vocabulary of the miniature world."""

from __future__ import annotations

import numpy as np
import pytest

from ace_diffusers.shapes import render as R
from ace_diffusers.shapes import vocab as V


def test_render_is_deterministic_and_varied():
    a, sa = R.render(np.random.default_rng(123))
    b, sb = R.render(np.random.default_rng(123))
    c, _ = R.render(np.random.default_rng(124))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)
    d1 = R.render_dataset(20, seed=5, captions=2)
    d2 = R.render_dataset(20, seed=5, captions=2)
    assert np.array_equal(d1["images"], d2["images"]) and d1["captions"] == d2["captions"]
    for k in ("shape", "colour", "style"):
        assert np.array_equal(d1[k], d2[k])


@pytest.mark.parametrize("style", ["solid", "striped", "dotted"])
def test_render_labels_are_respected(style):
    rng = np.random.default_rng(0)
    for shape in V.SHAPES:
        for colour in ("red", "blue"):
            img, spec = R.render(rng, shape, colour, style)
            assert (spec.shape, spec.colour, spec.style) == (shape, colour, style)
            # plain background in the corners, the shape's colour somewhere in the middle
            px = img.reshape(-1, 3).astype(int)
            assert (np.abs(px - np.array(R.BACKGROUND)).sum(1) < 10).mean() > 0.2
            target = np.array(R.COLOUR_RGB[colour])
            assert (np.abs(px - target).sum(1) < 60).sum() >= 8


