"""Typed errors. Every message names the problem *and* the fix, because users meet them
while loading files from strangers or wiring a safety component into production."""

from __future__ import annotations


class ACEError(Exception):
    """Base class of every error raised on purpose by ace_diffusers."""


class ACEValueError(ACEError, ValueError):
    """An argument has a value that cannot work (empty concept, rank <= 0, ...)."""


class ACEAdapterFormatError(ACEError, ValueError):
    """An adapter folder or file is malformed, incomplete, corrupted or of an unknown version."""


class ACEArchitectureMismatchError(ACEError, ValueError):
    """An adapter was fitted for a UNet with different cross-attention layers or shapes."""


class ACEAdapterNameError(ACEError, KeyError):
    """An adapter name is unknown, already taken, or not a valid identifier."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return str(self.args[0]) if self.args else ""


class ACECompatibilityError(ACEError, RuntimeError):
    """A pipeline/UNet or another diffusers feature cannot carry an ACE adapter as configured."""


class ACEHubError(ACEError, OSError):
    """Downloading from or publishing to the Hugging Face Hub failed; the message says why and what to do."""


class ACETruncationWarning(UserWarning):
    """A concept is longer than the text encoder's token limit and was cut."""


class ACEPooledPathWarning(UserWarning):
    """An adapter without a pooled-embedding edit was loaded on a UNet that reads a pooled text embedding
    (SDXL): the concept can still reach the model through that path."""
