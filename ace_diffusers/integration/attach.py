"""Model-level injection: put ACE adapters on a ``UNet2DConditionModel`` and take them off again.

This is the layer under the pipeline verbs (like diffusers' model-level ``load_lora_adapter`` under
``load_lora_weights``). Attaching installs one stateless :class:`ACEAttnProcessor` on every attention
module and an :class:`ACEAdapterStack` on every cross-attention module; detaching the last adapter
restores the exact processor objects that were there before (tomesd-style undoable patch). While adapters
are loaded, :mod:`ace_diffusers.integration.compat` guards the UNet against diffusers calls that would replace
the ACE
processors. Every function accepts a ``torch.compile``-wrapped UNet too.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..core.adapter import ACEAdapter
from ..core.factors import LayerFactors, PooledFactors, all_finite
from ..core.flux import install_text_length_hooks, remove_text_length_hooks
from ..core.pooled import (
    ACEPooledDelta,
    ACEPooledStack,
    get_pooled_stack,
    install_pooled_stack,
    uninstall_pooled_stack,
)
from ..core.processor import ACE_STACK_ATTR, ACEAdapterStack, ACELayerDelta, get_stack
from ..errors import (
    ACEAdapterFormatError,
    ACEAdapterNameError,
    ACEArchitectureMismatchError,
    ACECompatibilityError,
    ACEPooledPathWarning,
    ACEValueError,
)
from . import compat
from .consistency import changing_state
from .modules import (
    attention_modules,
    cross_attention_modules,
    kv_projections,
    layer_shapes,
    pooled_embedding_module,
    pooled_width_problem,
    projection_weight,
    unwrap_model,
)

_ADAPTERS_ATTR = "_ace_adapters"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def validate_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ACEAdapterNameError(
            f"Invalid adapter name {name!r}: use 1-64 characters from letters, digits, '_' and '-'."
        )
    return name


def loaded_adapters(unet: nn.Module) -> dict[str, ACEAdapter]:
    """Loaded adapters in load order (a live view: do not mutate)."""
    return unwrap_model(unet).__dict__.setdefault(_ADAPTERS_ATTR, {})


def default_adapter_name(unet: nn.Module, adapter: ACEAdapter) -> str:
    """A free name derived from the adapter's first concept (``van_gogh``, ``van_gogh_2``, ...)."""
    base = re.sub(
        r"[^A-Za-z0-9_-]+", "_", (adapter.concepts[0] if adapter.concepts else "ace").strip().lower()
    )
    base = base.strip("_")[:48] or "ace"
    if len(adapter.concepts) > 1:
        base = f"{base}_and_{len(adapter.concepts) - 1}_more"
    taken = loaded_adapters(unet)
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def single_loaded_adapter(unet: nn.Module, name: str | None) -> str:
    """``name`` if that adapter is loaded; with ``None``, the only loaded adapter's name."""
    loaded = loaded_adapters(unet)
    if name is None:
        if len(loaded) != 1:
            raise ACEAdapterNameError(
                f"{len(loaded)} ACE adapters are loaded ({list(loaded)}); pass adapter_name."
            )
        return next(iter(loaded))
    if name not in loaded:
        raise ACEAdapterNameError(f"No ACE adapter named '{name}' is loaded (loaded: {list(loaded)}).")
    return name


MAX_SCALE = 1e4  # far beyond any useful strength; larger values overflow half-precision K/V


def check_scale(value: Any) -> float:
    """``value`` as a float if it is a usable adapter scale (a real, finite number, within ±MAX_SCALE).

    Python numbers, NumPy scalars and 0-d tensors are accepted; strings, booleans and NaN/inf are refused.
    """
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise ACEValueError(f"Adapter scales must be real numbers such as 1.0 or 0.5, got {value!r}.")
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise ACEValueError(
            f"An adapter scale must be one number, got a tensor of shape {tuple(value.shape)}."
        )
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ACEValueError(
            f"Adapter scales must be real numbers such as 1.0 or 0.5, got {value!r}."
        ) from err
    if not math.isfinite(number) or abs(number) > MAX_SCALE:
        raise ACEValueError(
            f"Adapter scale {number!r} is not usable: it must be finite and within ±{MAX_SCALE:g} "
            "(1.0 is the fitted strength, 0 switches the adapter off)."
        )
    return number


MAX_DELTA_RATIO = 100.0  # an edit 100x larger than the projection it edits is no erasure but damage
MAX_GATE = 1e4  # fitted gate weights and biases are tens; the sigmoid saturates long before this


def gate_reach(factors: LayerFactors | PooledFactors) -> float:
    """The largest gate weight or bias magnitude (bounded by :data:`MAX_GATE`)."""
    return max(float(factors.gate_weight.float().abs().max()), float(factors.gate_bias.float().abs().max()))


def check_factors_fit_layer(layer: str, factors: LayerFactors, attn: nn.Module) -> None:
    """Refuse factors that cannot give finite, meaningful outputs on ``attn`` in its dtype.

    Run *after* the cast to the layer's dtype, so values beyond float16's range (65504) are caught as
    what they become there (inf). Bounds: ``‖B A‖_F ≤ MAX_DELTA_RATIO · ‖W‖_F`` for K and V (a fitted
    erasure moves the concept's directions, so it is at most about as large as ``W``), and gate weights
    and bias within ``MAX_GATE``.
    """
    dtype = projection_weight(kv_projections(attn)[0]).dtype
    for key, t in factors.tensors().items():
        if not all_finite(t):
            raise ACEAdapterFormatError(
                f"Layer '{layer}': tensor '{key}' is not finite in {dtype} (NaN, Inf, or values beyond "
                f"the range of {dtype}). Load the pipeline in float32 (or bfloat16), or use another adapter."
            )
    for projection, proj in zip(("k", "v"), kv_projections(attn), strict=True):
        edit = float(torch.linalg.matrix_norm(factors.delta_weight(projection).detach().float()))
        limit = MAX_DELTA_RATIO * float(torch.linalg.matrix_norm(projection_weight(proj).detach().float()))
        if not edit <= limit:
            raise ACEAdapterFormatError(
                f"Layer '{layer}': the {projection.upper()} edit has norm {edit:.3g}, over "
                f"{MAX_DELTA_RATIO:g}x the projection it edits ({limit / MAX_DELTA_RATIO:.3g}); the adapter "
                "file is corrupted or was made for another model. Re-download it or fit a new one."
            )
    gate = gate_reach(factors)
    if not gate <= MAX_GATE:
        raise ACEAdapterFormatError(
            f"Layer '{layer}': gate values reach {gate:.3g}, beyond {MAX_GATE:g}; the adapter file is "
            "corrupted. Re-download it or fit a new one."
        )


def materialized(adapter: ACEAdapter, unet: nn.Module) -> ACEAdapter:
    """``adapter`` with its per-layer factors rebuilt from ``unet``'s K/V weights if it was read in the
    text-space form (:attr:`ACEAdapter.pending`), else itself; checks the architecture first."""
    if not adapter.pending:
        return adapter
    modules = cross_attention_modules(unet)
    adapter.check_compatible(layer_shapes(unet))
    weights = {}
    for layer in adapter.shapes:
        w_k, w_v = (projection_weight(p).detach() for p in kv_projections(modules[layer]))
        weights[layer] = (w_k.float().cpu(), w_v.float().cpu())
    return adapter.to(torch.float32).materialized(weights)


def attach_adapter(unet: nn.Module, adapter: ACEAdapter, name: str, *, scale: float = 1.0) -> None:
    """Attach ``adapter`` under ``name``; all-or-nothing (nothing changes if any check fails). A pending
    adapter (text-space file) is rebuilt on ``unet`` first (:func:`materialized`)."""
    with changing_state(unet):
        unet = unwrap_model(unet)
        validate_adapter_name(name)
        scale = check_scale(scale)
        adapters = loaded_adapters(unet)
        if name in adapters:
            raise ACEAdapterNameError(
                f"An ACE adapter named '{name}' is already loaded; pass another adapter_name or unload it "
                f"first (loaded: {list(adapters)})."
            )
        modules = cross_attention_modules(unet)
        if not modules:
            raise ACECompatibilityError(
                "This UNet has no cross-attention layers, so it cannot carry an ACE adapter."
            )
        adapter = materialized(adapter, unet)
        adapter.check_compatible(layer_shapes(unet))
        compat.check_can_carry(attention_modules(unet))

        deltas = {}
        for layer, attn in modules.items():
            ref = projection_weight(kv_projections(attn)[0])
            factors = adapter.layers[layer].to(device=ref.device, dtype=ref.dtype)
            check_factors_fit_layer(layer, factors, attn)
            deltas[layer] = ACELayerDelta(**factors.tensors(), scale=scale)
        pooled = _pooled_delta(unet, adapter, scale)

        compat.install(unet, attention_modules(unet))
        install_text_length_hooks(unet)  # FLUX single-stream blocks: their attention learns the text length
        for layer, attn in modules.items():
            stack = get_stack(attn)
            if stack is None:
                stack = ACEAdapterStack(projection_weight(kv_projections(attn)[0]))
                attn.add_module(ACE_STACK_ATTR, stack)
            stack.adapters[name] = deltas[layer]
        if pooled is not None:
            module = pooled_embedding_module(unet)
            install_pooled_stack(module, adapter.pooled.dim, projection_weight(module.linear_1)).adapters[
                name
            ] = pooled
        adapters[name] = adapter


def _pooled_delta(unet: nn.Module, adapter: ACEAdapter, scale: float) -> ACEPooledDelta | None:
    """The run-time pooled edit of ``adapter`` on ``unet`` (checked), or None; warns when ``unet`` reads a
    pooled embedding the adapter does not edit."""
    module = pooled_embedding_module(unet)
    if adapter.pooled is None:
        if module is not None:
            warnings.warn(
                f"ACE adapter {adapter.concepts[:3]} edits the cross-attention only, but this model also "
                "reads a pooled text embedding (SDXL's text_embeds, SD3's and FLUX's pooled_projections), "
                "which still carries the concept. "
                "Re-fit the adapter with this ace-diffusers (erase_concept / ACETrainer fit the pooled edit "
                "too).",
                ACEPooledPathWarning,
                stacklevel=4,
            )
        return None
    problem = pooled_width_problem(unet, adapter.pooled.dim)
    if problem is not None:
        raise ACEArchitectureMismatchError(
            f"The adapter edits a {adapter.pooled.dim}-d pooled text embedding, but {problem}. Load an "
            "adapter fitted for this base model, or fit a new one with erase_concept()."
        )
    weight = projection_weight(module.linear_1)
    factors = adapter.pooled.to(device=weight.device, dtype=weight.dtype)
    problem = factors.problems()
    if problem is not None:
        raise ACEAdapterFormatError(
            f"The pooled-embedding edit does not fit this UNet's dtype {weight.dtype}: {problem}. Load the "
            "pipeline in float32 (or bfloat16), or use another adapter."
        )
    # the edit maps p to p + g·B A p: bounded by MAX_DELTA_RATIO times the identity it adds to, as K/V are
    edit = float(torch.linalg.matrix_norm(factors.pooled_weight().detach().float()))
    gate = gate_reach(factors)
    if not (edit <= MAX_DELTA_RATIO * factors.dim**0.5 and gate <= MAX_GATE):
        raise ACEAdapterFormatError(
            f"The pooled-embedding edit has norm {edit:.3g} and gate values up to {gate:.3g}, beyond "
            f"{MAX_DELTA_RATIO:g}x the identity it adds to or {MAX_GATE:g}; the adapter file is corrupted. "
            "Re-download it or fit a new one."
        )
    return ACEPooledDelta(**factors.tensors(), scale=scale)


def detach_adapter(unet: nn.Module, name: str) -> ACEAdapter:
    with changing_state(unet):
        unet = unwrap_model(unet)
        adapters = loaded_adapters(unet)
        if name not in adapters:
            raise ACEAdapterNameError(f"No ACE adapter named '{name}' is loaded (loaded: {list(adapters)}).")
        for attn in cross_attention_modules(unet).values():
            stack = get_stack(attn)
            if stack is not None and name in stack.adapters:
                del stack.adapters[name]
        pooled = _pooled_stack(unet)
        if pooled is not None and name in pooled.adapters:
            del pooled.adapters[name]
        adapter = adapters.pop(name)
        if not adapters:
            _uninstall(unet)
        return adapter


def adapter_deltas(unet: nn.Module, name: str) -> Iterable[ACELayerDelta | ACEPooledDelta]:
    """The buffers of adapter ``name`` in every cross-attention layer, then its pooled edit (if any):
    everything whose switches move together."""
    for stack in adapter_stacks(unet):
        if name in stack.adapters:
            yield stack.adapters[name]


def adapter_stacks(unet: nn.Module) -> Iterable[ACEAdapterStack | ACEPooledStack]:
    """Every cross-attention layer's adapter store, then the pooled embedding's (if any)."""
    for attn in cross_attention_modules(unet).values():
        stack = get_stack(attn)
        if stack is not None:
            yield stack
    pooled = _pooled_stack(unet)
    if pooled is not None:
        yield pooled


def _pooled_stack(unet: nn.Module) -> ACEPooledStack | None:
    module = pooled_embedding_module(unet)
    return get_pooled_stack(module) if module is not None else None


def _requested_scales(
    names: list[str], scales: float | list[float] | Mapping[str, float] | None
) -> dict[str, float | None]:
    """``{name: checked scale or None (keep)}``; every value is checked before anything changes."""
    if scales is None:
        scale_of: dict[str, Any] = {n: None for n in names}
    elif isinstance(scales, Mapping):
        scale_of = {n: scales.get(n) for n in names}
    elif isinstance(scales, (int, float)) or getattr(scales, "ndim", None) == 0:  # one for all
        scale_of = {n: check_scale(scales) for n in names}
    else:
        scales = list(scales)
        if len(scales) != len(names):
            raise ACEValueError(
                f"Got {len(names)} adapter names but {len(scales)} scales; pass one scale per name."
            )
        scale_of = dict(zip(names, scales, strict=True))
    return {n: None if v is None else check_scale(v) for n, v in scale_of.items()}


def set_active_adapters(
    unet: nn.Module, names: str | list[str], scales: float | list[float] | Mapping[str, float] | None = None
) -> None:
    """Make exactly ``names`` active (others stay loaded but contribute nothing), with optional scales.

    All-or-nothing, and atomic for concurrent forwards (see :mod:`.consistency`)."""
    names = [names] if isinstance(names, str) else list(names)
    scale_of = _requested_scales(names, scales)
    with changing_state(unet):
        adapters = loaded_adapters(unet)
        unknown = [n for n in names if n not in adapters]
        if unknown:
            raise ACEAdapterNameError(f"Unknown ACE adapter(s) {unknown}; loaded: {list(adapters)}.")
        for adapter_name in adapters:
            for delta in adapter_deltas(unet, adapter_name):
                delta.active.fill_(1.0 if adapter_name in scale_of else 0.0)
                if scale_of.get(adapter_name) is not None:
                    delta.scale.fill_(float(scale_of[adapter_name]))


def set_enabled(unet: nn.Module, enabled: bool) -> None:
    with changing_state(unet):
        for stack in adapter_stacks(unet):
            stack.enabled.fill_(1.0 if enabled else 0.0)


def active_adapters(unet: nn.Module) -> list[str]:
    """Names that currently change the output: loaded, active, enabled and with a non-zero scale."""
    names = []
    for name in loaded_adapters(unet):
        delta = next(iter(adapter_deltas(unet, name)), None)
        stack = next(iter(adapter_stacks(unet)), None)
        if (
            delta is not None
            and stack is not None
            and float(delta.active * delta.scale * stack.enabled) != 0.0
        ):
            names.append(name)
    return names


def adapter_scale(unet: nn.Module, name: str) -> float:
    delta = next(iter(adapter_deltas(unet, name)), None)
    if delta is None:
        raise ACEAdapterNameError(f"No ACE adapter named '{name}' is loaded.")
    return float(delta.scale)


# ---------------------------------------------------------------------- processors
def _uninstall(unet: nn.Module) -> None:
    """Remove every ACE store and the guards; put back the processors ACE stood in for."""
    modules = attention_modules(unet)
    for attn in modules.values():
        if ACE_STACK_ATTR in attn._modules:
            del attn._modules[ACE_STACK_ATTR]
    pooled = pooled_embedding_module(unet)
    if pooled is not None:
        uninstall_pooled_stack(pooled)
    remove_text_length_hooks(unet)
    compat.uninstall(unet, modules)
