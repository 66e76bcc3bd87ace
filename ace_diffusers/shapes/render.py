"""Procedural renderer of the miniature world: 32x32 RGB images of coloured, styled shapes.

Shapes are drawn at 4x resolution with PIL and downsampled with an antialiasing filter.  Everything
is deterministic given a ``numpy.random.Generator`` (or an integer seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .vocab import COLOURS, SHAPES, STYLES, make_caption

SIZE = 32
SCALE = 4
BACKGROUND = (240, 240, 240)
PATTERN = (255, 255, 255)

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
    shape: str
    colour: str
    style: str
    cx: float  # centre, in 32-px units
    cy: float
    radius: float  # in 32-px units
    angle: float  # degrees
    phase: float  # pattern phase in [0,1)
    rgb: tuple[int, int, int]


def sample_spec(
    rng: np.random.Generator, shape: str | None = None, colour: str | None = None, style: str | None = None
) -> RenderSpec:
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colour or COLOURS[int(rng.integers(len(COLOURS)))]
    style = style or STYLES[int(rng.integers(len(STYLES)))]
    radius = float(rng.uniform(9.0, 14.0))
    lo, hi = radius + 1.0, SIZE - radius - 1.0
    cx = float(rng.uniform(lo, hi)) if hi > lo else SIZE / 2
    cy = float(rng.uniform(lo, hi)) if hi > lo else SIZE / 2
    angle = float(rng.uniform(-15.0, 15.0))
    phase = float(rng.random())
    jitter = rng.integers(-12, 13, size=3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOUR_RGB[colour], jitter, strict=True))
    return RenderSpec(shape, colour, style, cx, cy, radius, angle, phase, rgb)


def render_spec(spec: RenderSpec) -> np.ndarray:
    """Render one spec to a uint8 array (32, 32, 3)."""
    S = SIZE * SCALE
    th = math.radians(spec.angle)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    pts = _unit_polygon(spec.shape) @ rot.T * (spec.radius * SCALE) + np.array([spec.cx, spec.cy]) * SCALE
    poly = [tuple(map(float, p)) for p in pts]

    mask = Image.new("L", (S, S), 0)
    ImageDraw.Draw(mask).polygon(poly, fill=255)

    fill = np.empty((S, S, 3), np.uint8)
    fill[:] = spec.rgb
    if spec.style != "solid":
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        # pattern coordinates rotate with the shape
        u = (xx - spec.cx * SCALE) * math.cos(th) + (yy - spec.cy * SCALE) * math.sin(th)
        v = -(xx - spec.cx * SCALE) * math.sin(th) + (yy - spec.cy * SCALE) * math.cos(th)
        if spec.style == "striped":
            period = 4.0 * SCALE
            pat = ((v / period + spec.phase) % 1.0) < 0.45
        elif spec.style == "dotted":
            period = 4.5 * SCALE
            fu = (u / period + spec.phase) % 1.0 - 0.5
            fv = (v / period + spec.phase) % 1.0 - 0.5
            pat = (fu * fu + fv * fv) < 0.27**2
        else:
            raise ValueError(f"unknown style {spec.style!r}")
        fill[pat] = PATTERN

    img = Image.new("RGB", (S, S), BACKGROUND)
    img.paste(Image.fromarray(fill), (0, 0), mask)
    ImageDraw.Draw(img).polygon(poly, outline=spec.rgb, width=SCALE)
    img = img.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def render(
    rng: np.random.Generator | int,
    shape: str | None = None,
    colour: str | None = None,
    style: str | None = None,
) -> tuple[np.ndarray, RenderSpec]:
    """Render one random image (optionally with fixed labels).  Returns (uint8 HxWx3, spec)."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    spec = sample_spec(rng, shape, colour, style)
    return render_spec(spec), spec


def render_dataset(n: int, seed: int, captions: int = 0) -> dict:
    """Render ``n`` images with uniformly random labels.

    Returns dict with ``images`` uint8 (n,32,32,3), integer label arrays ``shape``/``colour``/``style``
    and, if ``captions > 0``, ``captions``: a list of ``n`` lists of ``captions`` random captions.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels = {k: np.empty(n, np.int64) for k in ("shape", "colour", "style")}
    caps: list[list[str]] = []
    for i in range(n):
        img, spec = render(rng)
        images[i] = img
        labels["shape"][i] = SHAPES.index(spec.shape)
        labels["colour"][i] = COLOURS.index(spec.colour)
        labels["style"][i] = STYLES.index(spec.style)
        if captions:
            caps.append([make_caption(rng, spec.shape, spec.colour, spec.style) for _ in range(captions)])
    out = {"images": images, **labels}
    if captions:
        out["captions"] = caps
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
