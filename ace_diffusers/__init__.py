"""ace-diffusers: Attentional Concept Erasure for Hugging Face diffusers.

``import ace_diffusers`` gives every diffusers pipeline ``load_ace_adapter``, ``erase_concept`` and
friends, and ``prepare_erasure`` (see :mod:`ace_diffusers.pipeline` for the mechanism and how to undo it).

The package is layered; each layer imports only the ones above it in this list (``docs/architecture.md``):
``errors``/``_io``/``format``/``version`` (ground) → ``hub`` → ``core`` (what is applied) →
``integration`` (how it attaches to diffusers) → ``fitting`` (how it is found) → ``deploy`` (how it leaves
the plugin) → ``pipeline`` and this module (the face). ``shapes``, ``eval``, ``bench``, ``testing`` sit
beside the stack and use it; ``cli`` runs them all.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from ._verbs import install_pipeline_methods, remove_pipeline_methods
from .errors import (
    ACEAdapterFormatError,
    ACEAdapterNameError,
    ACEArchitectureMismatchError,
    ACECompatibilityError,
    ACEError,
    ACEHubError,
    ACETruncationWarning,
    ACEValueError,
)
from .version import __version__  # noqa: F401  (ace_diffusers.__version__)

# Public names and the module each lives in. They are imported on first use (PEP 562), so that
# ``import ace_diffusers`` -- and with it ``ace-diffusers --help`` -- does not load torch and diffusers.
_LAZY: dict[str, str] = {
    "ACEAdapter": ".core.adapter",
    "LayerFactors": ".core.factors",
    "ACEAttnProcessor": ".core.processor",
    "BakeSettings": ".deploy.bake",
    **dict.fromkeys(["export_lora", "save_lora", "to_diffusers_lora"], ".deploy.export"),
    **dict.fromkeys(
        ["fuse_adapter", "fused_reports", "get_fused_adapters", "unfuse_adapter"], ".deploy.fuse"
    ),
    **dict.fromkeys(["Preparation", "prepare_erasure"], ".fitting.closed_form"),
    "erase_concept": ".fitting.erase",
    "FitSettings": ".fitting.data",
    "ACETrainer": ".fitting.trainer",
    **dict.fromkeys(
        [
            "disable_adapters",
            "enable_adapters",
            "get_active_adapters",
            "get_adapter",
            "get_list_adapters",
            "load_adapter",
            "push_adapter",
            "set_adapters",
            "unload_adapter",
        ],
        ".pipeline",
    ),
}


if TYPE_CHECKING:  # the same names, statically visible to type checkers and the API docs
    from .core.adapter import ACEAdapter
    from .core.factors import LayerFactors
    from .core.processor import ACEAttnProcessor
    from .deploy.bake import BakeSettings
    from .deploy.export import export_lora, save_lora, to_diffusers_lora
    from .deploy.fuse import fuse_adapter, fused_reports, get_fused_adapters, unfuse_adapter
    from .fitting.closed_form import Preparation, prepare_erasure
    from .fitting.data import FitSettings
    from .fitting.erase import erase_concept
    from .fitting.trainer import ACETrainer
    from .pipeline import (
        disable_adapters,
        enable_adapters,
        get_active_adapters,
        get_adapter,
        get_list_adapters,
        load_adapter,
        push_adapter,
        set_adapters,
        unload_adapter,
    )


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ace_diffusers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _AfterDiffusersLoads(importlib.abc.MetaPathFinder):
    """Installs the pipeline methods right after ``import diffusers`` runs (once, then leaves)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "diffusers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            install_pipeline_methods()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


# ``import ace_diffusers`` gives every pipeline the ACE verbs: at once when diffusers is loaded already,
# otherwise as soon as it is (a pipeline cannot exist before that).
if "diffusers" in sys.modules:
    install_pipeline_methods()
elif not any(isinstance(f, _AfterDiffusersLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterDiffusersLoads())

__all__ = [
    "ACEAdapter",
    "ACEAdapterFormatError",
    "ACEAdapterNameError",
    "ACEArchitectureMismatchError",
    "ACEAttnProcessor",
    "ACETrainer",
    "ACECompatibilityError",
    "ACEError",
    "ACEHubError",
    "ACETruncationWarning",
    "ACEValueError",
    "BakeSettings",
    "FitSettings",
    "LayerFactors",
    "Preparation",
    "disable_adapters",
    "enable_adapters",
    "erase_concept",
    "export_lora",
    "fuse_adapter",
    "fused_reports",
    "get_active_adapters",
    "get_adapter",
    "get_fused_adapters",
    "get_list_adapters",
    "install_pipeline_methods",
    "load_adapter",
    "prepare_erasure",
    "push_adapter",
    "remove_pipeline_methods",
    "save_lora",
    "set_adapters",
    "to_diffusers_lora",
    "unfuse_adapter",
    "unload_adapter",
]
