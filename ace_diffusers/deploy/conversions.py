"""diffusers conversions that rebuild a UNet as another model: the new model keeps the erasure.

AnimateDiff-style pipelines (AnimateDiff and its SDXL, ControlNet, SparseCtrl, video-to-video and PAG
variants, PIA) turn an SD UNet into a ``UNetMotionModel`` with ``UNetMotionModel.from_unet2d``, which
copies the weights through ``state_dict()``. ACE's tensors are non-persistent buffers, so that they never
enter a saved checkpoint; the copy therefore left them behind and
``AnimateDiffPipeline.from_pipe(erased_pipe, motion_adapter=...)`` made un-erased videos, silently.

``import ace_diffusers`` wraps that one classmethod (the only diffusers class attribute ace-diffusers
replaces; see :mod:`ace_diffusers._verbs`, and ``ace_diffusers.remove_pipeline_methods()`` restores it).
The wrapper calls diffusers' own conversion, then :func:`carry_adapters` attaches the source's adapters
to the new model under the same names, with the same scales, active set and on/off switch. The motion
UNet's spatial cross-attention layers have the names and shapes of the source's, so every adapter fits;
its motion modules attend over time, not to the text, and carry nothing. Adapters fused into the
source's weights arrive fused (the weights are copied) and stay unfusable on the new model.
"""

from __future__ import annotations

from torch import nn

from ..integration.attach import (
    adapter_deltas,
    adapter_scale,
    adapter_stacks,
    attach_adapter,
    loaded_adapters,
    set_active_adapters,
    set_enabled,
)
from ..integration.modules import unwrap_model
from .fuse import FUSED_ATTR, FusedState, fused_state


def carry_adapters(source: nn.Module, target: nn.Module) -> list[str]:
    """Attach ``source``'s ACE adapters to ``target`` (a model rebuilt from it) in the same state.

    Returns the names carried. Raises (from :func:`attach_adapter`) if an adapter does not fit ``target``,
    so a conversion never yields an un-erased model quietly.
    """
    source, target = unwrap_model(source), unwrap_model(target)
    adapters = loaded_adapters(source)
    if not adapters:
        return []
    for name, adapter in adapters.items():
        attach_adapter(target, adapter, name, scale=adapter_scale(source, name))
    active = [n for n in adapters if float(next(iter(adapter_deltas(source, n))).active) != 0.0]
    set_active_adapters(target, active)
    set_enabled(target, float(next(iter(adapter_stacks(source))).enabled) != 0.0)
    state = fused_state(source)
    if state is not None:  # the fused weights came with the copy; so does the record that undoes them
        target.__dict__[FUSED_ATTR] = FusedState(
            dict(state.originals), dict(state.adapters), state.pooled_original
        )
    return list(adapters)
