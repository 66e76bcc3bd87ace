"""Pipeline verbs: the functional API, and the methods ``import ace_diffusers`` adds to diffusers pipelines.

Attach mechanism (and why): at import we add a handful of methods (``load_ace_adapter``,
``erase_concept``, ...) to ``diffusers.DiffusionPipeline`` itself — the same object every SD/SDXL,
img2img and inpaint pipeline inherits from. We never swap a pipeline's ``__class__`` nor subclass it,
so ``pipe.save_pretrained`` still records the original ``_class_name`` and the folder reloads with
plain ``DiffusionPipeline.from_pretrained``. The patch is undoable (:func:`remove_pipeline_methods`)
and never overwrites an attribute diffusers already defines. Users who prefer no class changes call
the functions below (``ace_diffusers.load_adapter(pipe, ...)``) and can run
``ace_diffusers.remove_pipeline_methods()``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from diffusers import DiffusionPipeline

from .core.adapter import ACEAdapter
from .deploy.conversions import install_conversion_hooks, remove_conversion_hooks
from .deploy.export import export_lora
from .deploy.fuse import check_not_fused, fuse_adapter, fused_state, unfuse_adapter
from .errors import ACEAdapterNameError, ACECompatibilityError
from .fitting.closed_form import erase_concept, prepare_erasure
from .integration import attach, carriers
from .integration.modules import get_unet


def load_adapter(
    pipe: Any,
    adapter: ACEAdapter | str | os.PathLike,
    adapter_name: str | None = None,
    *,
    scale: float = 1.0,
    **hub_kwargs: Any,
) -> str:
    """Load an adapter (object, local folder or Hub repo id) into ``pipe.unet``; return its name.

    ``hub_kwargs``: ``revision``, ``subfolder``, ``cache_dir``, ``token``, ``local_files_only``.
    """
    unet = get_unet(pipe)
    if not isinstance(adapter, ACEAdapter):
        adapter = ACEAdapter.from_pretrained(adapter, **hub_kwargs)
    elif hub_kwargs:
        raise TypeError(f"Hub arguments {sorted(hub_kwargs)} only apply when loading from a path or repo id.")
    name = adapter_name if adapter_name is not None else attach.default_adapter_name(unet, adapter)
    carriers.attach_everywhere(pipe, adapter, name, scale=scale)
    return name


def unload_adapter(pipe: Any, adapter_name: str | list[str] | None = None) -> None:
    """Unload one, several, or (``None``) all ACE adapters; with none left, stock processors return."""
    unet = get_unet(pipe)
    if adapter_name is None:
        names = list(attach.loaded_adapters(unet))
    elif isinstance(adapter_name, str):
        names = [adapter_name]
    else:
        names = list(adapter_name)
    for name in names:
        carriers.detach_everywhere(pipe, name)


def set_adapters(
    pipe: Any, adapter_names: str | list[str], scales: float | list[float] | Mapping[str, float] | None = None
) -> None:
    """Activate exactly ``adapter_names`` (others stay loaded, inactive), optionally setting their scales."""
    check_not_fused(pipe, adapter_names)  # a fused adapter's gated path must stay off
    carriers.set_active_everywhere(pipe, adapter_names, scales)


def enable_adapters(pipe: Any) -> None:
    """Switch all active ACE adapters back on after :func:`disable_adapters`."""
    carriers.set_enabled_everywhere(pipe, True)


def disable_adapters(pipe: Any) -> None:
    """Temporarily switch every ACE adapter off (outputs become bit-identical to the base model).

    Fused adapters live in the UNet's weights and stay in effect: a warning says so at run time.
    """
    unet = get_unet(pipe)
    state = fused_state(unet)
    if state is not None and state.adapters:
        warnings.warn(
            f"disable_ace_adapters() leaves the fused adapter(s) {list(state.adapters)} in effect: their "
            "edit is in the UNet's weights. Call unfuse_ace_adapter() to undo it.",
            stacklevel=2,
        )
    carriers.set_enabled_everywhere(pipe, False)


def get_active_adapters(pipe: Any) -> list[str]:
    return attach.active_adapters(get_unet(pipe))


def get_list_adapters(pipe: Any) -> list[str]:
    return list(attach.loaded_adapters(get_unet(pipe)))


def get_adapter(pipe: Any, adapter_name: str | None = None) -> ACEAdapter:
    """The loaded :class:`ACEAdapter` object named ``adapter_name`` (or the only one loaded)."""
    adapters = attach.loaded_adapters(get_unet(pipe))
    if adapter_name is None:
        if len(adapters) != 1:
            raise ACEAdapterNameError(
                f"{len(adapters)} ACE adapters are loaded ({list(adapters)}); pass adapter_name."
            )
        return next(iter(adapters.values()))
    if adapter_name not in adapters:
        raise ACEAdapterNameError(
            f"No ACE adapter named '{adapter_name}' is loaded (loaded: {list(adapters)})."
        )
    return adapters[adapter_name]


def push_adapter(pipe: Any, repo_id: str, adapter_name: str | None = None, **push_kwargs: Any) -> str:
    """Publish a loaded adapter to the Hub (see :meth:`ACEAdapter.push_to_hub` for ``push_kwargs``)."""
    return get_adapter(pipe, adapter_name).push_to_hub(repo_id, **push_kwargs)


# ---------------------------------------------------------------------- methods on pipelines
def _method(function: Any, name: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return function(self, *args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"DiffusionPipeline.{name}"
    method.__doc__ = function.__doc__
    method.__wrapped__ = function
    return method


def _pipeline_methods() -> dict[str, Any]:
    methods = {
        "load_ace_adapter": load_adapter,
        "unload_ace_adapter": unload_adapter,
        "set_ace_adapters": set_adapters,
        "enable_ace_adapters": enable_adapters,
        "disable_ace_adapters": disable_adapters,
        "get_active_ace_adapters": get_active_adapters,
        "get_list_ace_adapters": get_list_adapters,
        "get_ace_adapter": get_adapter,
        "push_ace_adapter": push_adapter,
        "erase_concept": erase_concept,
        "prepare_erasure": prepare_erasure,
        "fuse_ace_adapter": fuse_adapter,
        "unfuse_ace_adapter": unfuse_adapter,
        "export_ace_lora": export_lora,
    }
    return methods


_installed: dict[str, Any] = {}


def install_pipeline_methods() -> list[str]:
    """Add the ``*_ace_*`` verbs, ``erase_concept`` and ``prepare_erasure`` to ``DiffusionPipeline`` "
    "(idempotent)."""
    for name, function in _pipeline_methods().items():
        if name in _installed:
            continue
        if hasattr(DiffusionPipeline, name):
            raise ACECompatibilityError(
                f"diffusers.DiffusionPipeline already defines '{name}'; refusing to overwrite it. Use the "
                f"functional API (ace_diffusers.{function.__name__}) instead."
            )
        method = _method(function, name)
        setattr(DiffusionPipeline, name, method)
        _installed[name] = method
    install_conversion_hooks()
    return sorted(_installed)


def remove_pipeline_methods() -> None:
    """Undo :func:`install_pipeline_methods`: ``DiffusionPipeline`` (and ``UNetMotionModel.from_unet2d``,
    see :mod:`ace_diffusers.deploy.conversions`) are as diffusers defined them."""
    for name, method in list(_installed.items()):
        if DiffusionPipeline.__dict__.get(name) is method:
            delattr(DiffusionPipeline, name)
        del _installed[name]
    remove_conversion_hooks()
