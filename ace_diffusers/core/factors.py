"""The math of one layer's ACE edit, in one place.

For text tokens ``c`` (rows) a cross-attention layer's keys change by a *gated* low-rank term, and its
values the same way::

    g(c)   = sigmoid(c · w + b)                    one gate value per token, in [0, 1]
    ΔK(c)  = m · g(c) · (c A_kᵀ) B_kᵀ              A_k = k_down (r, d_text), B_k = k_up (d_k, r)
    ΔV(c)  = m · g(c) · (c A_vᵀ) B_vᵀ              m: the adapter's multiplier (scale × switches)

:class:`GatedLowRank` holds this formula (peft's ``get_delta_weight`` idea: one definition serves the
forward pass, the fitters, baking/fusing and the figures). It is mixed into :class:`LayerFactors` (plain
tensors: what is saved, fitted and baked) and into the processor's buffer module, so the attention
forward and every offline computation run the same operations in the same order.

SDXL also feeds the pooled text embedding ``p`` (``text_embeds``) into the time conditioning, where no
cross-attention sees it. :class:`PooledFactors` edits it with the same formula and one projection
``"p"``: ``p' = p + m · g(p) · (p A_pᵀ) B_pᵀ`` (A_p = p_down (r, d_pool), B_p = p_up (d_pool, r)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ACEAdapterFormatError
from ..format import POOLED_KEYS, TENSOR_KEYS

PROJECTIONS = ("k", "v")
POOLED_PROJECTION = "p"


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: one float64 sum on the CPU (a narrower float cannot overflow it), else
    elementwise."""
    if t.device.type == "cpu" and t.dtype != torch.float64:
        return bool(torch.isfinite(t.sum(dtype=torch.float64)))
    return bool(torch.isfinite(t).all())


def gate_values(context: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``sigmoid(context · weight + bias)``: one gate value per token, shape ``context.shape[:-1]``."""
    return torch.sigmoid(context @ weight + bias)


class GatedLowRank:
    """The gated low-rank K/V delta, for any holder of the tensors ``k_down`` (A_k), ``k_up`` (B_k),
    ``v_down``, ``v_up``, ``gate_weight`` (w) and ``gate_bias`` (b): :class:`LayerFactors` (plain
    tensors) and the processor's buffer module."""

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        """Per-token gate in [0, 1], shape ``context.shape[:-1]``."""
        return gate_values(context, self.gate_weight, self.gate_bias)

    def factors_of(self, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down, up)`` = ``(A, B)`` of ``"k"`` or ``"v"``."""
        return getattr(self, f"{projection}_down"), getattr(self, f"{projection}_up")

    def low_rank(self, context: torch.Tensor, projection: str) -> torch.Tensor:
        """The ungated term ``(c Aᵀ) Bᵀ`` of ``"k"`` or ``"v"``."""
        down, up = self.factors_of(projection)
        return (context @ down.T) @ up.T

    def weighting(
        self, context: torch.Tensor, multiplier: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """``m · g(c)`` with a trailing axis, ready to scale the low-rank term (``multiplier=None``: ``m = "
        "1``)."""
        weight = self.gate(context).unsqueeze(-1)
        return weight if multiplier is None else weight * multiplier

    def gated(self, context: torch.Tensor, projection: str, weight: torch.Tensor) -> torch.Tensor:
        """``((c Aᵀ) ∘ weight) Bᵀ``: the gate scales the up-projection's input (r numbers per token, not
        d_out), as the packed forward of :mod:`.packed` does."""
        down, up = self.factors_of(projection)
        return ((context @ down.T) * weight) @ up.T

    def delta(
        self, context: torch.Tensor, projection: str, multiplier: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """``m · g(c) · (c Aᵀ) Bᵀ`` for ``"k"`` or ``"v"``."""
        return self.gated(context, projection, self.weighting(context, multiplier))

    def deltas(
        self, context: torch.Tensor, multiplier: torch.Tensor | float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ΔK, ΔV)`` with the gate computed once."""
        weight = self.weighting(context, multiplier)
        return self.gated(context, "k", weight), self.gated(context, "v", weight)

    def delta_weight(self, projection: str) -> torch.Tensor:
        """``B A`` (d_out, d_text): the edit as a plain weight when the gate is 1 everywhere."""
        down, up = self.factors_of(projection)
        return up @ down

    def edits(self) -> bool:
        """Whether the delta can be non-zero: some up-projection entry (``B_k``, ``B_v``) is not 0."""
        return any(bool(self.factors_of(p)[1].any()) for p in ("k", "v"))


@dataclass
class LayerFactors(GatedLowRank):
    """The delta for one cross-attention layer: ``ΔK(c) = g(c)·(c A_kᵀ) B_kᵀ``, same for V."""

    k_down: torch.Tensor
    k_up: torch.Tensor
    v_down: torch.Tensor
    v_up: torch.Tensor
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor

    def __post_init__(self) -> None:
        _check_tensors("LayerFactors", {key: getattr(self, key) for key in TENSOR_KEYS})

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(d_text, d_k, d_v)``: what the layer must look like to carry this delta."""
        return (self.k_down.shape[1], self.k_up.shape[0], self.v_up.shape[0])

    @property
    def rank(self) -> int:
        return self.k_down.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in TENSOR_KEYS}

    def to(self, *args: Any, **kwargs: Any) -> LayerFactors:
        return LayerFactors(**{k: v.to(*args, **kwargs) for k, v in self.tensors().items()})


def _check_tensors(owner: str, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if not isinstance(value, torch.Tensor):
            raise ACEAdapterFormatError(
                f"{owner}.{key} must be a torch.Tensor, got {type(value).__name__}; convert it "
                "with torch.as_tensor(..., dtype=torch.float32)."
            )


class PooledEdit(GatedLowRank):
    """The gated low-rank formula on the pooled embedding (the one projection ``"p"``), for
    :class:`PooledFactors` and the run-time buffer module alike."""

    def pooled_delta(
        self, pooled: torch.Tensor, multiplier: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """``m · g(p) · (p A_pᵀ) B_pᵀ``: what the edit adds to the pooled embeddings ``p`` (rows)."""
        return self.delta(pooled, POOLED_PROJECTION, multiplier)

    def pooled_weight(self) -> torch.Tensor:
        """``B_p A_p`` (d_pool, d_pool): the edit as a plain matrix when the gate is 1."""
        return self.delta_weight(POOLED_PROJECTION)


@dataclass
class PooledFactors(PooledEdit):
    """The edit of the pooled text embedding: ``p' = p + g(p)·(p A_pᵀ) B_pᵀ`` (projection ``"p"``)."""

    p_down: torch.Tensor
    p_up: torch.Tensor
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor

    def __post_init__(self) -> None:
        _check_tensors("PooledFactors", self.tensors())

    @property
    def dim(self) -> int:
        """``d_pool``: the width of the pooled embedding this edit reads and writes."""
        return self.p_down.shape[1]

    @property
    def rank(self) -> int:
        return self.p_down.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in POOLED_KEYS}

    def to(self, *args: Any, **kwargs: Any) -> PooledFactors:
        return PooledFactors(**{k: v.to(*args, **kwargs) for k, v in self.tensors().items()})

    def problems(self) -> str | None:
        """What is wrong with the shapes or values, or None (for the adapter's checks)."""
        r, d = self.p_down.shape if self.p_down.ndim == 2 else (0, 0)
        ok = (
            r > 0
            and self.p_up.shape == (d, r)
            and self.gate_weight.shape == (d,)
            and self.gate_bias.numel() == 1
        )
        if not ok:
            return (
                f"inconsistent factor shapes p_down {tuple(self.p_down.shape)}, "
                f"p_up {tuple(self.p_up.shape)}, "
                f"gate_weight {tuple(self.gate_weight.shape)}, gate_bias {tuple(self.gate_bias.shape)}; "
                "expected (r, d_pool), (d_pool, r), (d_pool,), (1,)"
            )
        for key, t in self.tensors().items():
            if not t.is_floating_point() or not all_finite(t):
                return f"tensor '{key}' must be floating-point and finite"
        return None


# ---------------------------------------------------------------------- validation
def validate_layers(layers: Mapping[str, LayerFactors]) -> None:
    for name, f in layers.items():
        if not isinstance(f, LayerFactors):
            raise ACEAdapterFormatError(
                f"Layer '{name}': expected a LayerFactors (six tensors: {', '.join(TENSOR_KEYS)}), got "
                f"{type(f).__name__}."
            )
        for key, t in f.tensors().items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ACEAdapterFormatError(
                    f"Layer '{name}': tensor '{key}' must be a floating-point tensor."
                )
            if not all_finite(t):
                raise ACEAdapterFormatError(
                    f"Layer '{name}': tensor '{key}' contains NaN or Inf values; the adapter is corrupted."
                )
        r, d_text = f.k_down.shape if f.k_down.ndim == 2 else (None, None)
        ok = (
            f.k_down.ndim == 2
            and f.v_down.ndim == 2
            and f.k_up.ndim == 2
            and f.v_up.ndim == 2
            and f.v_down.shape == (r, d_text)
            and f.k_up.shape[1] == r
            and f.v_up.shape[1] == r
            and f.gate_weight.shape == (d_text,)
            and f.gate_bias.numel() == 1
            and r is not None
            and r > 0
        )
        if not ok:
            raise ACEAdapterFormatError(
                f"Layer '{name}': inconsistent factor shapes k_down {tuple(f.k_down.shape)}, "
                f"k_up {tuple(f.k_up.shape)}, v_down {tuple(f.v_down.shape)}, v_up {tuple(f.v_up.shape)}, "
                f"gate_weight {tuple(f.gate_weight.shape)}, gate_bias {tuple(f.gate_bias.shape)}; expected "
                "(r, d_text), (d_k, r), (r, d_text), (d_v, r), (d_text,), (1,)."
            )


def validate_pooled(pooled: PooledFactors | None) -> None:
    if pooled is None:
        return
    if not isinstance(pooled, PooledFactors):
        raise ACEAdapterFormatError(
            f"pooled: expected a PooledFactors (p_down, p_up, gate_weight, gate_bias) or None, got "
            f"{type(pooled).__name__}."
        )
    problem = pooled.problems()
    if problem is not None:
        raise ACEAdapterFormatError(f"The pooled-embedding edit is corrupted: {problem}.")
