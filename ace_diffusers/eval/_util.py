"""Small shared pieces of the evaluation suite: model states, seeded latents, process splitting, files."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ACECompatibilityError


# ---------------------------------------------------------------------- model states
@contextlib.contextmanager
def ace_disabled(pipe: Any) -> Iterator[Any]:
    """Temporarily switch every loaded ACE adapter off (the original model); restores the previous state.

    Fused adapters are baked into the weights and cannot be switched off: unfuse them first.
    """
    from .. import attach
    from ..pipeline import get_unet
    from ..processor import get_stack

    unet = get_unet(pipe)
    try:
        from ..fuse import get_fused_adapters

        fused = get_fused_adapters(pipe)
    except Exception:  # pragma: no cover - fuse module unavailable or changed
        fused = []
    if fused:
        raise ACECompatibilityError(
            f"ACE adapters {fused} are fused into the UNet weights; the original model is not available. "
            "Call pipe.unfuse_ace_adapter() before evaluating."
        )
    stacks = [s for s in (get_stack(m) for m in attach.cross_attention_modules(unet).values()) if s is not None]
    saved = [s.enabled.clone() for s in stacks]
    try:
        attach.set_enabled(unet, False)
        yield pipe
    finally:
        for stack, value in zip(stacks, saved, strict=True):
            stack.enabled.copy_(value)


def as_context(original: Callable[[], Any] | None, pipe: Any) -> Callable[[], Any]:
    """``original`` (a context-manager factory that puts ``pipe`` in its pre-erasure state) or ACE's."""
    if original is not None:
        return original
    return lambda: ace_disabled(pipe)


# ---------------------------------------------------------------------- sampling
def latent_shape(pipe: Any, height: int | None, width: int | None) -> tuple[int, int, int, int, int]:
    """``(channels, latent_h, latent_w, height, width)`` for ``pipe`` (defaults: the UNet's sample size)."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    sample = pipe.unet.config.sample_size
    sample = sample if isinstance(sample, int) else sample[0]
    height = height or sample * factor
    width = width or sample * factor
    return pipe.unet.config.in_channels, height // factor, width // factor, height, width


def seeded_latents(pipe: Any, seeds: Sequence[int], height: int | None, width: int | None) -> torch.Tensor:
    """Initial latents drawn on CPU, one generator per seed (image ``i`` does not depend on the batch),
    scaled by the scheduler's ``init_noise_sigma`` — the recipe of ``shapes.pipeline.generate``."""
    channels, lh, lw, _, _ = latent_shape(pipe, height, width)
    lat = torch.stack([torch.randn((channels, lh, lw), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])
    return lat.to(pipe._execution_device, pipe.unet.dtype) * pipe.scheduler.init_noise_sigma


def check_sd_pipeline(pipe: Any, what: str) -> None:
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ACECompatibilityError(
            f"{what} supports single-text-encoder Stable Diffusion pipelines (SD 1.x/2.x, the miniature world); "
            f"{type(pipe).__name__} has two text encoders (SDXL)."
        )
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise ACECompatibilityError(f"{what} needs pipe.{name}; {type(pipe).__name__} has none.")


# ---------------------------------------------------------------------- processes
def partial_state() -> Any:
    """accelerate's ``PartialState``: one process when not launched, else the launched group.

    On a machine without CUDA, a group launched with ``accelerate launch --multi_gpu`` (torchrun under the
    hood) becomes a gloo CPU group (``cpu=True``); ``ACCELERATE_USE_CPU=1`` forces CPU everywhere.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def distributed_map(function: Callable[[Any], Any], items: Sequence[Any], state: Any = None) -> list[Any]:
    """``[function(x) for x in items]``, items split across processes and gathered on every process.

    Order is preserved, so results do not depend on the number of processes as long as ``function``
    depends only on its item.
    """
    items = list(items)
    if state is None or state.num_processes == 1:
        return [function(item) for item in items]
    from accelerate.utils import gather_object

    with state.split_between_processes(list(range(len(items)))) as mine:
        local = [(i, function(items[i])) for i in mine]
    gathered = gather_object(local)
    by_index = dict(gathered)
    return [by_index[i] for i in range(len(items))]


# ---------------------------------------------------------------------- files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n")
