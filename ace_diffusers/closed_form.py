"""Deprecated path of :mod:`ace_diffusers.fitting.closed_form`.

Moved when the package was layered; this path works until 0.3 (``_deprecated``).
"""

from ._deprecated import alias

__getattr__ = alias(
    __name__,
    "ace_diffusers.fitting.closed_form",
    "ace_diffusers.fitting.erase",
    "ace_diffusers.fitting.data",
    "ace_diffusers.fitting.solvers",
)
