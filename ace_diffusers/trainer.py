"""Deprecated path of :mod:`ace_diffusers.fitting.trainer` (moved when the package was layered; works until 0.3)."""

from ._deprecated import alias

__getattr__ = alias(__name__, "ace_diffusers.fitting.trainer", "ace_diffusers.fitting.mining")
