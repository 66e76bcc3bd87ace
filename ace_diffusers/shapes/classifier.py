"""A small CNN that recognises what each slot of a miniature-world scene shows.

The network reads one 32x32 slot and names its shape (or ``none`` for an empty slot), colour and
style; :meth:`ShapesClassifier.predict` runs it on both slots of a 32x64 scene. Image-level labels
(``shape``, ``colour``, ``style``) are those of the slot most likely to hold an object, so a
single-object prompt is judged wherever the object was drawn; ``left_shape`` ... ``right_style`` are
the per-slot labels that two-object prompts are judged by.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .vocab import COLOURS, NONE, SHAPES, SLOTS, STYLES

HEADS: dict[str, list[str]] = {"shape": [*SHAPES, NONE], "colour": COLOURS, "style": STYLES}
SLOT_KEYS = [f"{slot}_{head}" for slot in SLOTS for head in HEADS]
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ShapesClassifier(nn.Module):
    """Three-headed CNN over one slot.  Input: float images (N,3,32,32) in [0,1]."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.features = nn.Sequential(
            _block(3, width),
            nn.MaxPool2d(2),  # 16
            _block(width, 2 * width),
            nn.MaxPool2d(2),  # 8
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(4 * width, len(v)) for k, v in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images * 2.0 - 1.0)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def slot_logits(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Logits per ``SLOT_KEYS`` entry for scenes (N,3,H,2H: two slots side by side); a square image
        is one slot and counts as 'left'."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        slots = (
            [images[..., : images.shape[-1] // 2], images[..., images.shape[-1] // 2 :]]
            if images.shape[-1] >= 2 * images.shape[-2]
            else [images]
        )
        outs: dict[str, list[torch.Tensor]] = {}
        for slot, crops in zip(SLOTS, slots, strict=False):
            for i in range(0, len(crops), batch_size):
                x = crops[i : i + batch_size].to(dev, torch.float32).clamp(0, 1)
                for head, v in self(x).items():
                    outs.setdefault(f"{slot}_{head}", []).append(v.float().cpu())
        self.train(was_training)
        return {k: torch.cat(v) for k, v in outs.items()}

    @torch.no_grad()
    def predict_indices(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Label indices per slot (``left_shape`` ...) and of the image's main object (``shape`` ...)."""
        if len(images) == 0:
            return {k: torch.empty(0, dtype=torch.long) for k in [*HEADS, *SLOT_KEYS]}
        logits = self.slot_logits(images, batch_size)
        out = {k: v.argmax(-1) for k, v in logits.items()}
        present = [
            logits[f"{slot}_shape"].softmax(-1)[:, :-1].sum(-1) for slot in SLOTS if f"{slot}_shape" in logits
        ]
        main = torch.stack(present, 1).argmax(1)  # the slot most likely to hold an object
        for head in HEADS:
            stacked = torch.stack([out[f"{slot}_{head}"] for slot in SLOTS if f"{slot}_{head}" in out], 1)
            out[head] = stacked.gather(1, main[:, None])[:, 0]
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Label names: ``shape``/``colour``/``style`` of the main object and the same per slot.

        An image whose slots are both empty has shape ``none``; colour and style are then meaningless.
        """
        idx = self.predict_indices(images)
        return {k: [HEADS[k.split("_")[-1]][int(i)] for i in v] for k, v in idx.items()}


def load_shapes_classifier(
    device: str | torch.device = "cpu", weights_dir: str | os.PathLike | None = None
) -> ShapesClassifier:
    """The bundled, trained miniature-world classifier (eval mode)."""

    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    wpath, cpath = d / "classifier.safetensors", d / "classifier_config.json"
    if not wpath.exists():
        raise FileNotFoundError(f"classifier weights not found in {d}; run `ace-diffusers shapes train`")
    with open(cpath) as f:
        cfg = json.load(f)
    model = ShapesClassifier(width=cfg.get("width", 32))
    sd = {k: v.float() for k, v in load_file(str(wpath)).items()}
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False).to(device)
