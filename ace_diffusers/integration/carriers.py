"""Every model of a pipeline that reads the prompt through cross-attention carries the adapters.

A ControlNet is a trainable copy of the UNet's encoder: its down and mid blocks hold cross-attention
layers with the UNet's layer names and shapes, reading the same prompt embeddings, and its residuals are
added to the UNet's skip connections. A ControlNet without the adapter feeds the erased concept back
into an erased UNet (its residuals were bit-identical with and without ACE). So the pipeline verbs act
on all *carriers*: the UNet and each ControlNet (``pipe.controlnet``, or every net of a
``MultiControlNetModel``), which gets the adapter's layers it has, under the same name, with the same
scale and switches. Attaching is all-or-nothing across carriers.

A ControlNet that joins later (``StableDiffusionControlNetPipeline.from_pipe(erased_pipe,
controlnet=...)`` shares the erased UNet but brings a bare ControlNet) cannot be noticed when it is
built. The UNet notices at run time instead: a forward that receives ControlNet residuals
(``down_block_additional_residuals``) while an adapter is in effect, without an erased ControlNet having
run just before on that thread, warns once that the residuals may carry the erased concept and how to
fix it (load the adapter through this pipeline).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.adapter import ACEAdapter
from . import attach
from .compat import adapters_in_effect
from .modules import get_unet, has_cross_attention, layer_shapes, unwrap_model

_RUN = threading.local()  # .erased_controlnet: an erased ControlNet ran since the UNet's last forward
_HOOKED_ATTR = "_ace_residual_check"
_WARNED_ATTR = "_ace_residual_warned"


def controlnets(pipe: Any) -> list[nn.Module]:
    """The pipeline's ControlNets that read text through cross-attention (empty for other pipelines)."""
    net = getattr(pipe, "controlnet", None)
    if not isinstance(net, nn.Module):
        return []
    nets = list(net.nets) if isinstance(getattr(net, "nets", None), nn.ModuleList) else [net]
    return [n for n in nets if has_cross_attention(n)]


def carriers(pipe: Any) -> list[nn.Module]:
    """The UNet, then every ControlNet: each model the adapters must be on."""
    return [get_unet(pipe), *controlnets(pipe)]


def part_for(adapter: ACEAdapter, controlnet: nn.Module) -> ACEAdapter:
    """The part of ``adapter`` for a ControlNet: the layers it shares with the UNet."""
    return adapter.restricted(layer_shapes(controlnet))  # names or shapes that do not match raise there


def attach_everywhere(pipe: Any, adapter: ACEAdapter, name: str, *, scale: float = 1.0) -> None:
    """Attach ``adapter`` to every carrier of ``pipe``; all-or-nothing. A text-space adapter is rebuilt
    on the UNet's weights, and ControlNets get the part of that (as for any adapter)."""
    done: list[nn.Module] = []
    models = carriers(pipe)
    adapter = attach.materialized(adapter, models[0])
    try:
        for i, model in enumerate(models):
            attach.attach_adapter(model, adapter if i == 0 else part_for(adapter, model), name, scale=scale)
            done.append(model)
    except Exception:
        for model in done:
            attach.detach_adapter(model, name)
        raise
    for net in done[1:]:
        _mark_erased_runs(net)
    _check_residuals_of(done[0])


def detach_everywhere(pipe: Any, name: str) -> ACEAdapter:
    """Detach ``name`` from every carrier that has it; returns the UNet's adapter."""
    adapter = attach.detach_adapter(get_unet(pipe), name)
    for net in controlnets(pipe):
        if name in attach.loaded_adapters(net):
            attach.detach_adapter(net, name)
    return adapter


def set_active_everywhere(
    pipe: Any, names: str | list[str], scales: float | list[float] | Mapping[str, float] | None
) -> None:
    """:func:`attach.set_active_adapters` on the UNet, then on every ControlNet carrying these names."""
    attach.set_active_adapters(get_unet(pipe), names, scales)
    wanted = [names] if isinstance(names, str) else list(names)
    for net in controlnets(pipe):
        loaded = attach.loaded_adapters(net)
        if loaded and all(n in loaded for n in wanted):
            attach.set_active_adapters(net, wanted, scales)


def set_enabled_everywhere(pipe: Any, enabled: bool) -> None:
    for model in carriers(pipe):
        attach.set_enabled(model, enabled)


# ---------------------------------------------------------------------- run-time check of residuals
def _after_erased_controlnet(module: nn.Module, args: Any, output: Any) -> None:
    if not torch.compiler.is_compiling() and attach.loaded_adapters(module):
        _RUN.erased_controlnet = True


def _before_unet(module: nn.Module, args: Any, kwargs: dict) -> None:
    if torch.compiler.is_compiling():
        return
    erased_before = getattr(_RUN, "erased_controlnet", False)
    _RUN.erased_controlnet = False
    inner = unwrap_model(module)
    if kwargs.get("down_block_additional_residuals") is None or erased_before or inner.__dict__.get(
        _WARNED_ATTR
    ):
        return
    live = adapters_in_effect(inner)
    if live:
        inner.__dict__[_WARNED_ATTR] = True
        warnings.warn(
            f"This UNet erases with ACE adapter(s) {live}, but it receives ControlNet residuals from a "
            "ControlNet that carries no adapter: those residuals read the prompt un-erased and can bring "
            "the concept back. Load the adapter through the ControlNet pipeline itself "
            "(controlnet_pipe.load_ace_adapter(...)), which erases the ControlNet too.",
            stacklevel=2,
        )


def _mark_erased_runs(net: nn.Module) -> None:
    inner = unwrap_model(net)
    if not inner.__dict__.get(_HOOKED_ATTR):
        inner.register_forward_hook(_after_erased_controlnet)
        inner.__dict__[_HOOKED_ATTR] = True


def _check_residuals_of(unet: nn.Module) -> None:
    inner = unwrap_model(unet)
    if not inner.__dict__.get(_HOOKED_ATTR):
        inner.register_forward_pre_hook(_before_unet, with_kwargs=True)
        inner.__dict__[_HOOKED_ATTR] = True
