"""Miniature-world erasure measurements that the benchmarks read their figures against."""

from ace_diffusers.shapes.erasure import neutral_floor

from .conftest import NEEDS_CLASSIFIER, NEEDS_WEIGHTS


@NEEDS_WEIGHTS
@NEEDS_CLASSIFIER
def test_neutral_floor_is_what_the_anchor_itself_draws(shapes_pipe, shapes_classifier):
    # the empty anchor "a red" is mostly drawn as a hexagon, hardly ever as a square
    assert neutral_floor(shapes_pipe, shapes_classifier, "hexagon", images_per_prompt=1) >= 0.5
    assert neutral_floor(shapes_pipe, shapes_classifier, "square", images_per_prompt=1) <= 0.125
    # a perfect style erasure draws plain (solid) fill, never stripes
    assert neutral_floor(shapes_pipe, shapes_classifier, "striped", images_per_prompt=1) <= 0.125
