"""Deprecated path of :mod:`ace_diffusers.fitting.closed_form` (moved when the package was layered; works until 0.3)."""

from ._deprecated import alias

__getattr__ = alias(__name__, "ace_diffusers.fitting.closed_form", "ace_diffusers.fitting.data", "ace_diffusers.fitting.solvers")
