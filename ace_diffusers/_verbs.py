"""The methods ``import ace_diffusers`` adds to diffusers pipelines, and the one diffusers classmethod it
wraps -- installed without importing the rest of the package.

Attach mechanism (and why): we add a handful of methods (``load_ace_adapter``, ``erase_concept``, ...) to
``diffusers.DiffusionPipeline`` itself -- the object every SD/SDXL, img2img and inpaint pipeline inherits
from. We never swap a pipeline's ``__class__`` nor subclass it, so ``pipe.save_pretrained`` still records
the original ``_class_name`` and the folder reloads with plain ``DiffusionPipeline.from_pretrained``.
The patch is undoable (:func:`remove_pipeline_methods`) and never overwrites an attribute diffusers already
defines. Users who prefer no class changes call the functions of :mod:`ace_diffusers.pipeline`
(``ace_diffusers.load_adapter(pipe, ...)``) and can run ``ace_diffusers.remove_pipeline_methods()``.

Each method looks its function up in :mod:`ace_diffusers.pipeline` when it is *called*, and the
``UNetMotionModel.from_unet2d`` wrapper (:mod:`ace_diffusers.deploy.conversions`) the same way, so
installing imports only diffusers' classes. That lets ``import ace_diffusers`` install them right after
``import diffusers`` runs -- even when that import happens half-way through importing ace_diffusers'
own modules -- and keeps ``ace-diffusers --help`` free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ACECompatibilityError

# method name -> function of ace_diffusers.pipeline that implements it
PIPELINE_METHODS: dict[str, str] = {
    "load_ace_adapter": "load_adapter",
    "unload_ace_adapter": "unload_adapter",
    "set_ace_adapters": "set_adapters",
    "enable_ace_adapters": "enable_adapters",
    "disable_ace_adapters": "disable_adapters",
    "get_active_ace_adapters": "get_active_adapters",
    "get_list_ace_adapters": "get_list_adapters",
    "get_ace_adapter": "get_adapter",
    "push_ace_adapter": "push_adapter",
    "erase_concept": "erase_concept",
    "prepare_erasure": "prepare_erasure",
    "fuse_ace_adapter": "fuse_adapter",
    "unfuse_ace_adapter": "unfuse_adapter",
    "export_ace_lora": "export_lora",
}

_installed: dict[str, Any] = {}
_wrapped: dict[str, Any] = {}  # "from_unet2d" -> diffusers' own classmethod object


def _function(name: str) -> Any:
    return getattr(importlib.import_module("ace_diffusers.pipeline"), name)


def _method(method_name: str, function_name: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _function(function_name)(self, *args, **kwargs)

    method.__name__ = method_name
    method.__qualname__ = f"DiffusionPipeline.{method_name}"
    method.__doc__ = f"ACE: see ``ace_diffusers.{function_name}`` (called with this pipeline first)."
    return method


def _from_unet2d(cls: type, unet: Any, *args: Any, **kwargs: Any) -> Any:
    model = _wrapped["from_unet2d"].__func__(cls, unet, *args, **kwargs)
    importlib.import_module("ace_diffusers.deploy.conversions").carry_adapters(unet, model)
    return model


def install_pipeline_methods() -> list[str]:
    """Add the ``*_ace_*`` verbs, ``erase_concept`` and ``prepare_erasure`` to ``DiffusionPipeline``, and
    make ``UNetMotionModel.from_unet2d`` carry adapters (idempotent)."""
    # diffusers is imported here, not at the top: ``import ace_diffusers`` must not load it (fast CLI)
    from diffusers import DiffusionPipeline, UNetMotionModel

    for name, function_name in PIPELINE_METHODS.items():
        if name in _installed:
            continue
        if hasattr(DiffusionPipeline, name):
            raise ACECompatibilityError(
                f"diffusers.DiffusionPipeline already defines '{name}'; refusing to overwrite it. Use the "
                f"functional API (ace_diffusers.{function_name}) instead."
            )
        method = _method(name, function_name)
        setattr(DiffusionPipeline, name, method)
        _installed[name] = method
    if "from_unet2d" not in _wrapped:
        _wrapped["from_unet2d"] = UNetMotionModel.__dict__["from_unet2d"]
        UNetMotionModel.from_unet2d = classmethod(_from_unet2d)
    return sorted(_installed)


def remove_pipeline_methods() -> None:
    """Undo :func:`install_pipeline_methods`: ``DiffusionPipeline`` and ``UNetMotionModel.from_unet2d``
    are as diffusers defined them."""
    # imported here, not at the top: see install_pipeline_methods
    from diffusers import DiffusionPipeline, UNetMotionModel

    for name, method in list(_installed.items()):
        if DiffusionPipeline.__dict__.get(name) is method:
            delattr(DiffusionPipeline, name)
        del _installed[name]
    original = _wrapped.pop("from_unet2d", None)
    if original is not None:
        UNetMotionModel.from_unet2d = original
