"""The quality command: its cells rest on enough images and carry the issue's bars."""

import pytest

from ace_diffusers.shapes import quality as Q
from ace_diffusers.shapes.vocab import COLOURS, SHAPE_WORDS, SHAPES, STYLES

from .conftest import NEEDS_CLASSIFIER, NEEDS_WEIGHTS


def test_every_cell_rests_on_enough_images():
    cells = Q.quality_cells()
    for cell in cells:
        want = Q.NEUTRAL_IMAGES if cell.group == "neutral" else Q.CELL_IMAGES
        assert Q.images_per_prompt(cell) * len(cell.items) >= want >= 32
    names = {(c.group, c.name) for c in cells}
    assert {("shape", s) for s in SHAPES} <= names and {("colour", c) for c in COLOURS} <= names
    assert {("style", s) for s in STYLES} <= names
    assert {("synonym", w) for s in SHAPES for w in SHAPE_WORDS[s][1:]} <= names
    assert {("pair", "left shape"), ("pair", "right shape")} <= names


def test_neutral_cells_are_the_anchor_prompts_the_fitter_writes():
    prompts = Q.neutral_prompts()
    assert prompts[0] == "" and "a red" in prompts and "a photo of a object" in prompts
    assert not any(s in p for p in prompts for s in SHAPES)


def test_bars_are_the_issue_bars():
    assert Q.BARS == {
        "neutral": 0.90,
        "shape": 0.95,
        "synonym": 0.85,
        "colour": 0.90,
        "style": 0.85,
        "pair": 0.85,
    }


@pytest.mark.slow
@NEEDS_WEIGHTS
@NEEDS_CLASSIFIER
def test_a_short_generation_is_judged_right(shapes_pipe, shapes_classifier):
    cells = [c for c in Q.quality_cells() if (c.group, c.name) in {("neutral", "''"), ("shape", "circle")}]
    for cell in cells:
        cell.items = cell.items[:2]
    Q.evaluate(shapes_pipe, shapes_classifier, cells)
    assert all(c.n >= 32 for c in cells)
    assert all(c.accuracy >= 0.8 for c in cells), [(c.name, c.accuracy) for c in cells]
