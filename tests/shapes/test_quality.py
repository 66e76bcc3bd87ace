"""The quality command's prompt sets and its table."""

from ace_diffusers.shapes import quality as Q
from ace_diffusers.shapes.vocab import COLOURS, SHAPES


def test_prompt_sets_cover_every_shape_and_colour_with_labels():
    sets = Q.prompt_sets()
    canonical = sets["canonical"]
    assert len(canonical) == len(SHAPES) * len(COLOURS)
    assert {labels["shape"] for _, labels in canonical} == set(SHAPES)
    assert all(prompt and labels for items in sets.values() for prompt, labels in items)
