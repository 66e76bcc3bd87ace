"""The undo handle of an in-place weight edit (what the baselines of :mod:`ace_diffusers.eval.baselines`
return): restore the original weights bit-exactly (``restore()``), re-apply the edit (``reapply()``), or
show the original model temporarily (``with edit.original(): ...``, what
:func:`ace_diffusers.eval.evaluate` takes as ``original=edit.original``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class WeightEdit:
    """An in-place weight edit of a pipeline and everything needed to undo it exactly."""

    method: str
    parameters: dict[str, nn.Parameter]
    original_weights: dict[str, torch.Tensor]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    edited_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    applied: bool = True

    def __post_init__(self) -> None:
        if not self.edited_weights:
            self.edited_weights = {n: p.detach().clone() for n, p in self.parameters.items()}

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back (bit-exact); idempotent."""
        for name, param in self.parameters.items():
            param.copy_(self.original_weights[name])
        self.applied = False

    @torch.no_grad()
    def reapply(self) -> None:
        """Apply the edit again after :meth:`restore`."""
        for name, param in self.parameters.items():
            param.copy_(self.edited_weights[name])
        self.applied = True

    @contextlib.contextmanager
    def original(self) -> Iterator[None]:
        """Temporarily the original model (for before/after evaluations)."""
        was = self.applied
        self.restore()
        try:
            yield
        finally:
            if was:
                self.reapply()

    def __enter__(self) -> WeightEdit:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def relative_change(self) -> dict[str, float]:
        return {
            n: float((self.edited_weights[n].float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
            for n, w in self.original_weights.items()
        }

    def to_dict(self) -> dict[str, Any]:
        changes = self.relative_change()
        return {
            "method": self.method,
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
            "parameters": len(self.parameters),
            "mean_relative_change": sum(changes.values()) / max(1, len(changes)),
            "stats": self.stats,
        }

    def __repr__(self) -> str:
        return (f"WeightEdit(method={self.method!r}, parameters={len(self.parameters)}, "
                f"seconds={self.seconds:.2f}, applied={self.applied})")
