"""Fuse an ACE adapter into the UNet's own ``to_k`` / ``to_v`` weights (and undo it bit-exactly).

Fusing (:func:`fuse_adapter`) writes ``W + ΔW`` — the baked edit of :func:`.bake.bake` — into the
weights in place, keeps a CPU copy of the original weights, and switches the adapter's gated path off
(its ``active`` multiplier is set to 0), so nothing is applied twice. :func:`unfuse_adapter` copies the
originals back (bit-exact) and switches the gated path back on. The fuse call returns the
:func:`.fidelity.fidelity` figures of each fused adapter and keeps them (:func:`fused_reports`).

An adapter with a pooled-embedding edit (SDXL) is fused into ``add_embedding.linear_1`` too: that layer
reads ``[p, t]`` (pooled embedding, time ids), so replacing ``p`` by ``p + s·B_p A_p p`` (the edit with its
gate at 1, as the K/V bake averages the gate away) is ``W[:, :d] ← W[:, :d] (I + s·B_p A_p)``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.adapter import ACEAdapter
from ..core.factors import PROJECTIONS
from ..errors import ACEAdapterNameError, ACECompatibilityError, ACEValueError
from ..integration.attach import (
    active_adapters,
    adapter_deltas,
    adapter_scale,
    loaded_adapters,
    single_loaded_adapter,
)
from ..integration.carriers import controlnets
from ..integration.consistency import changing_state
from ..integration.modules import (
    cross_attention_modules,
    get_unet,
    kv_projection_names,
    kv_projections,
    pooled_embedding_module,
    projection_weight,
)
from .bake import BakedEdit, BakeSettings, bake
from .fidelity import fidelity

FUSED_ATTR = "_ace_fused"


@dataclass
class FusedAdapter:
    """One fused adapter: its baked edit, fidelity report and the gated path's switch before fusing."""

    baked: BakedEdit
    report: dict[str, dict[str, float]]
    active_before: float
    pooled_delta: torch.Tensor | None = None  # float64 change of add_embedding.linear_1's weight (SDXL)


@dataclass
class FusedState:
    """What a UNet with fused adapters keeps (in its ``__dict__``) to unfuse them bit-exactly."""

    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # CPU copies, original dtype
    adapters: dict[str, FusedAdapter] = field(default_factory=dict)  # in fuse order
    pooled_original: torch.Tensor | None = None  # add_embedding.linear_1's weight before fusing (SDXL)


def fuse_fidelity(
    pipe: Any,
    adapter: ACEAdapter | str | None = None,
    prompt_sets: Mapping[str, Sequence[str]] | None = None,
    *,
    scale: float | None = None,
    settings: BakeSettings | None = None,
) -> dict[str, dict[str, float]]:
    """Fidelity figures of fusing ``adapter`` into ``pipe`` (see :func:`fidelity`); changes nothing.

    ``adapter``: an :class:`ACEAdapter`, the name of one loaded in ``pipe``, or ``None`` for the only
    loaded one. ``scale``: default the loaded adapter's current scale (1.0 for an adapter object).
    If adapters are fused, ``base`` is the model before fusing.
    """
    unet = get_unet(pipe)
    if not isinstance(adapter, ACEAdapter):
        name = single_loaded_adapter(unet, adapter)
        adapter = loaded_adapters(unet)[name]
        if scale is None:
            scale = adapter_scale(unet, name)
    scale = 1.0 if scale is None else float(scale)
    baked = bake(pipe, adapter, scale=scale, settings=settings)
    state = fused_state(unet)
    base_weights = None
    if state is not None:  # measure against the weights as they were before anything was fused
        layers = {layer for layer, _ in state.originals}
        base_weights = {
            layer: (state.originals[(layer, "k")], state.originals[(layer, "v")]) for layer in layers
        }
    return fidelity(pipe, adapter, baked, prompt_sets, scale=scale, base_weights=base_weights)


# ---------------------------------------------------------------------- fuse / unfuse
def fused_state(unet: nn.Module) -> FusedState | None:
    """The fuse record of ``unet``, or None when nothing is fused."""
    state = unet.__dict__.get(FUSED_ATTR)
    return state if isinstance(state, FusedState) else None


def fused_reports(pipe: Any) -> dict[str, dict[str, dict[str, float]]]:
    """``{adapter name: fidelity report}`` of every adapter currently fused into ``pipe``'s UNet."""
    state = fused_state(get_unet(pipe))
    return {name: rec.report for name, rec in state.adapters.items()} if state else {}


def get_fused_adapters(pipe: Any) -> list[str]:
    """Names of the ACE adapters currently fused into the weights, in fuse order."""
    return list(fused_reports(pipe))


def _names_to_fuse(
    unet: nn.Module, adapter_name: str | Sequence[str] | None, state: FusedState | None
) -> list[str]:
    loaded = loaded_adapters(unet)
    fused = list(state.adapters) if state else []
    if adapter_name is None:
        names = active_adapters(unet)
        if not names:
            hint = f" ({fused} already fused)" if fused else ""
            raise ACEValueError(
                f"No active ACE adapter to fuse{hint}; loaded: {list(loaded)}. Load one, activate it with "
                "set_ace_adapters(), or pass adapter_name."
            )
        return names
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise ACEValueError(
            "adapter_name is an empty list; pass a name, a list of names or None (all active)."
        )
    for name in names:
        if name not in loaded:
            raise ACEAdapterNameError(f"No ACE adapter named '{name}' is loaded (loaded: {list(loaded)}).")
        if name in fused:
            raise ACEValueError(
                f"ACE adapter '{name}' is already fused into the weights; call unfuse_ace_adapter() before "
                f"fusing it again."
            )
    if len(set(names)) != len(names):
        raise ACEValueError(f"adapter_name lists a name twice: {names}.")
    return names


@torch.no_grad()
def fuse_adapter(
    pipe: Any,
    adapter_name: str | Sequence[str] | None = None,
    *,
    settings: BakeSettings | None = None,
    prompt_sets: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Write ACE adapter(s) into the UNet's ``to_k``/``to_v`` weights, like diffusers' ``fuse_lora``.

    ``adapter_name``: one name, a list, or ``None`` for every active adapter. Each adapter is baked at
    its current scale (:func:`bake`), added to the weights in place, and its gated path is switched
    off so it is not applied twice. The original weights are kept (on CPU) for :func:`unfuse_adapter`.
    After fusing, ``pipe.save_pretrained`` writes an ordinary diffusers model carrying the erasure
    (also after ``unload_ace_adapter``).

    Returns ``{adapter name: fidelity report}`` (:func:`fidelity`, on ``prompt_sets`` or the
    adapter's own prompts); also available later from :func:`fused_reports`.
    """
    unet = get_unet(pipe)
    state = fused_state(unet)
    names = _names_to_fuse(unet, adapter_name, state)
    carried = [n for net in controlnets(pipe) for n in names if n in loaded_adapters(net)]
    if carried:
        raise ACECompatibilityError(
            f"Adapter(s) {sorted(set(carried))} also erase this pipeline's ControlNet, and fusing writes "
            "only "
            "the UNet's weights: a fused checkpoint would ship an un-erased ControlNet. Keep the adapter "
            "loaded (not fused) on ControlNet pipelines, or fuse on the pipeline without the ControlNet."
        )
    modules = cross_attention_modules(unet)
    loaded = loaded_adapters(unet)

    # Everything is computed before anything changes: a failure leaves the pipeline as it was.
    planned: dict[str, FusedAdapter] = {}
    base = {n: tuple(projection_weight(p) for p in kv_projections(m)) for n, m in modules.items()}
    for name in names:
        adapter = loaded[name]
        baked = bake(pipe, adapter, scale=adapter_scale(unet, name), settings=settings)
        report = fidelity(pipe, adapter, baked, prompt_sets, base_weights=base)
        delta = next(iter(adapter_deltas(unet, name)))
        original = state.pooled_original if state is not None else None
        pooled = pooled_weight_delta(unet, adapter, adapter_scale(unet, name), original)
        planned[name] = FusedAdapter(baked, report, float(delta.active), pooled)

    with changing_state(unet):  # no forward of another thread sees half-fused weights
        if state is None:
            state = FusedState()
            unet.__dict__[FUSED_ATTR] = state
        for layer, attn in modules.items():
            for proj, linear in zip(PROJECTIONS, kv_projections(attn), strict=True):
                weight = projection_weight(linear)
                key = (layer, proj)
                if key not in state.originals:
                    state.originals[key] = weight.detach().to("cpu", copy=True)
                new = weight.detach().cpu()
                for record in planned.values():
                    new = _add_delta(new, record.baked.layers[layer].delta_weight(proj))
                write_weight(weight, new)
        _fuse_pooled(unet, state, [r.pooled_delta for r in planned.values() if r.pooled_delta is not None])
        for name, record in planned.items():
            for delta in adapter_deltas(unet, name):
                delta.active.fill_(0.0)
            state.adapters[name] = record
    return {name: record.report for name, record in planned.items()}


def pooled_weight_delta(
    unet: nn.Module, adapter: ACEAdapter, scale: float, original: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``W[:, :d] · s·B_p A_p`` padded with zero columns to ``add_embedding.linear_1``'s weight (float64,
    CPU): what fusing ``adapter``'s pooled edit adds to it; None without a pooled edit. ``W`` is the
    weight before anything was fused (``original``, if some adapter is), as the hook adds every adapter's
    edit of the same ``p``."""
    module = pooled_embedding_module(unet)
    if adapter.pooled is None or module is None:
        return None
    weight = original if original is not None else projection_weight(module.linear_1).detach()
    weight = weight.cpu().double()
    dim = adapter.pooled.dim
    delta = torch.zeros_like(weight)
    delta[:, :dim] = weight[:, :dim] @ (adapter.pooled.pooled_weight().double() * float(scale))
    return delta


def _fuse_pooled(unet: nn.Module, state: FusedState, deltas: list[torch.Tensor]) -> None:
    if not deltas:
        return
    weight = projection_weight(pooled_embedding_module(unet).linear_1)
    if state.pooled_original is None:
        state.pooled_original = weight.detach().to("cpu", copy=True)
    new = weight.detach().cpu()
    for delta in deltas:
        new = _add_delta(new, delta)
    write_weight(weight, new)


def write_weight(weight: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``weight`` in place, as an ordinary in-place write: unlike ``weight.data.copy_``
    it advances the parameter's version counter, which caches of anything computed from the weights
    (the miner's query bank) read to know they are stale."""
    with torch.no_grad():
        weight.copy_(value.to(weight.device))


def _add_delta(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight + delta`` computed in float64 and rounded once to the weight's dtype (CPU)."""
    return (weight.double() + delta).to(weight.dtype)


@torch.no_grad()
def unfuse_adapter(pipe: Any) -> list[str]:
    """Undo :func:`fuse_adapter` for every fused adapter: original weights back bit-exactly, gated path on.

    If something else changed the fused weights meanwhile (e.g. a PEFT ``fuse_lora``), the ACE part is
    subtracted instead (approximately, with a warning) so that the other change survives.
    Returns the names that were unfused.
    """
    unet = get_unet(pipe)
    state = fused_state(unet)
    if state is None or not state.adapters:
        raise ACEValueError("No ACE adapter is fused into this pipeline's weights; nothing to unfuse.")
    with changing_state(unet):  # weights back and gated path on, in one step for other threads
        changed = _restore_weights(unet, state)
        loaded = loaded_adapters(unet)
        for name, record in state.adapters.items():
            if name in loaded:
                for delta in adapter_deltas(unet, name):
                    delta.active.fill_(record.active_before)
    if changed:
        warnings.warn(
            f"{len(changed)} fused weights (e.g. {changed[0]}) were changed after fuse_ace_adapter(); the "
            "ACE "
            "edit was subtracted from them instead of restoring the originals, so they are not bit-exact.",
            stacklevel=2,
        )
    names = list(state.adapters)
    del unet.__dict__[FUSED_ATTR]
    return names


def _restore_weights(unet: nn.Module, state: FusedState) -> list[str]:
    """Put the original K/V (and pooled-input) weights back; returns the weights changed since fusing (ACE
    part subtracted)."""
    modules = cross_attention_modules(unet)
    changed = []
    for (layer, proj), original in state.originals.items():
        linear = dict(zip(PROJECTIONS, kv_projections(modules[layer]), strict=True))[proj]
        deltas = [record.baked.layers[layer].delta_weight(proj) for record in state.adapters.values()]
        if not _restore(projection_weight(linear), original, deltas):
            names = dict(zip(PROJECTIONS, kv_projection_names(modules[layer]), strict=True))
            changed.append(f"{layer}.{names[proj]}")
    if state.pooled_original is not None:
        deltas = [r.pooled_delta for r in state.adapters.values() if r.pooled_delta is not None]
        weight = projection_weight(pooled_embedding_module(unet).linear_1)
        if not _restore(weight, state.pooled_original, deltas):
            changed.append("add_embedding.linear_1")
    return changed


def _restore(weight: torch.Tensor, original: torch.Tensor, deltas: list[torch.Tensor]) -> bool:
    """Put ``original`` back if ``weight`` is still original + ``deltas`` (True); else subtract them."""
    expected = original
    for delta in deltas:
        expected = _add_delta(expected, delta)
    current = weight.detach().cpu()
    if current.dtype == expected.dtype and torch.equal(current, expected):
        write_weight(weight, original)
        return True
    applied = expected.double() - original.double()
    write_weight(weight, (current.double() - applied).to(weight.dtype))
    return False


def check_not_fused(pipe: Any, names: str | Sequence[str]) -> None:
    """Raise if any of ``names`` is fused (re-activating its gated path would apply it twice)."""
    names = [names] if isinstance(names, str) else list(names)
    state = fused_state(get_unet(pipe))
    fused = [n for n in names if state and n in state.adapters]
    if fused:
        raise ACEValueError(
            f"ACE adapter(s) {fused} are fused into the weights; activating their gated path would apply "
            "them "
            "twice. Call unfuse_ace_adapter() first."
        )


@contextlib.contextmanager
def fused(
    pipe: Any, adapter_name: str | Sequence[str] | None = None, **fuse_kwargs: Any
) -> Iterator[dict[str, dict[str, dict[str, float]]]]:
    """``with fused(pipe) as report: ...`` — fuse for the block, unfuse (bit-exact) afterwards.

    Handy for evaluating the fused model with the same pipeline object. Nothing may be fused already.
    """
    already = get_fused_adapters(pipe)
    if already:
        raise ACEValueError(f"ACE adapter(s) {already} are already fused; unfuse them before using fused().")
    report = fuse_adapter(pipe, adapter_name, **fuse_kwargs)
    try:
        yield report
    finally:
        unfuse_adapter(pipe)
