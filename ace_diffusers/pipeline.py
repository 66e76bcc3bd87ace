"""Pipeline verbs: the functional API behind the methods ``import ace_diffusers`` adds to diffusers
pipelines (:mod:`ace_diffusers._verbs` installs them and says why and how to undo it).

Every function takes the pipeline first: ``ace_diffusers.load_adapter(pipe, ...)`` is
``pipe.load_ace_adapter(...)`` for users who prefer no class changes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from ._verbs import install_pipeline_methods, remove_pipeline_methods
from .core.adapter import ACEAdapter
from .deploy.export import export_lora
from .deploy.fuse import check_not_fused, fuse_adapter, fused_state, unfuse_adapter
from .errors import ACEAdapterNameError
from .fitting.closed_form import prepare_erasure
from .fitting.erase import erase_concept
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


# what the pipeline methods call (``_verbs.PIPELINE_METHODS``), and the install switches
__all__ = [
    "disable_adapters",
    "enable_adapters",
    "erase_concept",
    "export_lora",
    "fuse_adapter",
    "get_active_adapters",
    "get_adapter",
    "get_list_adapters",
    "install_pipeline_methods",
    "load_adapter",
    "prepare_erasure",
    "push_adapter",
    "remove_pipeline_methods",
    "set_adapters",
    "unfuse_adapter",
    "unload_adapter",
]
