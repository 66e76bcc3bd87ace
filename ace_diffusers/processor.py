"""Deprecated path of :mod:`ace_diffusers.core.processor`.

Moved when the package was layered; this path works until 0.3 (``_deprecated``).
"""

from ._deprecated import alias

__getattr__ = alias(__name__, "ace_diffusers.core.processor")
