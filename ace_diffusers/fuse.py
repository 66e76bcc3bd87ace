"""Deprecated path of :mod:`ace_diffusers.deploy.fuse` (moved when the package was layered; works until 0.3)."""

from ._deprecated import alias

__getattr__ = alias(__name__, "ace_diffusers.deploy.fuse", "ace_diffusers.deploy.bake", "ace_diffusers.deploy.fidelity")
