"""The world's vocabulary and caption generation."""

from __future__ import annotations

import numpy as np

from ace_diffusers.shapes import vocab as V


def test_vocabulary_constants():
    assert len(V.SHAPES) >= 8 and len(V.COLOURS) >= 8 and len(V.STYLES) >= 3
    for want in ["circle", "square", "triangle", "star", "heart", "cross", "hexagon", "diamond"]:
        assert want in V.SHAPES
    assert set(V.SHAPE_WORDS) == set(V.SHAPES)
    assert set(V.STYLE_WORDS) == set(V.STYLES)
    for s in V.SHAPES:
        assert V.SHAPE_WORDS[s][0] == s and 3 <= len(V.SHAPE_WORDS[s]) <= 4
    for s in V.STYLES:
        assert V.STYLE_WORDS[s][0] == s and 3 <= len(V.STYLE_WORDS[s]) <= 4
    # synonyms are unique across concepts
    words = [w for ws in V.SHAPE_WORDS.values() for w in ws] + [
        w for ws in V.STYLE_WORDS.values() for w in ws
    ]
    assert len(words) == len(set(words))


def test_captions():
    rng = np.random.default_rng(0)
    caps = [V.make_caption(rng, "star", "orange", "dotted") for _ in range(2000)]
    empty = sum(c == "" for c in caps) / len(caps)
    assert 0.07 < empty < 0.13
    nonempty = [c for c in caps if c]
    assert all(any(w in c for w in V.SHAPE_WORDS["star"]) for c in nonempty)
    assert any("orange" in c for c in nonempty) and any("orange" not in c for c in nonempty)
    assert any(any(w in c for w in V.STYLE_WORDS["dotted"]) for c in nonempty)
    assert not any(" a orange" in c or c.startswith("a orange") for c in caps)
    assert len(set(nonempty)) > 30
    assert V.canonical_prompt("circle", "orange") == "an orange circle"
    assert V.canonical_prompt("circle", "red", "striped") == "a striped red circle"
