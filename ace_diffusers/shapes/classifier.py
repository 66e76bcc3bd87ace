"""A small CNN that recognises shape, colour and style of a 32x32 miniature-world image."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .vocab import COLOURS, SHAPES, STYLES

HEADS: dict[str, list[str]] = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}
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
    """Three-headed CNN.  Input: float images (N,3,32,32) in [0,1]."""

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
    def predict_indices(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        outs: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(dev, torch.float32).clamp(0, 1)
            for k, v in self(x).items():
                outs[k].append(v.argmax(-1).cpu())
        self.train(was_training)
        return {k: torch.cat(v) if v else torch.empty(0, dtype=torch.long) for k, v in outs.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Label names per head: ``{"shape": [...], "colour": [...], "style": [...]}``."""
        idx = self.predict_indices(images)
        return {k: [HEADS[k][int(i)] for i in v] for k, v in idx.items()}


def load_shapes_classifier(
    device: str | torch.device = "cpu", weights_dir: str | os.PathLike | None = None
) -> ShapesClassifier:
    """The bundled, trained miniature-world classifier (eval mode)."""

    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    wpath, cpath = d / "classifier.safetensors", d / "classifier_config.json"
    if not wpath.exists():
        raise FileNotFoundError(
            f"classifier weights not found in {d}; run `ace-diffusers shapes train`"
        )
    with open(cpath) as f:
        cfg = json.load(f)
    model = ShapesClassifier(width=cfg.get("width", 32))
    sd = {k: v.float() for k, v in load_file(str(wpath)).items()}
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False).to(device)
