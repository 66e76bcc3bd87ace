"""ace-diffusers: Attentional Concept Erasure for Hugging Face diffusers.

``import ace_diffusers`` gives every diffusers pipeline ``load_ace_adapter``, ``erase_concept`` and
friends, and ``prepare_erasure`` (see :mod:`ace_diffusers.pipeline` for the mechanism and how to undo it).
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from .adapter import ACEAdapter, LayerFactors
from .closed_form import Preparation, erase_concept, prepare_erasure
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
from .export import export_lora, save_lora, to_diffusers_lora
from .fuse import fuse_adapter, fused_reports, get_fused_adapters, unfuse_adapter
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
from .processor import ACEAttnProcessor
from .trainer import ACETrainer

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
