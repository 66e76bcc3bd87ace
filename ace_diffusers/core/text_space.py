"""A closed-form adapter stored as what it is: one text map, shared by every layer.

Where every cross-attention layer reads the same text tokens (SD 1.x/2.x, SDXL, PixArt), the closed form's
edit of layer ``l`` is ``ΔW_l = W_l G`` with one text-side map ``G`` for all layers and both projections
(:mod:`ace_diffusers.fitting.solvers`). Its rank-``r`` factors are found in a ``k``-dimensional sketch of
``G``'s row space shared by all layers: with ``H = h Q`` (``d x k``) and ``D = (L⁻ᵀ Q)ᵀ`` (``k x d``) shared,
and per layer and projection a ``k x r`` matrix ``R`` (the top right singular vectors of ``W_l H``),

    A_l = Rᵀ D        B_l = W_l H R        (so  B_l A_l = W_l H R Rᵀ D)

``B_l`` is the model's own ``W_l`` times a small matrix, so it need not be stored: a file holds ``H``,
``D``, the ``R`` of every layer and the shared gate — ``2·k·d + Σ_l 2·k·r`` numbers instead of
``Σ_l r·(2·d + d_k + d_v)`` — and :meth:`TextSpaceEdit.factors` rebuilds ``(A, B)`` from the weights of
the model it is loaded onto. Fine-tuned adapters train every layer's factors freely and are stored whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ACEAdapterFormatError
from .factors import LayerFactors

TEXT_SPACE_NAME = "text_space"  # tensor-name prefix of the shared parts (no UNet module has this name)
SHARED_KEYS = ("basis", "down_basis", "gate_weight", "gate_bias")
RIGHT_KEYS = ("k_right", "v_right")  # per layer, "<layer>.k_right"


@dataclass
class TextSpaceEdit:
    """``H`` (``basis``, d x k), ``D`` (``down_basis``, k x d), per layer ``(R_k, R_v)`` (k x r) and the
    gate shared by every layer (module docstring)."""

    basis: torch.Tensor
    down_basis: torch.Tensor
    rights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor

    def __post_init__(self) -> None:
        d, k = self.basis.shape
        if tuple(self.down_basis.shape) != (k, d) or tuple(self.gate_weight.shape) != (d,):
            raise ACEAdapterFormatError(
                f"Text-space edit: basis {tuple(self.basis.shape)}, down_basis "
                f"{tuple(self.down_basis.shape)} and gate {tuple(self.gate_weight.shape)} do not fit "
                "together (want (d, k), (k, d), (d,)). The adapter file is corrupted: re-download or "
                "re-save it."
            )
        for layer, pair in self.rights.items():
            if any(r.ndim != 2 or r.shape[0] != k for r in pair):
                raise ACEAdapterFormatError(
                    f"Text-space edit: layer '{layer}' has right factors of shapes "
                    f"{[tuple(r.shape) for r in pair]}, not (k={k}, rank). The adapter file is corrupted."
                )

    @property
    def rank(self) -> int:
        return max(r.shape[1] for pair in self.rights.values() for r in pair)

    def factors(self, layer: str, w_k: torch.Tensor, w_v: torch.Tensor) -> LayerFactors:
        """Layer ``layer``'s ``(A, B)`` for K and V on a model whose projections are ``w_k``, ``w_v``
        (float32, on this edit's device)."""
        parts = []
        for right, weight in zip(self.rights[layer], (w_k, w_v), strict=True):
            parts += [(right.T @ self.down_basis).contiguous(), weight.float() @ (self.basis @ right)]
        return LayerFactors(*parts, self.gate_weight.clone(), self.gate_bias.clone())

    def layer_factors(
        self, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, LayerFactors]:
        """Every layer's factors, from ``{layer: (W_k, W_v)}`` of the model."""
        return {layer: self.factors(layer, *weights[layer]) for layer in sorted(self.rights)}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The flat tensors of a weights file: ``text_space.<shared key>`` and ``<layer>.k_right`` /
        ``<layer>.v_right``."""
        out = {f"{TEXT_SPACE_NAME}.{key}": getattr(self, key) for key in SHARED_KEYS}
        for layer, pair in self.rights.items():
            out.update({f"{layer}.{key}": r for key, r in zip(RIGHT_KEYS, pair, strict=True)})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], source: Any) -> TextSpaceEdit:
        shared, rights = {}, {}
        for name, tensor in tensors.items():
            owner, _, key = name.rpartition(".")
            if owner == TEXT_SPACE_NAME and key in SHARED_KEYS:
                shared[key] = tensor
            elif owner and key in RIGHT_KEYS:
                rights.setdefault(owner, {})[key] = tensor
            else:
                raise ACEAdapterFormatError(
                    f"'{source}' holds an unexpected tensor '{name}' for a text-space adapter, which holds "
                    f"only '{TEXT_SPACE_NAME}.{{{','.join(SHARED_KEYS)}}}' and '<layer>.{{k_right,v_right}}'."
                )
        missing = [k for k in SHARED_KEYS if k not in shared] + [
            f"{layer}.{k}" for layer, got in rights.items() for k in RIGHT_KEYS if k not in got
        ]
        if missing or not rights:
            raise ACEAdapterFormatError(f"'{source}': the text-space adapter is missing tensors {missing}.")
        pairs = {layer: (got["k_right"], got["v_right"]) for layer, got in sorted(rights.items())}
        return cls(rights=pairs, **shared)

    def to(self, *args: Any, **kwargs: Any) -> TextSpaceEdit:
        rights = {n: (k.to(*args, **kwargs), v.to(*args, **kwargs)) for n, (k, v) in self.rights.items()}
        shared = {key: getattr(self, key).to(*args, **kwargs) for key in SHARED_KEYS}
        return TextSpaceEdit(rights=rights, **shared)
