"""Every adapter of one attention layer as one set of matrices: the form the forward pass runs.

For adapters ``a = 1..n`` (factors ``A_ka, B_ka, A_va, B_va`` of rank ``r_a``, gate ``w_a, b_a``,
multiplier ``m_a``) a layer's keys change by ``ΔK(c) = Σ_a m_a g_a(c) (c A_kaᵀ) B_kaᵀ`` (values alike;
:mod:`.factors`). With ``R = Σ_a r_a`` the sum is three matrix products whatever ``n``::

    D  = [w_1 … w_n | A_k1ᵀ … A_knᵀ | A_v1ᵀ … A_vnᵀ]     (d_text, n + 2R)   gates and down-projections
    β  = [b_1 … b_n | 0 … 0]                              the gate biases, zero elsewhere
    z  = c D + β                                          ONE GEMM for every gate and both down-projections
    γ  = sigmoid(z[:, :n]) S                              S (n, R): adapter a's gate on its r_a columns
    ΔK = (z[:, n:n+R] ∘ γ) U_k,  U_k = [m_1 B_k1ᵀ; …; m_n B_knᵀ]   (R, d_k): the gate folded into the
    ΔV = (z[:, n+R:]  ∘ γ) U_v                            up-projection's input, the multipliers into U

so one call costs one linear, one sigmoid, the spread ``γ S`` (only when ``n > 1``; with one adapter
the gate broadcasts) and, for K and V, one product, one matrix product and one addition: a dozen tensor
operations for any number of adapters, where the per-adapter loop of :class:`~.factors.GatedLowRank`
runs about twenty per adapter. The packing is rebuilt only when an adapter, a factor or a switch changes
(:func:`state_key` reads tensor identities and version counters: no host-device synchronisation in the
denoising loop); when every multiplier is zero there is nothing to add at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FACTOR_NAMES = ("k_down", "k_up", "v_down", "v_up", "gate_weight", "gate_bias")
SWITCH_NAMES = ("scale", "active")


def state_key(deltas: list, enabled: torch.Tensor) -> tuple:
    """What a packing depends on: every factor and switch tensor's identity and version counter.

    The tensors themselves are part of the key (compared by identity), so an identity is never reused
    while the key lives. Raises ``RuntimeError`` for inference-mode tensors (they keep no version)."""
    tensors = [enabled] + [getattr(d, name) for d in deltas for name in FACTOR_NAMES + SWITCH_NAMES]
    return tuple((t, t._version) for t in tensors)


def same_state(key: tuple | None, other: tuple) -> bool:
    """``key`` and ``other`` name the same tensors at the same versions."""
    return (
        key is not None
        and len(key) == len(other)
        and all(a is b and va == vb for (a, va), (b, vb) in zip(key, other, strict=True))
    )


@dataclass
class PackedDeltas:
    """``D, β, S, U_k, U_v`` of one layer (module docstring); ``spread`` is None for one adapter."""

    down: torch.Tensor  # (n + 2R, d_text): Dᵀ, as ``F.linear`` takes it
    bias: torch.Tensor  # (n + 2R,)
    spread: torch.Tensor | None  # (n, R)
    k_up: torch.Tensor  # (R, d_k), multipliers folded in
    v_up: torch.Tensor  # (R, d_v)
    gates: int  # n

    @classmethod
    def pack(cls, deltas: list, multipliers: list[float]) -> PackedDeltas | None:
        """The packing of ``deltas`` with their multipliers; None when every multiplier is zero."""
        live = [(d, m) for d, m in zip(deltas, multipliers, strict=True) if m != 0.0]
        if not live:
            return None
        ranks = [d.k_down.shape[0] for d, _ in live]
        gate_w = torch.stack([d.gate_weight for d, _ in live])
        down = torch.cat([gate_w] + [d.k_down for d, _ in live] + [d.v_down for d, _ in live])
        bias = torch.zeros(down.shape[0], dtype=down.dtype, device=down.device)
        bias[: len(live)] = torch.cat([d.gate_bias.reshape(1) for d, _ in live])
        spread = None
        if len(live) > 1:
            spread = torch.block_diag(*[down.new_ones(1, r) for r in ranks])
        k_up = torch.cat([d.k_up.T * m for d, m in live])
        v_up = torch.cat([d.v_up.T * m for d, m in live])
        return cls(down.contiguous(), bias, spread, k_up.contiguous(), v_up.contiguous(), len(live))

    def add_to(
        self, context: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key + ΔK(context), value + ΔV(context))``."""
        n, rank = self.gates, self.k_up.shape[0]
        z = F.linear(context, self.down, self.bias)
        gate = torch.sigmoid(z[..., :n])
        if self.spread is not None:
            gate = gate @ self.spread
        delta_k = (z[..., n : n + rank] * gate) @ self.k_up
        delta_v = (z[..., n + rank :] * gate) @ self.v_up
        if delta_k.dtype != key.dtype:
            delta_k, delta_v = delta_k.to(key.dtype), delta_v.to(value.dtype)
        return key + delta_k, value + delta_v


class PackingCache:
    """The packing of one layer's adapters, kept while they do not change (:func:`state_key`)."""

    def __init__(self) -> None:
        self.state: tuple | None = None
        self.packed: PackedDeltas | None = None

    def lookup(self, deltas: list, enabled: torch.Tensor) -> tuple[bool, PackedDeltas | None]:
        """``(usable, packing)``: the packing of ``deltas`` (None: every multiplier is zero), rebuilt if
        anything changed; not usable while ``torch.compile`` traces (the per-adapter formula compiles
        into the graph instead) or for inference-mode tensors, which keep no version counter."""
        if torch.compiler.is_compiling():
            return False, None
        try:
            state = state_key(deltas, enabled)
        except RuntimeError:
            return False, None
        if not same_state(self.state, state):
            multipliers = [float(d.multiplier(enabled)) for d in deltas]
            self.state, self.packed = state, PackedDeltas.pack(deltas, multipliers)
        return True, self.packed
