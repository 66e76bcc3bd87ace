"""Vocabulary and caption generation of the miniature world.

Every word listed here was used in training captions (see ``docs/miniature_world.md``).  The first
word of each list is the canonical one; the others are synonyms / paraphrases that the UNet saw in
training too.  Colours have a single word each.
"""

from __future__ import annotations

import numpy as np

SHAPES: list[str] = ["circle", "square", "triangle", "star", "heart", "cross", "hexagon", "diamond"]
COLOURS: list[str] = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"]
STYLES: list[str] = ["solid", "striped", "dotted"]

SHAPE_WORDS: dict[str, list[str]] = {
    "circle": ["circle", "disc", "round shape", "ring"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "pyramid shape", "three-sided shape"],
    "star": ["star", "pentagram", "five-pointed star"],
    "heart": ["heart", "love heart", "valentine"],
    "cross": ["cross", "plus sign", "plus"],
    "hexagon": ["hexagon", "six-sided shape", "honeycomb cell"],
    "diamond": ["diamond", "rhombus", "lozenge"],
}

STYLE_WORDS: dict[str, list[str]] = {
    "solid": ["solid", "plain", "filled"],
    "striped": ["striped", "stripy", "banded"],
    "dotted": ["dotted", "polka-dot", "spotted"],
}

COLOUR_WORDS: dict[str, list[str]] = {c: [c] for c in COLOURS}

# Caption templates.  Fields: {colour} {shape} {style}.  A template is only used if every field it
# mentions is "present" for that caption (colour / style may be omitted, see ``make_caption``).
TEMPLATES: list[str] = [
    "a {colour} {shape}",
    "a {style} {colour} {shape}",
    "a picture of a {colour} {shape}",
    "{colour} {shape}, {style}",
    "an image showing a {shape} in {colour}",
    "a {colour} {style} {shape}",
    "a drawing of a {style} {colour} {shape}",
    "a {shape}",
    "a {style} {shape}",
    "a picture of a {shape}",
    "{shape}, {style}",
]

P_EMPTY = 0.10  # empty captions for classifier-free guidance
P_COLOUR = 0.85  # probability that a non-empty caption mentions the colour
P_STYLE = 0.55  # probability that a non-empty caption mentions the style


def _fields(template: str) -> frozenset[str]:
    return frozenset(f for f in ("colour", "shape", "style") if "{" + f + "}" in template)


def article_fix(text: str) -> str:
    """Turn 'a orange' into 'an orange' etc. (cosmetic, deterministic)."""
    words = text.split(" ")
    out = []
    for i, w in enumerate(words):
        if w in ("a", "an") and i + 1 < len(words):
            nxt = words[i + 1]
            w = "an" if nxt[:1] in "aeiou" else "a"
        out.append(w)
    return " ".join(out)


def make_caption(rng: np.random.Generator, shape: str, colour: str, style: str) -> str:
    """One random training caption for an image with these labels ('' with probability P_EMPTY)."""
    if rng.random() < P_EMPTY:
        return ""
    want = {"shape"}
    if rng.random() < P_COLOUR:
        want.add("colour")
    if rng.random() < P_STYLE:
        want.add("style")
    cands = [t for t in TEMPLATES if _fields(t) == frozenset(want)]
    t = cands[int(rng.integers(len(cands)))]
    sw = SHAPE_WORDS[shape][int(rng.integers(len(SHAPE_WORDS[shape])))]
    stw = STYLE_WORDS[style][int(rng.integers(len(STYLE_WORDS[style])))]
    cw = COLOUR_WORDS[colour][int(rng.integers(len(COLOUR_WORDS[colour])))]
    return article_fix(t.format(colour=cw, shape=sw, style=stw))


def canonical_prompt(shape: str, colour: str | None = None, style: str | None = None) -> str:
    """The canonical prompt, e.g. 'a red circle' or 'a striped red circle'."""
    parts = [p for p in (style, colour, shape) if p]
    return article_fix("a " + " ".join(parts))
