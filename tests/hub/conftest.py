"""Shared pieces of the Hub tests: the local Hub-protocol server's fixtures and small adapter folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ace_diffusers.core.adapter import ACEAdapter
from ace_diffusers.core.factors import LayerFactors
from ace_diffusers.format import CONFIG_NAME, WEIGHTS_NAME

from ..hub_server import configure_client, hub_server, hub_server_session  # noqa: F401  (fixtures)

CONFIG = {
    "format_version": 1,
    "concepts": ["Van Gogh", "Starry | Night"],
    "neutral": ["a painting", ""],
    "kind": "style",
    "rank": 2,
    "method": "closed-form",
    "fit": {"lambda_preserve": 0.1, "templates": 12, "adversarial": {"steps": 3}},
    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "fingerprint": {"layers": {"mid.attn2": [8, 4, 4]}, "hash": "0123456789abcdef"},
    "created_with": "ace-diffusers test",
}


def make_fake_adapter(folder: Path, *, seed: int = 0, **overrides) -> Path:
    """The two files of an adapter folder, written without ACEAdapter (safetensors + JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"mid.attn2.k_down": torch.randn(2, 8, generator=g)}, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps({**CONFIG, **overrides}, indent=2))
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


def small_adapter(seed: int = 0, concepts=("Van Gogh",)) -> ACEAdapter:
    g = torch.Generator().manual_seed(seed)
    layers = {
        f"up_blocks.{i}.attentions.0.transformer_blocks.0.attn2": LayerFactors(
            k_down=torch.randn(3, 16, generator=g),
            k_up=torch.randn(8, 3, generator=g),
            v_down=torch.randn(3, 16, generator=g),
            v_up=torch.randn(8, 3, generator=g),
            gate_weight=torch.randn(16, generator=g),
            gate_bias=torch.randn(1, generator=g),
        )
        for i in range(2)
    }
    return ACEAdapter(
        layers,
        concepts=list(concepts),
        neutral=["a painting"] * len(concepts),
        kind="style",
        base_model="tiny/sd",
    )
