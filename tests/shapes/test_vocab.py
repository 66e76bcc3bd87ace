"""The world's vocabulary and captions: blank, one-object and two-object scenes."""

from __future__ import annotations

import numpy as np

from ace_diffusers.shapes import vocab as V


def test_vocabulary_constants():
    assert V.SHAPES == ["circle", "square", "triangle", "star", "heart", "cross", "hexagon", "diamond"]
    assert set(V.SHAPE_WORDS) == set(V.SHAPES) and set(V.STYLE_WORDS) == set(V.STYLES)
    for table in (V.SHAPE_WORDS, V.STYLE_WORDS):
        assert all(words[0] == name and 3 <= len(words) <= 4 for name, words in table.items())
    words = [w for ws in V.SHAPE_WORDS.values() for w in ws] + [
        w for ws in V.STYLE_WORDS.values() for w in ws
    ]
    assert len(words) == len(set(words))  # a synonym names one concept only
    assert V.NONE not in V.SHAPES and V.SLOTS == ("left", "right")


def test_object_captions_name_the_shape_and_sometimes_colour_and_style():
    rng = np.random.default_rng(0)
    caps = [V.object_phrase(rng, "star", "orange", "dotted") for _ in range(1000)]
    assert all(any(w in c for w in V.SHAPE_WORDS["star"]) for c in caps)
    assert any("orange" in c for c in caps) and any("orange" not in c for c in caps)
    assert any(any(w in c for w in V.STYLE_WORDS["dotted"]) for c in caps)
    assert not any("a orange" in c for c in caps) and "" not in caps  # the empty prompt is for blanks
    assert len(set(caps)) > 30


def test_blank_captions_never_name_a_shape():
    rng = np.random.default_rng(1)
    shape_words = {w for ws in V.SHAPE_WORDS.values() for w in ws}
    for tint, pattern in ((None, None), ("red", None), (None, "striped"), ("blue", "dotted")):
        caps = [V.blank_caption(rng, tint, pattern) for _ in range(400)]
        assert not any(w in c.split() for c in caps for w in shape_words)
        assert "" in caps
        if tint:
            assert sum(tint in c for c in caps) > 200
    plain = [V.blank_caption(rng, None, None) for _ in range(400)]
    assert any(c in V.NEUTRAL_PHRASES for c in plain) and any("object" in c for c in plain)


def test_pair_captions_name_the_left_object_first():
    rng = np.random.default_rng(2)
    for _ in range(200):
        cap = V.pair_caption(rng, ("circle", "red", "solid"), ("star", "blue", "striped"))
        left = min(cap.find(w) for w in V.SHAPE_WORDS["circle"] if w in cap)
        right = min(cap.find(w) for w in V.SHAPE_WORDS["star"] if w in cap)
        assert 0 <= left < right


def test_canonical_prompts():
    assert V.canonical_prompt("circle", "orange") == "an orange circle"
    assert V.canonical_prompt("circle", "red", "striped") == "a striped red circle"
    assert V.pair_prompt("a red circle", "an orange star") == "a red circle and an orange star"
    assert V.article_fix("yellow , dotted") == "yellow, dotted"
