"""Miniature-world erasure experiments: prompt sets, the pair set, where the erased concept goes."""

import pytest

from ace_diffusers.shapes.erasure import (
    PAIR_PROMPTS,
    erase_arguments,
    image_counts,
    metric_sets,
    neutral_floor,
    pair_set,
    where_it_goes,
)
from ace_diffusers.shapes.vocab import NONE, SHAPES

from .conftest import NEEDS_CLASSIFIER, NEEDS_WEIGHTS


def test_erasure_is_given_the_canonical_word_only():
    args = erase_arguments("circle")
    assert args["concepts"] == "circle" and args["neutral"] == ""
    assert "circle" not in args["preserve"] and all("disc" not in t for t in args["templates"])


@pytest.mark.parametrize("concept", ["circle", "striped"])
def test_pair_prompts_pair_the_concept_with_a_kept_object(concept):
    pset = pair_set(concept, {concept})
    assert len(pset.prompts) == PAIR_PROMPTS
    for prompt, labels in zip(pset.prompts, pset.labels, strict=True):
        left, right = prompt.split(" and ")
        assert concept in left and concept not in right
        assert labels["right_shape"] in SHAPES and labels["right_shape"] in right
        assert labels["right_colour"] in right and labels["right_style"] in right
    assert {"erased", "synonyms", "others", "pairs"} <= set(metric_sets(concept))
    assert ("heldout" in metric_sets(concept)) == (concept == "circle")  # shapes have held-out words


def test_where_the_erased_concept_goes():
    shapes = ["circle", NONE, "square", NONE]
    assert where_it_goes(shapes, shapes, "circle") == {"erased_as_none": 0.5, "erased_as_other": 0.25}
    styles = ["striped", "solid", "solid", "dotted"]
    assert where_it_goes(shapes, styles, "striped") == {"erased_as_none": 0.5, "erased_as_other": 0.25}


@NEEDS_WEIGHTS
@NEEDS_CLASSIFIER
def test_a_perfect_shape_erasure_draws_nothing(shapes_pipe, shapes_classifier):
    # the anchor prompts ("a red", "a blue" ...) draw an empty canvas, not the erased shape
    for shape in ("hexagon", "circle"):
        assert neutral_floor(shapes_pipe, shapes_classifier, shape, images_per_prompt=1) <= 0.125
    # a perfect style erasure draws plain (solid) fill, never stripes
    assert neutral_floor(shapes_pipe, shapes_classifier, "striped", images_per_prompt=1) <= 0.125


def test_min_images_gives_each_set_just_enough_images():
    from ace_diffusers.shapes.erasure import PromptSet, metric_sets, per_prompt

    sets = metric_sets("circle")
    counts = {name: per_prompt(pset, 4, 32) for name, pset in sets.items()}
    for name, pset in sets.items():
        images = counts[name] * len(pset.prompts)
        assert images >= 32 and (counts[name] == 1 or (counts[name] - 1) * len(pset.prompts) < 32)
    assert per_prompt(sets["others"], 4) == 4  # without min_images: the given count for every set
    assert per_prompt(PromptSet("big", ["a"] * 40, [{}] * 40), 4, 32) == 1


def test_image_counts_are_each_sets_prompts_times_the_images_per_prompt():
    sets = metric_sets("circle", ["circle", "square"])
    counts = image_counts("circle", ["circle", "square"], 4)
    assert counts == {name: 4 * len(ps.prompts) for name, ps in sets.items()}
    assert set(counts) >= {"erased", "synonyms", "others"} and counts["erased"] >= 32
