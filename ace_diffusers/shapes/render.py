"""Procedural renderer of the miniature world (version 2): 32x64 scenes with up to two objects.

A scene has two 32x32 slots, left and right. Each slot is empty or holds one coloured, styled shape;
the background is light grey with a little brightness variety, and a blank scene may be tinted with a
colour or faintly patterned (what "a red" or "something striped" draws). Shapes are drawn at 4x
resolution with PIL and downsampled with an antialiasing filter. Everything is deterministic given a
``numpy.random.Generator`` (or an integer seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .vocab import COLOURS, SHAPES, SLOTS, STYLES, blank_caption, object_phrase, pair_caption

SIZE = 32  # one slot; the canvas is SIZE x 2*SIZE
HEIGHT, WIDTH = SIZE, 2 * SIZE
SCALE = 4
BACKGROUND = (240, 240, 240)
PATTERN = (255, 255, 255)
TINT_ALPHA = 0.22  # how strongly a blank scene's colour tints the canvas
BLANK_PATTERN_ALPHA = 0.35  # contrast of a blank scene's faint stripes / dots
# Pattern periods in slot pixels: at least 1.5 latent pixels (the VAE downsamples 4x), so the UNet can
# draw them (a 4-pixel period, one latent pixel, left stripes and dots to chance in world v2.0).
STRIPE_PERIOD = 6.0
DOT_PERIOD = 6.5
P_SCENE = {"blank": 0.2, "single": 0.45, "pair": 0.35}  # what a random training scene holds

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (30, 160, 45),
    "blue": (30, 60, 220),
    "yellow": (240, 205, 10),
    "purple": (125, 35, 185),
    "orange": (245, 125, 15),
    "cyan": (15, 190, 200),
    "pink": (250, 105, 185),
}


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (K,2) of the shape in unit coordinates (fits in the unit disc, y down)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        a = 0.78
        return np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
    if shape == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        p = np.stack([np.cos(t), np.sin(t)], 1)
        return p + np.array([0, 0.12])
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1) + np.array([0, 0.06])
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 120, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        p = np.stack([x, y], 1) / 17.0
        return p + np.array([0, 0.05])
    if shape == "cross":
        a, b = 0.3, 0.92
        return np.array(
            [
                [-a, -b],
                [a, -b],
                [a, -a],
                [b, -a],
                [b, a],
                [a, a],
                [a, b],
                [-a, b],
                [-a, a],
                [-b, a],
                [-b, -a],
                [-a, -a],
            ]
        )
    if shape == "hexagon":
        t = np.arange(6) * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1) * 0.95
    if shape == "diamond":
        return np.array([[0, -1.0], [0.62, 0], [0, 1.0], [-0.62, 0]])
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class RenderSpec:
    """One object in one slot: centre / radius in slot pixels, rotation in degrees, pattern phase."""

    shape: str
    colour: str
    style: str
    cx: float
    cy: float
    radius: float
    angle: float
    phase: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class SceneSpec:
    """A scene: one object (or None) per slot, the background grey level, and a blank scene's tint."""

    left: RenderSpec | None
    right: RenderSpec | None
    background: int = 240
    tint: str | None = None
    pattern: str | None = None

    @property
    def objects(self) -> list[RenderSpec]:
        return [o for o in (self.left, self.right) if o is not None]

    def slot(self, name: str) -> RenderSpec | None:
        return self.left if name == "left" else self.right


def sample_spec(
    rng: np.random.Generator, shape: str | None = None, colour: str | None = None, style: str | None = None
) -> RenderSpec:
    """A random object filling most of one 32x32 slot (labels fixed where given)."""
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colour or COLOURS[int(rng.integers(len(COLOURS)))]
    style = style or STYLES[int(rng.integers(len(STYLES)))]
    radius = float(rng.uniform(9.0, 13.5))
    lo, hi = radius + 1.0, SIZE - radius - 1.0
    cx = float(rng.uniform(lo, hi)) if hi > lo else SIZE / 2
    cy = float(rng.uniform(lo, hi)) if hi > lo else SIZE / 2
    angle = float(rng.uniform(-15.0, 15.0))
    phase = float(rng.random())
    jitter = rng.integers(-12, 13, size=3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOUR_RGB[colour], jitter, strict=True))
    return RenderSpec(shape, colour, style, cx, cy, radius, angle, phase, rgb)


def sample_scene(rng: np.random.Generator, kind: str | None = None) -> SceneSpec:
    """A random scene of ``kind`` 'blank', 'single' (either slot) or 'pair' (random by P_SCENE)."""
    if kind is None:
        kind = list(P_SCENE)[int(rng.choice(len(P_SCENE), p=list(P_SCENE.values())))]
    background = int(rng.integers(232, 249))
    if kind == "blank":
        tint = COLOURS[int(rng.integers(len(COLOURS)))] if rng.random() < 0.5 else None
        pattern = ["striped", "dotted"][int(rng.integers(2))] if rng.random() < 0.3 else None
        return SceneSpec(None, None, background, tint, pattern)
    if kind == "single":
        obj = sample_spec(rng)
        return SceneSpec(obj, None, background) if rng.random() < 0.5 else SceneSpec(None, obj, background)
    if kind == "pair":
        return SceneSpec(sample_spec(rng), sample_spec(rng), background)
    raise ValueError(f"unknown scene kind {kind!r}; use 'blank', 'single' or 'pair'")


def scene_caption(rng: np.random.Generator, scene: SceneSpec) -> str:
    """A random training caption of what ``scene`` shows (see :mod:`ace_diffusers.shapes.vocab`)."""
    objects = scene.objects
    if not objects:
        return blank_caption(rng, scene.tint, scene.pattern)
    if len(objects) == 1:
        return object_phrase(rng, objects[0].shape, objects[0].colour, objects[0].style)
    return pair_caption(rng, *[(o.shape, o.colour, o.style) for o in objects])


def _pattern_mask(style: str, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray:
    if style == "striped":
        return ((v / (STRIPE_PERIOD * SCALE) + phase) % 1.0) < 0.5
    if style == "dotted":
        period = DOT_PERIOD * SCALE
        fu = (u / period + phase) % 1.0 - 0.5
        fv = (v / period + phase) % 1.0 - 0.5
        return (fu * fu + fv * fv) < 0.3**2
    raise ValueError(f"unknown style {style!r}")


def _draw_object(img: Image.Image, spec: RenderSpec, x0: int) -> None:
    """Draw ``spec`` onto the 4x canvas ``img`` in the slot starting at column ``x0`` (slot pixels)."""
    S = SIZE * SCALE
    th = math.radians(spec.angle)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    centre = np.array([spec.cx, spec.cy]) * SCALE
    pts = _unit_polygon(spec.shape) @ rot.T * (spec.radius * SCALE) + centre
    poly = [tuple(map(float, p)) for p in pts]
    mask = Image.new("L", (S, S), 0)
    ImageDraw.Draw(mask).polygon(poly, fill=255)
    fill = np.empty((S, S, 3), np.uint8)
    fill[:] = spec.rgb
    if spec.style != "solid":
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        u = (xx - centre[0]) * math.cos(th) + (yy - centre[1]) * math.sin(th)
        v = -(xx - centre[0]) * math.sin(th) + (yy - centre[1]) * math.cos(th)
        fill[_pattern_mask(spec.style, u, v, spec.phase)] = PATTERN
    img.paste(Image.fromarray(fill), (x0 * SCALE, 0), mask)
    ImageDraw.Draw(img).polygon([(x + x0 * SCALE, y) for x, y in poly], outline=spec.rgb, width=SCALE)


def _canvas(scene: SceneSpec) -> np.ndarray:
    """The 4x background of ``scene``: grey, tinted by its colour, faintly patterned by its style."""
    h, w = HEIGHT * SCALE, WIDTH * SCALE
    canvas = np.full((h, w, 3), float(scene.background), np.float32)
    if scene.tint:
        canvas = (1 - TINT_ALPHA) * canvas + TINT_ALPHA * np.array(COLOUR_RGB[scene.tint], np.float32)
    if scene.pattern:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        mark = _pattern_mask(scene.pattern, xx, yy, 0.0)
        canvas[mark] = (1 - BLANK_PATTERN_ALPHA) * canvas[mark] + BLANK_PATTERN_ALPHA * 180.0
    return canvas.round().clip(0, 255).astype(np.uint8)


def render_scene(scene: SceneSpec) -> np.ndarray:
    """Render a scene to a uint8 array (32, 64, 3)."""
    img = Image.fromarray(_canvas(scene))
    for x0, obj in ((0, scene.left), (SIZE, scene.right)):
        if obj is not None:
            _draw_object(img, obj, x0)
    img = img.resize((WIDTH, HEIGHT), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def render(
    rng: np.random.Generator | int,
    shape: str | None = None,
    colour: str | None = None,
    style: str | None = None,
    slot: str = "left",
) -> tuple[np.ndarray, SceneSpec]:
    """One object (random where not given) in ``slot``, the other slot empty: (uint8 32x64x3, scene)."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    obj = sample_spec(rng, shape, colour, style)
    scene = SceneSpec(obj, None) if slot == "left" else SceneSpec(None, obj)
    return render_scene(scene), scene


def slot_labels(scene: SceneSpec) -> dict[str, int]:
    """Integer labels per slot: ``left_shape`` (``len(SHAPES)`` = none), ``left_colour``, ... (-1 = none)."""
    out = {}
    for name in SLOTS:
        obj = scene.slot(name)
        out[f"{name}_shape"] = SHAPES.index(obj.shape) if obj else len(SHAPES)
        out[f"{name}_colour"] = COLOURS.index(obj.colour) if obj else -1
        out[f"{name}_style"] = STYLES.index(obj.style) if obj else -1
    return out


LABEL_KEYS = [f"{slot}_{head}" for slot in SLOTS for head in ("shape", "colour", "style")]


def render_dataset(n: int, seed: int, captions: int = 0, kind: str | None = None) -> dict:
    """Render ``n`` random scenes.

    Returns ``images`` uint8 (n, 32, 64, 3), integer label arrays named by ``LABEL_KEYS`` (shape index
    ``len(SHAPES)`` and colour/style -1 mark an empty slot) and, if ``captions > 0``, ``captions``: a
    list of ``n`` lists of ``captions`` random captions.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, HEIGHT, WIDTH, 3), np.uint8)
    labels = {k: np.empty(n, np.int64) for k in LABEL_KEYS}
    caps: list[list[str]] = []
    for i in range(n):
        scene = sample_scene(rng, kind)
        images[i] = render_scene(scene)
        for k, v in slot_labels(scene).items():
            labels[k][i] = v
        if captions:
            caps.append([scene_caption(rng, scene) for _ in range(captions)])
    out = {"images": images, **labels}
    if captions:
        out["captions"] = caps
    return out


def slot_crops(data: dict) -> dict:
    """Both 32x32 slots of every scene as separate images with ``shape``/``colour``/``style`` labels."""
    images = data["images"]
    out = {"images": np.concatenate([images[:, :, :SIZE], images[:, :, SIZE:]])}
    for head in ("shape", "colour", "style"):
        out[head] = np.concatenate([data[f"{slot}_{head}"] for slot in SLOTS])
    return out


def save_grid(images: np.ndarray, path: str, ncol: int = 16, upscale: int = 3) -> None:
    """Save uint8 (N,H,W,3) images as a PNG grid (for eyeballing)."""
    n = len(images)
    nrow = (n + ncol - 1) // ncol
    h, w = images.shape[1:3]
    grid = np.full((nrow * (h + 2), ncol * (w + 2), 3), 128, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = im
    Image.fromarray(grid).resize(
        (grid.shape[1] * upscale, grid.shape[0] * upscale), Image.Resampling.NEAREST
    ).save(path)
