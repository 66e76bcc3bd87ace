"""Inference overhead and adapter size at real model shapes (random weights: costs are real, outputs not).

* Operations per cross-attention call, stock vs ACE with 1, 2 and 10 adapters (:mod:`.ops`).
* Overhead: one UNet denoising step (batch 2, as with classifier-free guidance) of an SD1.5-shaped UNet
  at a small latent size and at SD1.5's own 64x64 (on the GPU when one is present), stock processors
  vs ACE adapters of the size ``erase_concept`` fits for 1,
  10 and 100 concepts, and an adapter *fused* into the ``to_k``/``to_v`` weights by
  :func:`ace_diffusers.deploy.fuse.fuse_adapter` (then unloaded: stock processors on edited weights, the
  deployment path with no plugin at inference). A fused model has the stock weight shapes whatever
  the number of concepts, so the 1-concept adapter is fused (baking 100 concepts costs minutes and
  gigabytes here, and would time the same matrices). Configurations are timed *interleaved*, round after
  round, and compared by their medians, so machine noise hits all of them alike.
* Size: parameters and bytes of an adapter per concept count at SD1.5 and SDXL shapes (built on the
  ``meta`` device: nothing is allocated): the closed form's file (its text-space form,
  :mod:`ace_diffusers.core.text_space`) and a fine-tuned adapter's (every layer's factors), with the
  targets for one concept (≤ 1 MB at SD1.5 shape, ≤ 4 MB at SDXL shape, fp16).
* Per family (SD1.5, SDXL, SD3, PixArt-α, FLUX.1): size and step overhead of a one-concept adapter
  (:mod:`.families`).
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from .. import helptext
from ..deploy.fuse import fuse_adapter, unfuse_adapter
from ..fitting.solvers import default_rank
from ..integration.attach import attach_adapter, detach_adapter
from ..integration.modules import cross_attention_modules, kv_projection_names, layer_shapes
from ..testing import clip_text_config, clip_tokenizer, random_adapter, sdxl_shaped_unet
from .families import (
    SDXL_POOLED_DIM,
    adapter_parameters,
    family_overhead,
    family_sizes,
    format_families,
    text_space_parameters,
)
from .ops import format_ops, op_counts

COUNTS = (1, 10, 100)
SIZE_TARGETS_MB = {"SD1.5": 1.0, "SDXL": 4.0}  # one concept, the closed form's file, fp16


def mb_fp16(parameters: int) -> float:
    return round(parameters * 2 / 2**20, 2)


def sizes() -> list[dict[str, Any]]:
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        sdxl = sdxl_shaped_unet()
    rows = []
    for model, unet, pooled_dim in (("SD1.5", sd15, 0), ("SDXL", sdxl, SDXL_POOLED_DIM)):
        shapes = layer_shapes(unet)
        d_text = next(iter(shapes.values()))[0]
        for n in COUNTS:
            rank = default_rank(n, d_text)
            params = text_space_parameters(shapes, rank, pooled_dim)
            full = adapter_parameters(shapes, rank, pooled_dim)
            rows.append({"model": model, "layers": len(shapes), "concepts": n, "rank": rank,
                         "parameters": params, "mb_fp16": mb_fp16(params),
                         "kb_fp16_per_concept": round(params * 2 / 1024 / n, 1),
                         "fine_tuned_parameters": full, "fine_tuned_mb_fp16": mb_fp16(full)})
    return rows


def size_targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """``(target, measured, met)`` for the one-concept closed-form file per model."""
    out = []
    for r in rows:
        if r["concepts"] == 1 and r["model"] in SIZE_TARGETS_MB:
            limit = SIZE_TARGETS_MB[r["model"]]
            out.append((f"1-concept closed-form adapter at {r['model']} shape: <= {limit:g} MB (fp16)",
                        f"{r['mb_fp16']:.2f} MB", r["mb_fp16"] <= limit))
    return out


FUSED = "fused"


@torch.no_grad()
def fused_kv_weights(unet: torch.nn.Module, adapter: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{parameter name: weight}`` of every cross-attention ``to_k``/``to_v`` with ``adapter`` fused in.

    Runs the real :func:`ace_diffusers.deploy.fuse.fuse_adapter` (bake + write), snapshots the weights, then
    unfuses (bit-exact) and unloads, so ``unet`` is left as it was. The bake needs text tokens of the
    UNet's width only: a one-layer random CLIP text encoder supplies them (timing does not depend on
    the weights' values, only on their being plain weights).
    """
    d_text = next(iter(layer_shapes(unet).values()))[0]
    torch.manual_seed(seed)
    encoder = CLIPTextModel(clip_text_config(d_text, 1, 8, 4 * d_text, d_text)).eval()
    encoder.to(next(unet.parameters()).device)
    pipe = SimpleNamespace(unet=unet, tokenizer=clip_tokenizer(), text_encoder=encoder)
    modules = cross_attention_modules(unet)
    attach_adapter(unet, adapter, "bench-fused")
    try:
        fuse_adapter(pipe, "bench-fused")
        try:
            weights = {f"{name}.{proj}": getattr(attn, proj).weight.detach().clone()
                       for name, attn in modules.items() for proj in kv_projection_names(attn)}
        finally:
            unfuse_adapter(pipe)
    finally:
        detach_adapter(unet, "bench-fused")
    return weights


def _kv_weights(
    unet: torch.nn.Module, adapter: Any, seed: int, fused: bool, progress: bool
) -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(K/V projections, their stock weights, the weights with ``adapter`` fused in)``; the last is empty
    unless ``fused``, and must differ from the stock weights."""
    projections = {f"{name}.{proj}": getattr(attn, proj)
                   for name, attn in cross_attention_modules(unet).items()
                   for proj in kv_projection_names(attn)}
    stock_weights = {k: m.weight.detach().clone() for k, m in projections.items()}
    t0 = time.perf_counter()
    fused_weights = fused_kv_weights(unet, adapter, seed) if fused else {}
    if fused and progress:
        print(f"[bench] inference: adapter fused into the weights in {time.perf_counter() - t0:.1f} s",
              flush=True)
    if fused and all(torch.equal(fused_weights[k], w) for k, w in stock_weights.items()):
        raise RuntimeError(
            "fusing the adapter did not change any weight; the fused timing would be meaningless"
        )
    return projections, stock_weights, fused_weights


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so a timing covers it (nothing to wait for on a CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def default_device() -> str:
    """``"cuda"`` when a GPU is present, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _adapters(unet: torch.nn.Module) -> dict[int, Any]:
    """Random adapters of the rank ``erase_concept`` fits for each of :data:`COUNTS` concepts."""
    return {
        n: random_adapter(unet, rank=default_rank(n, 768), seed=n, concepts=tuple(f"c{i}" for i in range(n)))
        for n in COUNTS
    }


def overhead(rounds: int = 15, latent: int = 16, threads: int | None = None, seed: int = 0,
             fused: bool = True, progress: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Median step time per configuration (module docstring); ``fused`` adds the fused-weights model."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=latent).eval()
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, latent, latent, generator=generator).to(device)
    context = torch.randn(2, 77, 768, generator=generator).to(device)
    timestep = torch.tensor([500, 500], device=device)
    adapters = {n: a.to(device) for n, a in _adapters(unet).items()}

    def step() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=context)
        synchronize(device)
        return time.perf_counter() - t0

    unet.to(device)
    projections, stock_weights, fused_weights = _kv_weights(unet, adapters[min(COUNTS)], seed, fused,
                                                            progress)

    def swap(weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, module in projections.items():
                module.weight.copy_(weights[k])

    step()  # warm-up
    times: dict[str, list[float]] = {"stock": [], **{f"ACE {n}": [] for n in COUNTS}}
    if fused:
        times[FUSED] = []
    for r in range(rounds):
        times["stock"].append(step())
        for n, adapter in adapters.items():
            attach_adapter(unet, adapter, "bench")
            times[f"ACE {n}"].append(step())
            detach_adapter(unet, "bench")
        if fused:
            swap(fused_weights)
            try:
                times[FUSED].append(step())
            finally:
                swap(stock_weights)
        if progress:
            print(f"[bench] inference round {r + 1}/{rounds}: "
                  + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "latent": latent,
        "rounds": rounds,
        "device": device,
        "threads": torch.get_num_threads(),
        "median_seconds": {k: round(v, 4) for k, v in medians.items()},
        "ratio_vs_stock": {k: round(v / medians["stock"], 3) for k, v in medians.items()},
        "model": "SD1.5-shaped UNet2DConditionModel (random weights, 16 cross-attention layers, text width "
                 "768)",
    }


def format_report(over: dict[str, Any] | None, size_rows: list[dict[str, Any]]) -> str:
    lines = []
    if over:
        lines.append(f"# denoising step, SD1.5-shaped UNet, latent {over['latent']}x{over['latent']}, "
                     f"batch 2, {over['rounds']} interleaved rounds, {over.get('device', 'cpu')}, "
                     f"{over['threads']} threads")
        lines.append(f"{'config':<12}{'median s':>10}{'ratio':>8}")
        for k, v in over["median_seconds"].items():
            lines.append(f"{k:<12}{v:>10.4f}{over['ratio_vs_stock'][k]:>8.3f}")
        r1, r100 = over["ratio_vs_stock"]["ACE 1"], over["ratio_vs_stock"]["ACE 100"]
        lines.append(f"target <= 1.03x for 1 concept: {'met' if r1 <= 1.03 else 'NOT MET'} ({r1:.3f}); "
                     f"<= 1.10x for 100 concepts: {'met' if r100 <= 1.10 else 'NOT MET'} ({r100:.3f})")
    if not size_rows:
        return "\n".join(lines)
    lines.append("# adapter size (default rank of erase_concept): the closed form's file, and fine-tuned")
    lines.append(f"{'model':<7}{'layers':>7}{'concepts':>9}{'rank':>6}{'parameters':>12}{'MB fp16':>9}"
                 f"{'KB/concept':>11}{'fine-tuned MB':>15}")
    for r in size_rows:
        lines.append(f"{r['model']:<7}{r['layers']:>7}{r['concepts']:>9}{r['rank']:>6}{r['parameters']:>12}"
                     f"{r['mb_fp16']:>9.2f}{r['kb_fp16_per_concept']:>11.1f}{r['fine_tuned_mb_fp16']:>15.2f}")
    for target, measured, met in size_targets(size_rows):
        lines.append(f"target {target}: {'met' if met else 'NOT MET'} ({measured})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = helptext.parser("bench inference", __doc__)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds at latents up to 32")
    parser.add_argument("--large-rounds", type=int, default=3, help="rounds at larger latents (64: SD1.5's)")
    parser.add_argument("--latent", type=int, nargs="+", default=[16, 64],
                        help="latent sides of the step timing (default: a small one and SD1.5's 64)")
    parser.add_argument("--device", default=default_device(), help="default: cuda when present, else cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--size-only", action="store_true")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused-weights configuration")
    parser.add_argument("--family-rounds", type=int, default=5, help="rounds of the per-family timing")
    parser.add_argument("--family-latent", type=int, default=64, help="latent side of the per-family timing")
    args = parser.parse_args(argv)
    print(format_ops(op_counts(max(args.latent), args.device)))
    for latent in [] if args.size_only else args.latent:
        rounds = args.rounds if latent <= 32 else args.large_rounds
        over = overhead(rounds, latent, args.threads, fused=not args.no_fused, progress=True,
                        device=args.device)
        print(format_report(over, []))
    print(format_report(None, sizes()))
    families = (None if args.size_only
                else family_overhead(args.family_rounds, args.family_latent, progress=True))
    print(format_families(family_sizes(), families))
    return 0
