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

from .core.adapter import ACEAdapter
from .core.factors import LayerFactors
from .core.processor import ACEAttnProcessor
from .deploy.bake import BakeSettings
from .deploy.export import export_lora, save_lora, to_diffusers_lora
from .deploy.fuse import fuse_adapter, fused_reports, get_fused_adapters, unfuse_adapter
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
from .fitting.closed_form import Preparation, erase_concept, prepare_erasure
from .fitting.data import FitSettings
from .fitting.trainer import ACETrainer
from .pipeline import (
    disable_adapters,
    enable_adapters,
    get_active_adapters,
    get_adapter,
    get_list_adapters,
    install_pipeline_methods,
    load_adapter,
    push_adapter,
    remove_pipeline_methods,
    set_adapters,
    unload_adapter,
)
from .version import __version__  # noqa: F401  (ace_diffusers.__version__)

install_pipeline_methods()

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
