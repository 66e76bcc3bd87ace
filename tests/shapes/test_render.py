"""The renderer: deterministic 32x64 scenes whose labels say what each slot shows."""

from __future__ import annotations

import numpy as np
import pytest

from ace_diffusers.shapes import render as R
from ace_diffusers.shapes import vocab as V


def test_scenes_are_deterministic_and_varied():
    a, sa = R.render(np.random.default_rng(123))
    b, sb = R.render(np.random.default_rng(123))
    c, _ = R.render(np.random.default_rng(124))
    assert a.shape == (R.HEIGHT, R.WIDTH, 3) == (32, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb and not np.array_equal(a, c)
    d1, d2 = R.render_dataset(30, seed=5, captions=2), R.render_dataset(30, seed=5, captions=2)
    assert np.array_equal(d1["images"], d2["images"]) and d1["captions"] == d2["captions"]
    assert all(np.array_equal(d1[k], d2[k]) for k in R.LABEL_KEYS)


@pytest.mark.parametrize("slot", V.SLOTS)
def test_an_object_is_drawn_in_its_slot_only(slot):
    rng = np.random.default_rng(0)
    for shape in V.SHAPES:
        img, scene = R.render(rng, shape, "red", "solid", slot=slot)
        assert scene.slot(slot).shape == shape and scene.slot("right" if slot == "left" else "left") is None
        halves = {"left": img[:, : R.SIZE].astype(int), "right": img[:, R.SIZE :].astype(int)}
        red = {k: (np.abs(v - np.array(R.COLOUR_RGB["red"])).sum(-1) < 60).sum() for k, v in halves.items()}
        assert red[slot] >= 40 and red["right" if slot == "left" else "left"] == 0


def test_blank_scenes_show_their_tint_and_no_object():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = R.sample_scene(rng, "blank")
        assert scene.objects == [] and R.slot_labels(scene)["left_shape"] == len(V.SHAPES)
        img = R.render_scene(scene).astype(int)
        assert img.std(axis=(0, 1)).max() < 40  # flat: no shape
        if scene.tint:
            grey = np.full(3, scene.background)
            assert np.abs(img.mean(axis=(0, 1)) - grey).sum() > 10


def test_datasets_mix_blank_single_and_pair_scenes():
    data = R.render_dataset(400, seed=7, captions=1)
    drawn = (data["left_shape"] < len(V.SHAPES)).astype(int) + (data["right_shape"] < len(V.SHAPES))
    shares = np.bincount(drawn, minlength=3) / 400
    for k, kind in enumerate(("blank", "single", "pair")):
        assert abs(shares[k] - R.P_SCENE[kind]) < 0.08
    assert all(cap == [""] or cap[0] for cap in data["captions"])
    crops = R.slot_crops(data)
    assert (
        crops["images"].shape == (800, 32, 32, 3)
        and (crops["colour"] == -1).sum() == (crops["shape"] == 8).sum()
    )
