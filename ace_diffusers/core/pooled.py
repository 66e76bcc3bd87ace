"""The pooled-embedding edit at run time: a store on the module that reads the pooled text embedding
(SDXL's ``add_embedding``, SD3's ``time_text_embed.text_embedder``) and the hook that applies it.

SDXL's UNet concatenates the pooled text embedding ``p`` (``added_cond_kwargs["text_embeds"]``, from the
second text encoder) with the embedded size and crop ids and passes the result to ``add_embedding``,
whose output joins the timestep embedding of every ResNet block. No cross-attention sees ``p``, so an
edit of the K/V projections alone leaves the concept this path (SD3 feeds ``pooled_projections`` alone
to ``time_text_embed.text_embedder`` the same way). A forward pre-hook on that module replaces the first
``d_pool`` columns of its input::

    p' = p + sum_a  m_a * g_a(p) * (p A_pa^T) B_pa^T        g_a(p) = sigmoid(p . w_a + b_a)

(:class:`~ace_diffusers.core.factors.PooledEdit`; ``m_a`` the same switches
as the adapter's K/V deltas). Why the UNet side and not the text encoder's ``text_projection``: the edit
then reaches every pooled vector the UNet is given, also ones computed elsewhere (``pooled_prompt_embeds``
passed to the pipeline, prompt-weighting libraries), and it travels with the UNet like the K/V edit.
With every multiplier at zero the hook adds exact zeros, so outputs are bit-identical to no hook.
"""

from __future__ import annotations

import torch
from torch import nn

from .factors import PooledEdit
from .processor import SwitchedDelta

POOLED_STACK_ATTR = "ace_pooled_stack"


class ACEPooledDelta(SwitchedDelta, PooledEdit):
    """One adapter's gated low-rank edit of the pooled embedding (frozen buffers and switches)."""

    def __init__(
        self,
        p_down: torch.Tensor,
        p_up: torch.Tensor,
        gate_weight: torch.Tensor,
        gate_bias: torch.Tensor,
        scale: float = 1.0,
    ) -> None:
        tensors = {"p_down": p_down, "p_up": p_up, "gate_weight": gate_weight}
        super().__init__({**tensors, "gate_bias": gate_bias.reshape(1)}, scale)


class ACEPooledStack(nn.Module):
    """All ACE adapters' pooled edits on one ``add_embedding`` module, plus the global on/off switch."""

    def __init__(self, reference: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.adapters = nn.ModuleDict()
        self.register_buffer(
            "enabled", torch.tensor(1.0, dtype=reference.dtype, device=reference.device), persistent=False
        )
        self.__dict__["hook"] = None  # the pre-hook's handle (not a module attribute torch tracks)

    def edit(self, embeds: torch.Tensor) -> torch.Tensor:
        """``embeds`` with its first ``dim`` columns (the pooled embedding) edited by every adapter."""
        pooled = embeds[..., : self.dim]
        edited = pooled
        for delta in self.adapters.values():
            edited = edited + delta.pooled_delta(pooled, delta.multiplier(self.enabled)).to(pooled.dtype)
        return torch.cat([edited, embeds[..., self.dim :]], dim=-1)


def get_pooled_stack(module: nn.Module) -> ACEPooledStack | None:
    stack = getattr(module, POOLED_STACK_ATTR, None)
    return stack if isinstance(stack, ACEPooledStack) else None


def pooled_pre_hook(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of ``add_embedding``: edit the pooled part of its input."""
    stack = get_pooled_stack(module)
    if stack is None or len(stack.adapters) == 0 or not args:
        return None
    return (stack.edit(args[0]), *args[1:])


def install_pooled_stack(module: nn.Module, dim: int, reference: torch.Tensor) -> ACEPooledStack:
    """The store on ``module`` (created, with its hook, on first use)."""
    stack = get_pooled_stack(module)
    if stack is None:
        stack = ACEPooledStack(reference, dim)
        module.add_module(POOLED_STACK_ATTR, stack)
        stack.__dict__["hook"] = module.register_forward_pre_hook(pooled_pre_hook)
    return stack


def uninstall_pooled_stack(module: nn.Module) -> None:
    """Remove the store and its hook from ``module`` (nothing happens if there is none)."""
    stack = get_pooled_stack(module)
    if stack is None:
        return
    if stack.__dict__.get("hook") is not None:
        stack.__dict__["hook"].remove()
    del module._modules[POOLED_STACK_ATTR]
