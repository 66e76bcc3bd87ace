"""Vocabulary and captions of the miniature world (version 2).

Every word listed here was used in training captions (see ``docs/miniature_world.md``). The first word
of each list is the canonical one; the others are synonyms the UNet saw in training too. Colours have a
single word each.

A scene is a 32x64 canvas with two slots (left, right); it holds nothing, one object (in either slot)
or two objects. Captions follow what is drawn:

* **blank scenes** get the empty prompt, a neutral phrase ("nothing", "an empty canvas") or an
  attribute alone ("a red", "something striped", "a red object") and show a plain, tinted or faintly
  patterned empty canvas. The empty prompt is used only for blank scenes, so classifier-free guidance's
  unconditional branch draws nothing, as real Stable Diffusion's rarely shows a given class;
* **one object** gets an object caption ("a striped red circle", "a picture of a disc");
* **two objects** get a pair caption ("a red circle and a blue square"): the first-named object is on
  the left.
"""

from __future__ import annotations

import numpy as np

SHAPES: list[str] = ["circle", "square", "triangle", "star", "heart", "cross", "hexagon", "diamond"]
COLOURS: list[str] = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink"]
STYLES: list[str] = ["solid", "striped", "dotted"]
NONE = "none"  # the classifier's shape label of an empty slot
SLOTS: tuple[str, str] = ("left", "right")

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

# Object templates. Fields: {colour} {shape} {style}; a template is used only when its fields are exactly
# the ones a caption mentions. With {shape} left empty the same templates caption blank scenes ("a red").
TEMPLATES: list[str] = [
    "a {colour} {shape}",
    "a {style} {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "{colour} {shape}, {style}",
    "an image showing a {shape} in {colour}",
    "a {colour} {style} {shape}",
    "a drawing of a {style} {colour} {shape}",
    "a {shape}",
    "a {style} {shape}",
    "a picture of a {shape}",
    "an image of a {shape}",
    "{shape}, {style}",
    "a close-up picture of a {colour} {shape}",
    "a {colour} {shape} in the middle of a room",
    "a painting of a {style} {colour} {shape}",
    "a close-up picture of a {shape}",
    "a {shape} in the middle of a room",
    "a painting of a {shape}",
]

# Two objects: {a} is drawn on the left, {b} on the right; each is an object phrase with its article.
PAIR_TEMPLATES: list[str] = [
    "{a} and {b}",
    "{a} next to {b}",
    "{a} on the left and {b} on the right",
    "a picture of {a} and {b}",
]

# Blank scenes: phrases that mean "no shape", and nouns that stand for no particular shape.
NEUTRAL_PHRASES: list[str] = [
    "nothing",
    "an empty canvas",
    "a blank picture",
    "an empty picture",
    "a blank canvas",
    "empty",
    "a picture of nothing",
]
NEUTRAL_NOUNS: list[str] = ["object", "thing", "something"]

P_COLOUR = 0.85  # probability that an object caption mentions the colour
P_STYLE = 0.7  # probability that an object caption mentions the style
P_BLANK_EMPTY = 0.45  # a plain blank scene's caption is the empty prompt ...
P_BLANK_PHRASE = 0.35  # ... or a neutral phrase; otherwise a neutral noun ("an object")
P_BLANK_ATTRIBUTE_EMPTY = 0.15  # a tinted / patterned one's is the empty prompt, else its attributes
P_BLANK_SOLID = 0.35  # a tinted, unpatterned one's attributes name its plain fill ("a solid red")


def article_fix(text: str) -> str:
    """'a orange' -> 'an orange', double spaces and a dangling comma removed (deterministic)."""
    words = text.replace(" ,", ",").split()
    out = []
    for i, w in enumerate(words):
        if w in ("a", "an") and i + 1 < len(words):
            w = "an" if words[i + 1][:1] in "aeiou" else "a"
        out.append(w)
    return " ".join(out).strip(" ,")


def _fields(template: str) -> frozenset[str]:
    return frozenset(f for f in ("colour", "shape", "style") if "{" + f + "}" in template)


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _template(rng: np.random.Generator, fields: set[str]) -> str:
    return _pick(rng, [t for t in TEMPLATES if _fields(t) == frozenset(fields)])


def object_phrase(rng: np.random.Generator, shape: str, colour: str, style: str) -> str:
    """A random caption of one object, naming its colour / style with probability P_COLOUR / P_STYLE."""
    want = {"shape"}
    if rng.random() < P_COLOUR:
        want.add("colour")
    if rng.random() < P_STYLE:
        want.add("style")
    text = _template(rng, want).format(
        shape=_pick(rng, SHAPE_WORDS[shape]),
        colour=_pick(rng, COLOUR_WORDS[colour]),
        style=_pick(rng, STYLE_WORDS[style]),
    )
    return article_fix(text)


def short_phrase(rng: np.random.Generator, shape: str, colour: str, style: str) -> str:
    """'a [style] [colour] shape' (each attribute optional): the object phrase inside pair captions."""
    words = [_pick(rng, SHAPE_WORDS[shape])]
    if rng.random() < P_COLOUR:
        words.insert(0, colour)
    if rng.random() < P_STYLE:
        words.insert(0, _pick(rng, STYLE_WORDS[style]))
    return article_fix("a " + " ".join(words))


def pair_caption(rng: np.random.Generator, left: tuple[str, str, str], right: tuple[str, str, str]) -> str:
    """A random caption of two objects, each given as (shape, colour, style); ``left`` is named first."""
    template = _pick(rng, PAIR_TEMPLATES)
    return article_fix(template.format(a=short_phrase(rng, *left), b=short_phrase(rng, *right)))


def blank_caption(rng: np.random.Generator, tint: str | None, pattern: str | None) -> str:
    """A random caption of a blank scene with an optional tint colour and fill pattern."""
    if tint is None and pattern is None:
        r = rng.random()
        if r < P_BLANK_EMPTY:
            return ""
        if r < P_BLANK_EMPTY + P_BLANK_PHRASE:
            return _pick(rng, NEUTRAL_PHRASES)
        return article_fix(_template(rng, {"shape"}).format(shape=_pick(rng, NEUTRAL_NOUNS)))
    if rng.random() < P_BLANK_ATTRIBUTE_EMPTY:
        return ""
    fill = pattern or ("solid" if rng.random() < P_BLANK_SOLID else None)
    want = {"shape"} | ({"colour"} if tint else set()) | ({"style"} if fill else set())
    noun = _pick(rng, NEUTRAL_NOUNS) if rng.random() < 0.4 else ""
    text = _template(rng, want).format(
        shape=noun,
        colour=tint or "",
        style=_pick(rng, STYLE_WORDS[fill]) if fill else "",
    )
    return article_fix(text)


def canonical_prompt(shape: str, colour: str | None = None, style: str | None = None) -> str:
    """The canonical prompt, e.g. 'a red circle' or 'a striped red circle'."""
    parts = [p for p in (style, colour, shape) if p]
    return article_fix("a " + " ".join(parts))


def pair_prompt(left: str, right: str) -> str:
    """The canonical two-object prompt: ``left`` and ``right`` are object phrases ('a red circle')."""
    return article_fix(f"{left} and {right}")
