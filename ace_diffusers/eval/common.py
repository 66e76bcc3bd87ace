"""Small shared pieces of the evaluation suite: model states, the concept in a prompt, seeded latents,
process splitting."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..core.processor import get_stack
from ..deploy.fuse import get_fused_adapters
from ..errors import ACECompatibilityError, ACEValueError
from ..integration.attach import set_enabled
from ..integration.modules import cross_attention_modules, get_unet


# ---------------------------------------------------------------------- model states
@contextlib.contextmanager
def ace_disabled(pipe: Any) -> Iterator[Any]:
    """Temporarily switch every loaded ACE adapter off (the original model); restores the previous state.

    Fused adapters are baked into the weights and cannot be switched off: unfuse them first.
    """
    unet = get_unet(pipe)
    fused = get_fused_adapters(pipe)
    if fused:
        raise ACECompatibilityError(
            f"ACE adapters {fused} are fused into the UNet weights; the original model is not available. "
            "Call pipe.unfuse_ace_adapter() before evaluating."
        )
    stacks = [s for s in (get_stack(m) for m in cross_attention_modules(unet).values()) if s is not None]
    saved = [s.enabled.clone() for s in stacks]
    try:
        set_enabled(unet, False)
        yield pipe
    finally:
        for stack, value in zip(stacks, saved, strict=True):
            stack.enabled.copy_(value)


def as_context(original: Callable[[], Any] | None, pipe: Any) -> Callable[[], Any]:
    """``original`` (a context-manager factory that puts ``pipe`` in its pre-erasure state) or ACE's."""
    if original is not None:
        return original
    return lambda: ace_disabled(pipe)


# ---------------------------------------------------------------------- the concept in a prompt
def replace_concept(prompt: str, concept: str, replacement: str) -> str:
    """Replace the first whole-word occurrence of ``concept`` in ``prompt`` (case-insensitive)."""
    pattern = re.compile(r"(?<![\w-])" + re.escape(concept) + r"(?![\w-])", re.IGNORECASE)
    if not pattern.search(prompt):
        raise ACEValueError(f"The prompt {prompt!r} does not contain the concept {concept!r}.")
    return pattern.sub(lambda _: replacement, prompt, count=1)


def concept_char_span(prompt: str, concept: str) -> tuple[int, int]:
    """``(start, end)``: the characters of the first whole-word occurrence of ``concept`` in ``prompt``."""
    pattern = re.compile(r"(?<![\w-])" + re.escape(concept) + r"(?![\w-])", re.IGNORECASE)
    match = pattern.search(prompt)
    if match is None:
        raise ACEValueError(f"The prompt {prompt!r} does not contain the concept {concept!r}.")
    return match.start(), match.end()


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
    lat = torch.stack(
        [torch.randn((channels, lh, lw), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    )
    return lat.to(pipe._execution_device, pipe.unet.dtype) * pipe.scheduler.init_noise_sigma


def check_sd_pipeline(pipe: Any, what: str) -> None:
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ACECompatibilityError(
            f"{what} supports single-text-encoder Stable Diffusion pipelines (SD 1.x/2.x, the miniature "
            "world); "
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
    from accelerate import PartialState  # optional: only runs that measure or split across processes need it
    from accelerate.utils import parse_flag_from_env  # optional, as above

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
    from accelerate.utils import gather_object  # optional: only launched groups of several processes get here

    with state.split_between_processes(list(range(len(items)))) as mine:
        local = [(i, function(items[i])) for i in mine]
    gathered = gather_object(local)
    by_index = dict(gathered)
    return [by_index[i] for i in range(len(items))]
