"""The ACE processor for FLUX (``FluxAttention``): the gated delta on the text tokens' keys/values.

FLUX has two kinds of blocks, and the text tokens reach the attention differently in each:

* **double-stream** blocks (``transformer_blocks``) give the text stream ``c`` its own projections, as
  SD3 does (:mod:`.joint`)::

      k_text = attn.add_k_proj(c) + sum_a  m_a * g_a(c) * (c A_ka^T) B_ka^T        (same for v)

* **single-stream** blocks (``single_transformer_blocks``) concatenate ``[text; image]`` and run *one*
  ``to_k`` / ``to_v`` over both. The delta applies to the first ``T`` rows only (the text), where
  ``T`` is the text length the block received::

      k[:, :T] = attn.to_k(x)[:, :T] + sum_a  m_a * g_a(x[:, :T]) * (x[:, :T] A_ka^T) B_ka^T

  The attention module itself never sees ``T``; :func:`install_text_length_hooks` puts a pre-hook on
  each single-stream block that passes it down (``joint_attention_kwargs["ace_text_length"]``, which
  ``FluxAttention`` forwards to processors that name it). Image rows are never edited.

Everything else is diffusers' ``FluxAttnProcessor`` operation for operation (same attention dispatch,
same rotary embedding), so with every multiplier at zero the output is bit-identical to it.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention
from torch import nn

from ..errors import ACECompatibilityError
from .processor import get_stack

TEXT_LENGTH_KWARG = "ace_text_length"
_HOOKS_ATTR = "_ace_text_length_hooks"  # model.__dict__: the pre-hook handles of the single-stream blocks


class ACEFluxAttnProcessor:
    """``FluxAttnProcessor`` plus the ACE delta on the text tokens' K/V (module docstring). Stateless
    apart from diffusers' own ``_attention_backend`` / ``_parallel_config`` switches."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        ace_text_length: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        stack = get_stack(attn)
        edits = stack is not None and len(stack.adapters) > 0
        if getattr(attn, "fused_projections", False):
            raise ACECompatibilityError(
                "This FLUX attention runs fused QKV projections, which bypass the ACE K/V edit. Call "
                "pipe.transformer.unfuse_qkv_projections() (ACE refuses fuse_qkv_projections while loaded)."
            )
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if edits and attn.added_kv_proj_dim is None:  # single-stream: the text rows come first
            key, value = _edit_text_rows(stack, hidden_states, key, value, ace_text_length)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if attn.added_kv_proj_dim is not None:
            text_query = attn.add_q_proj(encoder_hidden_states)
            text_key = attn.add_k_proj(encoder_hidden_states)
            text_value = attn.add_v_proj(encoder_hidden_states)
            if edits:
                text_key, text_value = stack.add_delta(encoder_hidden_states, text_key, text_value)
            text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))
            text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
            text_value = text_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        text_length = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_length, hidden_states.shape[1] - text_length], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def _edit_text_rows(
    stack: Any, hidden_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``key``/``value`` with the delta on their first ``text_length`` rows (single-stream blocks)."""
    if text_length is None:
        raise ACECompatibilityError(
            "A FLUX single-stream attention carrying an ACE adapter was called without the text length, so "
            "it cannot tell text rows from image rows. Call it through its FluxSingleTransformerBlock (whose "
            "pre-hook passes the length), or pass ace_text_length=<number of text tokens>."
        )
    rows_k, rows_v = key[:, :text_length], value[:, :text_length]
    text_key, text_value = stack.add_delta(hidden_states[:, :text_length], rows_k, rows_v)
    if text_key is rows_k and text_value is rows_v:  # nothing in effect: the stock tensors, untouched
        return key, value
    return (
        torch.cat([text_key, key[:, text_length:]], dim=1),
        torch.cat([text_value, value[:, text_length:]], dim=1),
    )


def single_stream_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks whose ``attn`` is a single-stream ``FluxAttention`` (text and image rows through one
    ``to_k``/``to_v``)."""
    return [m for m in model.modules() if is_single_stream(getattr(m, "attn", None))]


def is_single_stream(attn: Any) -> bool:
    """A FLUX single-stream attention: a ``FluxAttention`` without the text stream's own projections."""
    return isinstance(attn, FluxAttention) and attn.added_kv_proj_dim is None


def _pass_text_length(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Pre-hook of a single-stream block: hand its text length to the attention (module docstring).
    The block is called with keywords, or positionally under gradient checkpointing
    ``(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)``."""
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    if len(args) > 4:
        extra, args = args[4], args[:4]
    else:
        extra = kwargs.get("joint_attention_kwargs")
    kwargs = {**kwargs, "joint_attention_kwargs": {**(extra or {}), TEXT_LENGTH_KWARG: text.shape[1]}}
    return args, kwargs


def install_text_length_hooks(model: nn.Module) -> None:
    """Pre-hooks on every single-stream block of ``model`` (idempotent; none on other models)."""
    if _HOOKS_ATTR in model.__dict__:
        return
    handles = [
        block.register_forward_pre_hook(_pass_text_length, with_kwargs=True)
        for block in single_stream_blocks(model)
    ]
    if handles:
        model.__dict__[_HOOKS_ATTR] = handles


def remove_text_length_hooks(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_HOOKS_ATTR, []):
        handle.remove()
