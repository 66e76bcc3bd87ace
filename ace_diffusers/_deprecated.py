"""Old module paths that keep working for one release: each warns once and forwards to its new home."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

REMOVED_IN = "0.3"


def alias(old: str, *new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the deprecated module ``old``: names are looked up in the ``new``
    modules in order. Warns (``DeprecationWarning``) when the old module is imported."""
    warnings.warn(
        f"{old} moved to {' / '.join(new)}; the old path works until ace-diffusers {REMOVED_IN}. "
        f"Import from the new module, or from the top-level ace_diffusers package.",
        DeprecationWarning,
        stacklevel=3,
    )

    def __getattr__(name: str) -> Any:
        for module_name in new:
            module = importlib.import_module(module_name)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {' / '.join(new)})")

    return __getattr__
