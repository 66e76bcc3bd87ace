"""The ACE processor for joint attention (SD3 / SD3.5): the gated delta on the text tokens' keys/values.

In an SD3 block the text tokens ``c`` (that block's normed, modulated text stream) get their own
projections and join the image tokens in one attention::

    k_text = attn.add_k_proj(c) + sum_a  m_a * g_a(c) * (c A_ka^T) B_ka^T        (same for v)

with the gate and multipliers of :mod:`.processor` (the store is the same ``attn.ace_stack``). Everything
else is diffusers' ``JointAttnProcessor2_0`` operation for operation, so with every multiplier at zero
the output is bit-identical to it. Image tokens are never edited.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .processor import get_stack


class ACEJointAttnProcessor:
    """``JointAttnProcessor2_0`` plus the ACE delta on ``add_k_proj`` / ``add_v_proj``. Stateless."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        residual_length = hidden_states.shape[1]
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_heads(t, batch_size, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            text_query = attn.add_q_proj(encoder_hidden_states)
            text_key = attn.add_k_proj(encoder_hidden_states)
            text_value = attn.add_v_proj(encoder_hidden_states)
            stack = get_stack(attn)
            if stack is not None and len(stack.adapters) > 0:
                text_key, text_value = stack.add_delta(encoder_hidden_states, text_key, text_value)
            text_query, text_key, text_value = (
                _heads(t, batch_size, attn.heads, head_dim) for t in (text_query, text_key, text_value)
            )
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, :residual_length],
                hidden_states[:, residual_length:],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _heads(t: torch.Tensor, batch_size: int, heads: int, head_dim: int) -> torch.Tensor:
    return t.view(batch_size, -1, heads, head_dim).transpose(1, 2)
