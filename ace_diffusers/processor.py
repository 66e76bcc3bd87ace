"""The ACE attention processor and the per-layer store it reads.

For a cross-attention module with projections ``W_k``, ``W_v`` and text tokens ``c`` the processor computes::

    k = attn.to_k(c) + sum_a  m_a * g_a(c) * (c A_ka^T) B_ka^T
    v = attn.to_v(c) + sum_a  m_a * g_a(c) * (c A_va^T) B_va^T
    g_a(c) = sigmoid(c . w_a + b_a)        (one gate value per text token)
    m_a    = scale_a * active_a * enabled   (0-d tensors, updated in place)

and otherwise performs exactly the math of diffusers' ``AttnProcessor2_0``. Why this shape:

* ``attn.to_k`` / ``attn.to_v`` are *called*, never replaced, so PEFT LoRA layers wrapping them keep working.
* The delta lives on the attention module (``attn.ace_stack``), not on the processor: the processor is
  stateless and constructible with no arguments, so diffusers code that rebuilds processors with
  ``proc.__class__()`` (IP-Adapter load/unload) keeps the erasure. The store holds *non-persistent* buffers:
  they follow ``unet.to(device, dtype)`` but never enter ``unet.state_dict()`` and hence never the UNet
  checkpoint written by ``pipe.save_pretrained``.
* Multipliers are tensors changed in place, so a compiled UNet does not recompile when a scale changes.
* ``m_a = 0`` adds exact zeros: the output is bit-identical to ``AttnProcessor2_0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACE_STACK_ATTR = "ace_stack"


class ACELayerDelta(nn.Module):
    """One adapter's gated low-rank K/V delta for one cross-attention layer (frozen buffers)."""

    def __init__(
        self,
        k_down: torch.Tensor,
        k_up: torch.Tensor,
        v_down: torch.Tensor,
        v_up: torch.Tensor,
        gate_weight: torch.Tensor,
        gate_bias: torch.Tensor,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("k_down", k_down),
            ("k_up", k_up),
            ("v_down", v_down),
            ("v_up", v_up),
            ("gate_weight", gate_weight),
            ("gate_bias", gate_bias.reshape(1)),
        ):
            self.register_buffer(name, value, persistent=False)
        ref = k_down
        self.register_buffer("scale", torch.tensor(float(scale), dtype=ref.dtype, device=ref.device), persistent=False)
        self.register_buffer("active", torch.tensor(1.0, dtype=ref.dtype, device=ref.device), persistent=False)

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        """Per-token gate in [0, 1], shape ``(batch, tokens, 1)``."""
        return torch.sigmoid(context @ self.gate_weight + self.gate_bias).unsqueeze(-1)

    def deltas(self, context: torch.Tensor, multiplier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.gate(context) * (multiplier * self.scale * self.active)
        delta_k = ((context @ self.k_down.T) @ self.k_up.T) * weight
        delta_v = ((context @ self.v_down.T) @ self.v_up.T) * weight
        return delta_k, delta_v


class ACEAdapterStack(nn.Module):
    """All ACE adapters attached to one cross-attention module, plus the global on/off switch."""

    def __init__(self, reference: torch.Tensor) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.register_buffer(
            "enabled", torch.tensor(1.0, dtype=reference.dtype, device=reference.device), persistent=False
        )

    def add_delta(
        self, context: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for delta in self.adapters.values():
            delta_k, delta_v = delta.deltas(context, self.enabled)
            key = key + delta_k.to(key.dtype)
            value = value + delta_v.to(value.dtype)
        return key, value


def get_stack(attn: nn.Module) -> ACEAdapterStack | None:
    stack = getattr(attn, ACE_STACK_ATTR, None)
    return stack if isinstance(stack, ACEAdapterStack) else None


class ACEAttnProcessor:
    """Scaled-dot-product attention (as ``AttnProcessor2_0``) plus the ACE gated K/V delta.

    Installed on *every* attention module of a UNet; on self-attention and on modules without an
    ``ace_stack`` it is exactly the stock math. Stateless: all adapter data is read from ``attn``.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        stack = get_stack(attn) if is_cross else None
        if stack is not None and len(stack.adapters) > 0:
            key, value = stack.add_delta(encoder_hidden_states, key, value)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states
