"""Deprecated path of :mod:`ace_diffusers.eval.baselines` (moved when the package was layered; works until
0.3)."""

from .._deprecated import alias

__getattr__ = alias(__name__, "ace_diffusers.eval.baselines")
