"""Coexistence with diffusers features that replace attention processors.

An ACE adapter lives in the attention processors of a UNet
(:class:`~ace_diffusers.core.processor.ACEAttnProcessor`
and friends). Several diffusers calls install other processors — ``load_ip_adapter``/``unload_ip_adapter``,
``enable_attention_slicing``, ``set_default_attn_processor``, ``fuse_qkv_projections``, xFormers, a user's
``set_attn_processor`` — and would silently drop the erasure. While at least one ACE adapter is loaded, this
module guards the UNet so that never happens:

* Every ``Attention`` module gets an instance-level ``set_processor`` (the one door every diffusers path goes
  through: ``set_attn_processor``, ``set_attention_slice``, xFormers toggles, IP-Adapter load/unload). A
  requested processor that ACE can carry is translated into its ACE equivalent (``AttnProcessor2_0`` /
  ``AttnProcessor`` -> ``ACEAttnProcessor``, ``SlicedAttnProcessor(n)`` -> ``ACESlicedAttnProcessor(n)``,
  IP-Adapter processors -> ``ACEIPAdapterAttnProcessor`` sharing their weights) and remembered as the
  module's *base* processor, which is what the module gets back when the last ACE adapter is unloaded.
  A processor that would bypass ACE on a cross-attention module raises :class:`ACECompatibilityError`
  before that module changes. Self-attention modules carry no ACE delta, so they accept any processor.
* The UNet instance gets guarded ``set_attn_processor`` (checks *every* requested processor before any is
  set, so a refusal changes nothing), ``fuse_qkv_projections`` and
  ``set_use_memory_efficient_attention_xformers``
  (refused up front, before diffusers fuses weights or touches a module) and ``set_default_attn_processor``
  (works: keeps ACE, records ``AttnProcessor`` as the base) and ``save_pretrained`` (works, and warns
  that the saved weights are not erased while an unfused adapter is in effect).
* After the last adapter leaves, each module keeps a small ``set_processor`` filter that turns an ACE
  processor into the stock one it stands for, so restoring a stale ``attn_processors`` snapshot leaves
  no ACE processor behind.

Everything is stored in the instances' ``__dict__`` (never on diffusers classes), installed with the first
adapter and removed with the last one. See ``docs/compatibility.md`` for the per-call table.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

from diffusers.models.attention_processor import (
    CROSS_ATTENTION_PROCESSORS,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    JointAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

from ..core.flux import ACEFluxAttnProcessor
from ..core.joint import ACEJointAttnProcessor
from ..core.processor import (
    ACE_PROCESSORS,
    ACEAttnProcessor,
    ACEIPAdapterAttnProcessor,
    ACESanaAttnProcessor,
    ACESlicedAttnProcessor,
    get_stack,
)
from ..errors import ACECompatibilityError
from .modules import attention_modules, reads_text

STOCK_PROCESSORS = (AttnProcessor2_0, AttnProcessor)
IP_ADAPTER_PROCESSORS = (IPAdapterAttnProcessor2_0, IPAdapterAttnProcessor)
_BASE_ATTR = "_ace_base_processor"  # Attention.__dict__: the processor restored when ACE is unloaded
_GUARDS_ATTR = "_ace_guarded_methods"  # UNet.__dict__: names of the instance-level guards installed
_SHARED = ACEAttnProcessor()  # stateless: one instance serves every module
_SHARED_SANA = ACESanaAttnProcessor()
_SHARED_JOINT = ACEJointAttnProcessor()
_SHARED_FLUX = ACEFluxAttnProcessor()
# stock processors with an exact ACE stand-in: {stock class: the shared ACE processor}
STAND_INS = {
    SanaAttnProcessor2_0: _SHARED_SANA,
    JointAttnProcessor2_0: _SHARED_JOINT,
    FluxAttnProcessor: _SHARED_FLUX,
}
ACE_TRANSFORMER_PROCESSORS = (ACESanaAttnProcessor, ACEJointAttnProcessor, ACEFluxAttnProcessor)


def base_processor(attn: nn.Module) -> Any:
    """What ``attn`` would run without ACE: the processor diffusers or the user last asked for."""
    return attn.__dict__.get(_BASE_ATTR, attn.processor)


def guarded(unet: nn.Module) -> bool:
    return _GUARDS_ATTR in unet.__dict__


# ---------------------------------------------------------------------- the policy
def _fix_hint(processor: Any, call: str) -> str:
    name = type(processor).__name__
    loading = call == "load_ace_adapter"
    if "Fused" in name:
        return (
            "ACE edits K and V separately and cannot run on fused QKV projections. Skip "
            "fuse_qkv_projections() "
            "(it saves little in the UNet's small cross-attention K/V), or "
            + (
                "call pipe.unfuse_qkv_projections() before loading the adapter."
                if loading
                else "unload the ACE adapters first (pipe.unload_ace_adapter()) if you accept losing the "
                "erasure."
            )
        )
    if "XFormers" in name:
        return (
            "ACE uses PyTorch's scaled_dot_product_attention, which already dispatches to memory-efficient "
            "and "
            "flash kernels, so xFormers brings little. "
            + (
                "Call pipe.disable_xformers_memory_efficient_attention() before loading the adapter."
                if loading
                else "Skip enable_xformers_memory_efficient_attention(), or unload the ACE adapters first."
            )
        )
    return "Custom processors do not apply the ACE K/V edit. " + (
        "Restore a standard processor first (unet.set_attn_processor(AttnProcessor2_0())), then load the "
        "adapter."
        if loading
        else "Set it on self-attention modules only (pass a dict to set_attn_processor), make it an "
        "ACE-aware "
        "processor (subclass ACEAttnProcessor), or unload the ACE adapters first."
    )


def plan_processor(
    attn: nn.Module, requested: Any, *, name: str = "?", call: str = "set_processor"
) -> tuple[Any, Any]:
    """``(processor to install, base to remember)`` when ``requested`` is set on ``attn`` under ACE.

    Side-effect free; raises :class:`ACECompatibilityError` if ``requested`` would bypass the ACE delta.
    """
    current = attn.processor
    kind = type(requested)
    if isinstance(requested, ACEAttnProcessor):
        if kind is type(current) and getattr(requested, "slice_size", None) is None:
            # a no-argument rebuild of what is there (diffusers' ``proc.__class__()``): keep it
            return current, base_processor(attn)
        slice_size = getattr(requested, "slice_size", None)
        return requested, (SlicedAttnProcessor(slice_size) if slice_size else AttnProcessor2_0())
    if isinstance(requested, ACEIPAdapterAttnProcessor):
        return requested, requested.diffusers_processor()
    if isinstance(requested, ACE_TRANSFORMER_PROCESSORS):
        return requested, stock_equivalent(requested)
    if kind in STOCK_PROCESSORS:
        return _SHARED, requested
    if kind in STAND_INS:
        return STAND_INS[kind], requested
    if kind is SlicedAttnProcessor:
        return ACESlicedAttnProcessor(requested.slice_size), requested
    if not reads_text(attn):
        return requested, requested  # no ACE delta on self-attention: any processor is fine
    if kind in IP_ADAPTER_PROCESSORS:
        return ACEIPAdapterAttnProcessor.wrap(requested), requested
    if call == "load_ace_adapter":
        raise ACECompatibilityError(
            f"Attention layer '{name}' uses {kind.__name__}, which ACE cannot wrap: the ACE K/V edit needs "
            f"one of "
            "diffusers' standard processors (AttnProcessor2_0, AttnProcessor, SlicedAttnProcessor, "
            f"IP-Adapter). "
            f"Nothing was loaded. {_fix_hint(requested, call)}"
        )
    raise ACECompatibilityError(
        f"{call} would replace the ACE processor of cross-attention layer '{name}' with {kind.__name__}, "
        f"which "
        f"bypasses the ACE K/V edit: the erased concepts would silently come back. Nothing was changed. "
        f"{_fix_hint(requested, call)}"
    )


# ---------------------------------------------------------------------- guards
class _SetProcessorGuard:
    """Instance-level ``Attention.set_processor`` while ACE is loaded (plain object: survives deepcopy)."""

    def __init__(self, attn: nn.Module, name: str) -> None:
        self.attn, self.name = attn, name

    def __call__(self, processor: Any) -> None:
        installed, base = plan_processor(self.attn, processor, name=self.name)
        self.attn.__dict__[_BASE_ATTR] = base
        if installed is not self.attn.processor:
            type(self.attn).set_processor(self.attn, installed)


class _StockOnly:
    """Instance-level ``Attention.set_processor`` after the last ACE adapter left: an ACE processor set
    again (a stale ``unet.attn_processors`` snapshot restored after unloading) becomes the stock processor
    it stands for, so no ACE processor outlives the adapters. Any other processor passes through."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def __call__(self, processor: Any) -> None:
        type(self.attn).set_processor(self.attn, stock_equivalent(processor))


def stock_equivalent(processor: Any) -> Any:
    """The diffusers processor an ACE processor stands in for (other processors unchanged)."""
    if isinstance(processor, ACEIPAdapterAttnProcessor):
        return processor.diffusers_processor()
    if isinstance(processor, ACESlicedAttnProcessor) and processor.slice_size:
        return SlicedAttnProcessor(processor.slice_size)
    if isinstance(processor, ACESanaAttnProcessor):
        return SanaAttnProcessor2_0()
    if isinstance(processor, ACEJointAttnProcessor):
        return JointAttnProcessor2_0()
    if isinstance(processor, ACEFluxAttnProcessor):
        return FluxAttnProcessor()
    if isinstance(processor, ACEAttnProcessor):
        return AttnProcessor2_0()
    return processor


def adapters_in_effect(unet: nn.Module) -> list[str]:
    """Loaded adapters whose gated path changes outputs now (active, scaled, enabled; fused ones are off)."""
    names: dict[str, None] = {}
    for attn in attention_modules(unet).values():
        stack = get_stack(attn) if reads_text(attn) else None
        for name, delta in (stack.adapters.items() if stack is not None else ()):
            if float(delta.multiplier(stack.enabled)) != 0.0:
                names[name] = None
    return list(names)


def _unet_save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    live = adapters_in_effect(self)
    if live:
        warnings.warn(
            f"Saving a UNet whose ACE adapter(s) {live} are loaded but not fused: the saved weights are the "
            "original, un-erased model. To ship the erasure, fuse it first (pipe.fuse_ace_adapter()), or "
            "save / push the adapter itself (ACEAdapter.save_pretrained, push_to_hub) for "
            "pipe.load_ace_adapter().",
            stacklevel=3,
        )
    return type(self).save_pretrained(self, *args, **kwargs)


def _unet_set_attn_processor(self: nn.Module, processor: Any) -> None:
    # check every module first, so that a refusal leaves the whole UNet unchanged
    for name, attn in attention_modules(self).items():
        requested = processor.get(f"{name}.processor") if isinstance(processor, dict) else processor
        if requested is not None:
            plan_processor(attn, requested, name=name, call="set_attn_processor")
    type(self).set_attn_processor(self, processor)  # each module's guard translates its processor


def _unet_fuse_qkv_projections(self: nn.Module) -> None:
    # the pipeline's fuse_qkv_projections sets ``fusing_unet`` before calling us: make its later
    # unfuse_qkv_projections a no-op instead of an AttributeError (diffusers' fuse sets this first too)
    self.__dict__.setdefault("original_attn_processors", None)
    name, attn = next((n, a) for n, a in attention_modules(self).items() if reads_text(a))
    plan_processor(attn, FusedAttnProcessor2_0(), name=name, call="fuse_qkv_projections")  # raises today
    type(self).fuse_qkv_projections(self)


def _unet_set_use_memory_efficient_attention_xformers(
    self: nn.Module, valid: bool, attention_op: Any = None
) -> None:
    if valid:
        name, attn = next((n, a) for n, a in attention_modules(self).items() if reads_text(a))
        plan_processor(
            attn, XFormersAttnProcessor(), name=name, call="enable_xformers_memory_efficient_attention"
        )
    type(self).set_use_memory_efficient_attention_xformers(self, valid, attention_op)


def _unet_set_default_attn_processor(self: nn.Module) -> None:
    bases = [base_processor(attn) for attn in attention_modules(self).values()]
    if not all(type(base) in CROSS_ATTENTION_PROCESSORS for base in bases):
        odd = next(type(b).__name__ for b in bases if type(b) not in CROSS_ATTENTION_PROCESSORS)
        raise ValueError(
            f"Cannot call `set_default_attn_processor` when attention processors are of type {odd}"
        )
    self.set_attn_processor(AttnProcessor())  # guarded: ACE stays, AttnProcessor becomes the base


_UNET_GUARDS = {
    "set_attn_processor": _unet_set_attn_processor,
    "fuse_qkv_projections": _unet_fuse_qkv_projections,
    "set_use_memory_efficient_attention_xformers": _unet_set_use_memory_efficient_attention_xformers,
    "set_default_attn_processor": _unet_set_default_attn_processor,
    "save_pretrained": _unet_save_pretrained,
}


def check_can_carry(modules: dict[str, nn.Module]) -> None:
    """Raise (changing nothing) unless ACE can be installed on every module's current processor."""
    for name, attn in modules.items():
        if isinstance(attn.processor, FluxAttnProcessor) and getattr(attn, "fused_projections", False):
            # FLUX fuses without changing the processor (which then reads to_qkv): check the module
            raise ACECompatibilityError(
                f"Attention layer '{name}' runs fused QKV projections, which bypass the ACE K/V edit. "
                f"Nothing was loaded. {_fix_hint(FusedAttnProcessor2_0(), 'load_ace_adapter')}"
            )
        plan_processor(attn, attn.processor, name=name, call="load_ace_adapter")


def install(unet: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Install ACE processors on ``modules`` (all attention modules of ``unet``) and the guards. "
    "Idempotent."""
    if guarded(unet):
        return
    check_can_carry(modules)
    for name, attn in modules.items():
        installed, base = plan_processor(attn, attn.processor, name=name, call="load_ace_adapter")
        attn.__dict__[_BASE_ATTR] = base
        if installed is not attn.processor:
            type(attn).set_processor(attn, installed)
        attn.__dict__["set_processor"] = _SetProcessorGuard(attn, name)
    for method, function in _UNET_GUARDS.items():
        unet.__dict__[method] = types.MethodType(function, unet)
    unet.__dict__[_GUARDS_ATTR] = sorted(_UNET_GUARDS)


def uninstall(unet: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Remove the guards and put every module's base processor back (where an ACE processor runs)."""
    for method in unet.__dict__.pop(_GUARDS_ATTR, []):
        unet.__dict__.pop(method, None)
    for attn in modules.values():
        attn.__dict__["set_processor"] = _StockOnly(attn)
        base = attn.__dict__.pop(_BASE_ATTR, None)
        if isinstance(attn.processor, (*ACE_PROCESSORS, *ACE_TRANSFORMER_PROCESSORS)):
            type(attn).set_processor(attn, base if base is not None else AttnProcessor2_0())
