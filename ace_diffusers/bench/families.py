"""Adapter size and denoising-step overhead per model family (random weights: costs are real, outputs not).

* Size: the default one-concept adapter (``erase_concept``'s rank, K/V of every layer that reads the text,
  plus the pooled edit where the family has one) at each family's real shape, built on the ``meta``
  device, so nothing is allocated: SD1.5, SDXL, SD3-medium, PixArt-α XL, Sana 1600M, FLUX.1-dev.
* Overhead: one denoising step (batch 2, as with classifier-free guidance; latent 64x64 by default, i.e. a
  512-pixel image) with and without a loaded one-concept adapter, interleaved round by round and compared
  by medians. The text tokens are fixed (77 CLIP, 333 for SD3, 120 for PixArt, 300 for Sana, 512 T5 tokens
  for FLUX) while image tokens grow with the image, so the ratio shrinks at larger sizes. Real-width
  models are too large to time on a CPU at full depth, so each family is timed on a *slice* at its real
  widths and token counts (named in the table): the ratio per block is what an adapter adds, the depth
  only repeats it. SD1.5 at full size is timed by :mod:`.inference`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from ..fitting.joint import flux_image_ids
from ..fitting.solvers import default_rank, sketch_width
from ..integration.attach import attach_adapter, detach_adapter
from ..integration.modules import layer_shapes
from ..testing import random_adapter, sdxl_shaped_unet

SDXL_POOLED_DIM = 1280  # SDXL's pooled text embedding (text_encoder_2's projection width)


def adapter_parameters(shapes: dict[str, tuple[int, int, int]], rank: int, pooled_dim: int = 0) -> int:
    """Per layer: A_k, A_v (r x d_text), B_k (d_k x r), B_v (d_v x r), gate (d_text + 1); with a pooled
    edit also A_p (r x d_pool), B_p (d_pool x r), its gate (d_pool + 1)."""
    return _pooled_parameters(rank, pooled_dim) + sum(
        rank * (2 * d_text + d_k + d_v) + d_text + 1 for d_text, d_k, d_v in shapes.values()
    )


def text_space_parameters(shapes: dict[str, tuple[int, int, int]], rank: int, pooled_dim: int = 0) -> int:
    """What a closed-form file holds where all layers read one text (:mod:`ace_diffusers.core.text_space`):
    ``H`` and ``D`` (``2·k·d_text``), per layer ``R_k``, ``R_v`` (``k`` x their rank), one gate, the pooled
    edit; ``k`` the sketch width."""
    d_text = next(iter(shapes.values()))[0]
    k = sketch_width(rank, d_text)
    rights = sum(k * (min(rank, d_k, k) + min(rank, d_v, k)) for _, d_k, d_v in shapes.values())
    return 2 * k * d_text + rights + d_text + 1 + _pooled_parameters(rank, pooled_dim)


def _pooled_parameters(rank: int, pooled_dim: int) -> int:
    return 2 * min(rank, pooled_dim) * pooled_dim + pooled_dim + 1 if pooled_dim else 0


def _sd15(depth: int | None = None) -> UNet2DConditionModel:
    return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)


def _sdxl(depth: int | None = None) -> UNet2DConditionModel:
    # timing: SDXL's widths and text width, ``depth`` transformer layers per block (of 1-10)
    return sdxl_shaped_unet() if depth is None else sdxl_shaped_unet(transformer_layers=depth)


def _sd3(depth: int | None = None) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(  # SD3-medium: 24 joint blocks of width 1536, T5 width 4096
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=depth or 24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )


def _pixart(depth: int | None = None) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(  # PixArt-α XL-2: 28 blocks of width 1152 over projected T5 tokens
        sample_size=128,
        num_layers=depth or 28,
        patch_size=2,
        attention_head_dim=72,
        num_attention_heads=16,
        caption_channels=4096,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=1152,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def _sana(depth: int | None = None) -> SanaTransformer2DModel:
    # Sana 1600M 1024px (diffusers' defaults): 20 blocks of width 2240 over projected Gemma-2 tokens
    return SanaTransformer2DModel(num_layers=depth or 20)


def _flux(depth: int | None = None) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(  # FLUX.1-dev: 19 double- and 38 single-stream blocks of width 3072
        patch_size=1,
        in_channels=64,
        num_layers=depth or 19,
        num_single_layers=depth or 38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


# family: (builder, pooled width, slice depth for timing, how the timed slice is described)
FAMILIES: dict[str, tuple[Callable[..., torch.nn.Module], int, int | None, str]] = {
    "SD1.5": (_sd15, 0, None, "full UNet"),
    "SDXL": (_sdxl, 1280, 1, "SDXL widths, 1 transformer layer per block (of 1-10)"),
    "SD3": (_sd3, 2048, 2, "2 of 24 joint blocks, full width"),
    "PixArt-α": (_pixart, 0, 2, "2 of 28 blocks, full width"),
    "Sana": (_sana, 0, 2, "2 of 20 blocks, full width"),
    "FLUX.1": (_flux, 768, 1, "1 of 19 double- and 1 of 38 single-stream blocks, full width"),
}


# every layer reads one text: the closed form saves its text map
SHARED_TEXT = {"SD1.5", "SDXL", "PixArt-α", "Sana"}


def family_sizes() -> list[dict[str, Any]]:
    """One row per family: layers, rank and size of the default one-concept adapter (module docstring)."""
    rows = []
    for family, (build, pooled, _, _) in FAMILIES.items():
        with torch.device("meta"):
            shapes = layer_shapes(build())
        d_text = next(iter(shapes.values()))[0]
        rank = default_rank(1, d_text)
        params = adapter_parameters(shapes, rank, pooled)
        saved = text_space_parameters(shapes, rank, pooled) if family in SHARED_TEXT else params
        rows.append(
            {
                "family": family,
                "layers": len(shapes),
                "text_width": d_text,
                "rank": rank,
                "pooled": pooled,
                "parameters": params,
                "mb_fp16": round(params * 2 / 2**20, 2),
                "file_mb_fp16": round(saved * 2 / 2**20, 2),
            }
        )
    return rows


def _inputs(model: torch.nn.Module, pooled: int, latent: int, generator: torch.Generator) -> dict[str, Any]:
    """One step's inputs for batch 2: latents, timestep and text of the widths the model reads (77 CLIP
    tokens for UNets, 77 + 256 for SD3, 120 T5 tokens for PixArt, 300 Gemma tokens for Sana, whose latent
    side is a quarter of the others' for the same image)."""
    config, batch = model.config, 2
    sample = torch.randn(batch, config.in_channels, latent, latent, generator=generator)
    timestep = torch.tensor([500, 500])
    if isinstance(model, UNet2DConditionModel):
        inputs = {"sample": sample, "timestep": timestep}
        inputs["encoder_hidden_states"] = torch.randn(
            batch, 77, config.cross_attention_dim, generator=generator
        )
        if pooled:  # SDXL: pooled embedding and the six size/crop ids
            ids = torch.full((batch, 6), latent * 8.0)
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, pooled, generator=generator),
                "time_ids": ids,
            }
        return inputs
    if isinstance(model, FluxTransformer2DModel):
        return _flux_inputs(model, latent, generator)
    if isinstance(model, SanaTransformer2DModel):  # its autoencoder downsamples 32x, not 8x: the same image
        side = max(latent // 4, 1)
        return {
            "hidden_states": torch.randn(batch, config.in_channels, side, side, generator=generator),
            "timestep": timestep,
            "encoder_hidden_states": torch.randn(batch, 300, config.caption_channels, generator=generator),
        }
    if isinstance(model, SD3Transformer2DModel):
        return {
            "hidden_states": sample,
            "timestep": timestep,
            "encoder_hidden_states": torch.randn(batch, 333, config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator),
        }
    conditions = {"resolution": torch.full((batch, 2), latent * 8.0), "aspect_ratio": torch.ones(batch, 1)}
    return {
        "hidden_states": sample,
        "timestep": timestep,
        "added_cond_kwargs": conditions,  # PixArt-α
        "encoder_hidden_states": torch.randn(batch, 120, config.caption_channels, generator=generator),
    }


def _flux_inputs(model: FluxTransformer2DModel, latent: int, generator: torch.Generator) -> dict[str, Any]:
    """FLUX's step inputs for batch 2: the latent packed 2x2 into (latent/2)² tokens, 512 T5 tokens, their
    position ids, the pooled CLIP embedding and (guidance-distilled models) the guidance."""
    config, batch, side = model.config, 2, max(latent // 2, 1)
    inputs = {
        "hidden_states": torch.randn(batch, side * side, config.in_channels, generator=generator),
        "timestep": torch.tensor([0.5, 0.5]),
        "encoder_hidden_states": torch.randn(batch, 512, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator),
        "img_ids": flux_image_ids(side),
        "txt_ids": torch.zeros(512, 3),
    }
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5, 3.5])
    return inputs


def family_overhead(rounds: int = 5, latent: int = 64, progress: bool = False) -> list[dict[str, Any]]:
    """Median step time without and with a one-concept adapter, per family (module docstring)."""
    rows = []
    for family, (build, pooled, depth, sliced) in FAMILIES.items():
        torch.manual_seed(0)
        model = build(depth).eval()
        inputs = _inputs(model, pooled, latent, torch.Generator().manual_seed(0))
        d_text = next(iter(layer_shapes(model).values()))[0]
        adapter = random_adapter(model, rank=default_rank(1, d_text), pooled_dim=pooled or None)

        _step_seconds(model, inputs)  # warm-up
        times: dict[str, list[float]] = {"stock": [], "ACE": []}
        for _ in range(rounds):
            times["stock"].append(_step_seconds(model, inputs))
            attach_adapter(model, adapter, "bench")
            times["ACE"].append(_step_seconds(model, inputs))
            detach_adapter(model, "bench")
        medians = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "family": family,
                "timed": sliced,
                "stock_s": round(medians["stock"], 4),
                "ace_s": round(medians["ACE"], 4),
                "ratio": round(medians["ACE"] / medians["stock"], 3),
            }
        )
        if progress:
            print(f"[bench] families: {family} ({sliced}) ratio {rows[-1]['ratio']:.3f}", flush=True)
    return rows


def _step_seconds(model: torch.nn.Module, inputs: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    return time.perf_counter() - t0


def format_families(size_rows: list[dict[str, Any]], over_rows: list[dict[str, Any]] | None) -> str:
    lines = ["# per family: the default one-concept adapter (K/V of every text-reading layer + pooled edit)"]
    lines.append(
        f"{'family':<10}{'layers':>7}{'text dim':>9}{'rank':>6}{'pooled':>8}{'parameters':>12}{'MB fp16':>9}"
        f"{'closed-form file MB':>21}"
    )
    for r in size_rows:
        lines.append(
            f"{r['family']:<10}{r['layers']:>7}{r['text_width']:>9}{r['rank']:>6}{r['pooled']:>8}"
            f"{r['parameters']:>12}{r['mb_fp16']:>9.2f}{r['file_mb_fp16']:>21.2f}"
        )
    if over_rows:
        lines.append("# per family: denoising step, batch 2, stock vs one-concept adapter (medians)")
        lines.append(f"{'family':<10}{'stock s':>9}{'ACE s':>9}{'ratio':>8}  timed on")
        for r in over_rows:
            lines.append(
                f"{r['family']:<10}{r['stock_s']:>9.4f}{r['ace_s']:>9.4f}{r['ratio']:>8.3f}  {r['timed']}"
            )
    return "\n".join(lines)
