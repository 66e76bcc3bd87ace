"""The quality command's Markdown: the bar table and the training summary in ``docs/miniature_world.md``.

Both blocks sit between HTML comment markers and are rewritten by the commands that measure them
(``ace-diffusers shapes quality``, after ``ace-diffusers shapes train``); no number is typed by hand.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from .._io import atomic_write_bytes, atomic_write_text
from .pipeline import WEIGHTS_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs" / "miniature_world.md"
QUALITY = ("<!-- quality:start -->", "<!-- quality:end -->")
TRAINING = ("<!-- training:start -->", "<!-- training:end -->")
FIGURE = REPO_ROOT / "docs" / "images" / "miniature_world.png"
FIGURE_GROUPS = ("neutral", "shape", "synonym", "style", "pair")


def format_table(cells: list[Any], command: str, sampler: dict, seconds: float) -> str:
    """One row per cell: images, accuracy with its 95 % interval, the bar and whether it holds."""
    held = [c for c in cells if c.passed is not None]
    lines = [
        f"Command: `{command}`",
        "",
        f"Sampler: `{sampler}`; fixed seeds; classifier: the bundled `load_shapes_classifier()`; "
        f"took {seconds:.0f} s. **{sum(bool(c.passed) for c in held)} of {len(held)} bars hold.**",
        "",
        "| group | cell | prompts | images | judged | accuracy | 95 % interval | bar |",
        "|---|---|---:|---:|---|---:|---|---:|",
    ]
    for c in cells:
        lo, hi = c.interval
        bar = "—" if c.bar is None else f"≥ {c.bar:.0%} {'✅' if c.passed else '❌'}"
        lines.append(
            f"| {c.group} | {c.name} | {len(c.items)} | {c.n} | {c.head} | {c.accuracy:.1%} | "
            f"{lo:.1%} – {hi:.1%} | {bar} |"
        )
    return "\n".join(lines)


def replace_block(text: str, markers: tuple[str, str], body: str, heading: str) -> str:
    """``text`` with the block between ``markers`` replaced by ``body`` (appended under ``heading``)."""
    start, end = markers
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        return pre + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"


def _minutes(seconds: float | None) -> str:
    return "—" if not seconds else f"{seconds / 60:.1f} min"


def training_summary(weights_dir: Path | None = None) -> str | None:
    """Markdown summary of ``weights/train_meta.json`` (written by the training command)."""
    path = Path(weights_dir or WEIGHTS_DIR) / "train_meta.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    a, ts, cls = m["args"], m["train_seconds"], m["classifier"]
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file() and f.name != "train_meta.json")
    final_loss = m["unet"]["history"][-1][1] if m["unet"]["history"] else "n/a"
    rec = ", ".join(f"{k} {cls[f'heldout_reconstruction_acc_{k}']:.1%}" for k in ("shape", "colour", "style"))
    lines = [
        f"Recorded in `weights/train_meta.json`: command `{m['command'].strip()}` (seed {m['seed']}, "
        f"{a['n_train']} rendered scenes, {a['captions_per_image']} captions each, "
        f"{m['n_unique_captions']} unique captions, torch threads {m['torch_threads']}).",
        "",
        "| stage | steps x batch | wall time | result |",
        "|---|---|---:|---|",
        f"| VAE | {a['steps_vae']} x {a['batch_vae']} | {_minutes(ts['vae'])} | held-out MSE "
        f"{m['vae']['heldout_mse']:.4f} (images in [-1, 1]) |",
        f"| slot classifier | {a['steps_cls']} x {a['batch_cls']} | {_minutes(ts['classifier'])} | held-out "
        f"slots: shape (with none) {cls['heldout_acc_shape']:.1%}, colour {cls['heldout_acc_colour']:.1%}, "
        f"style {cls['heldout_acc_style']:.1%}; their VAE reconstructions: {rec} |",
        f"| UNet | {m['unet']['steps']} x {a['batch_unet']} | {_minutes(ts['unet'])} | v-prediction, "
        f"zero terminal SNR, lr {a['lr_unet']} (warm-up + cosine), min-SNR-{a['min_snr']:g} + 1 weighting, "
        f"EMA {a['ema_decay']}; final loss {final_loss} |",
        "",
        f"Total training time (sum of stages): {_minutes(m['train_seconds_total'])} on 2 CPU cores. "
        f"Latent scaling factor {m['latents']['scaling_factor']:.4f}. Bundled weights: {size / 1e6:.1f} MB.",
    ]
    if m["unet"].get("stopped_early"):
        lines.append(
            f"The UNet run was planned for {m['unet']['planned_steps']} steps and stopped at step "
            f"{m['unet']['steps']} (EMA weights of that checkpoint, "
            f"`{m.get('finalize_command', '').strip()}`)."
        )
    return "\n".join(lines)


def write_docs(table: str, path: Path = DOCS) -> Path:
    """Write the quality table (and the training summary, when weights carry one) into ``path``."""
    text = path.read_text() if path.exists() else "# The miniature world\n"
    text = replace_block(text, QUALITY, table, "Quality")
    summary = training_summary()
    if summary:
        text = replace_block(text, TRAINING, summary, "Training")
    atomic_write_text(path, text)
    return path


def figure_png(cells: list[Any], images: dict[str, torch.Tensor], columns: int = 8, scale: int = 3) -> bytes:
    """A PNG with one labelled row per group of :data:`FIGURE_GROUPS`: the first image of its first
    ``columns`` prompts, as generated for the table."""
    rows = []
    for group in FIGURE_GROUPS:
        prompts = list(dict.fromkeys(p for c in cells if c.group == group for p, _ in c.items))[:columns]
        if prompts:
            rows.append((group, [images[p][0] for p in prompts]))
    h, w = (side * scale for side in next(iter(images.values())).shape[-2:])
    label, pad = 80, 2
    canvas = Image.new("RGB", (label + columns * (w + pad), len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (group, tiles) in enumerate(rows):
        y = r * (h + pad)
        draw.text((4, y + h // 2 - 6), group, fill="black")
        for c, tile in enumerate(tiles):
            array = (tile.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(array).resize((w, h), Image.NEAREST), (label + c * (w + pad), y))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def write_figure(cells: list[Any], images: dict[str, torch.Tensor], path: Path = FIGURE) -> Path:
    atomic_write_bytes(path, figure_png(cells, images))
    return path
