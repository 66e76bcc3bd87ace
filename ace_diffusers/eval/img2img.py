"""The img2img probe: given a picture of the erased concept, does the erased model keep it or re-draw it?

An erasure edits how the *text* conditions the UNet; an image passed to img2img (or inpainting) carries
the concept in its pixels, and at moderate strength the model only re-draws part of it. The probe starts
from images of the concept drawn by the *original* model, noises them to ``strength`` (the share of the
schedule that is re-run; 0.5–0.8 is the useful range) and denoises with the erased model on the concept
prompt: the share of results that still show the concept is the probe's rate. It is a measured column,
not a bar: no text-side erasure can remove what the image already holds at low strength.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.utils import logging as diffusers_logging

from ..errors import ACEValueError
from .common import check_sd_pipeline


def check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ACEValueError(f"strength must be a number in (0, 1], got {strength!r} (0.5–0.8 is typical).")
    return float(strength)


@torch.no_grad()
def img2img_probe(
    pipe: Any,
    prompt: str,
    images: torch.Tensor,
    seeds: Sequence[int],
    *,
    strength: float = 0.6,
    sampler: dict[str, Any] | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Re-draw each of ``images`` (``(n, 3, h, w)`` in [0, 1], pictures of the concept) with ``pipe`` as it
    is now, prompted by ``prompt``, from ``strength``: ``(n, 3, h, w)`` in [0, 1]. ``seeds``: one per image
    (the added noise). The pipeline's UNet is shared, so loaded adapters act as in ``pipe``."""
    check_sd_pipeline(pipe, "The img2img probe")
    strength = check_strength(strength)
    if images.ndim != 4 or len(images) != len(seeds):
        raise ACEValueError(
            f"Need one seed per image; got {len(seeds)} seeds for images of shape {tuple(images.shape)}."
        )
    with _square_sample_size(pipe.unet), _quiet_diffusers():
        redraw = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    redraw.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in (sampler or {}).items() if k not in ("height", "width")}
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + len(chunk)]]
        result = redraw([prompt] * len(chunk), image=chunk, strength=strength, generator=generators,
                        output_type="pt", **kwargs)
        out.append(result.images.float().cpu())
    return torch.cat(out) if out else images.new_zeros((0, *images.shape[1:]))


@contextlib.contextmanager
def _square_sample_size(unet: Any) -> Iterator[None]:
    """diffusers' img2img constructor compares ``unet.config.sample_size`` with an int; a non-square UNet
    (the miniature world's ``[h, w]``) would make it raise. The size is not used otherwise (img2img takes
    the image's size), so it is shown as one int while the pipeline is built, then put back."""
    size = unet.config.sample_size
    if not isinstance(size, (list, tuple)):
        yield
        return
    unet.register_to_config(sample_size=max(size))
    try:
        yield
    finally:
        unet.register_to_config(sample_size=size)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """``from_pipe`` re-applies the pipeline's dtype to shared modules and logs a warning meant for
    ``from_pretrained`` users; nothing is cast here (the modules are already in that dtype)."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
