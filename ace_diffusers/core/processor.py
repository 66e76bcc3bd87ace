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

Variants, for diffusers features that install their own processors while an adapter is loaded (the
guard in :mod:`ace_diffusers.integration.compat` swaps them in; see ``docs/compatibility.md``):
``ACESlicedAttnProcessor`` (attention slicing), ``ACEIPAdapterAttnProcessor`` (IP-Adapter) and
``ACESanaAttnProcessor`` (Sana's cross-attention). Each is bit-identical to the stock processor it stands
in for when every multiplier is zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from torch import nn

from .factors import GatedLowRank
from .packed import PackingCache

ACE_STACK_ATTR = "ace_stack"


class SwitchedDelta(nn.Module):
    """One adapter's frozen factors in one place (non-persistent buffers) with its 0-d switches
    ``scale`` and ``active``; the attention layers' and the pooled embedding's deltas share this."""

    def __init__(self, tensors: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        super().__init__()
        for name, value in tensors.items():
            self.register_buffer(name, value, persistent=False)
        ref = next(iter(tensors.values()))
        self.register_buffer(
            "scale", torch.tensor(float(scale), dtype=ref.dtype, device=ref.device), persistent=False
        )
        self.register_buffer(
            "active", torch.tensor(1.0, dtype=ref.dtype, device=ref.device), persistent=False
        )

    def multiplier(self, enabled: torch.Tensor) -> torch.Tensor:
        """``m = enabled · scale · active``: 0-d tensors changed in place (no recompilation)."""
        return enabled * self.scale * self.active


class ACELayerDelta(SwitchedDelta, GatedLowRank):
    """One adapter's gated low-rank K/V delta for one cross-attention layer (frozen buffers).

    The formula is :class:`~ace_diffusers.core.factors.GatedLowRank`'s, shared with every offline use.
    """

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
        tensors = {"k_down": k_down, "k_up": k_up, "v_down": v_down, "v_up": v_up}
        super().__init__({**tensors, "gate_weight": gate_weight, "gate_bias": gate_bias.reshape(1)}, scale)


class ACEAdapterStack(nn.Module):
    """All ACE adapters attached to one cross-attention module, plus the global on/off switch."""

    def __init__(self, reference: torch.Tensor) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.register_buffer(
            "enabled", torch.tensor(1.0, dtype=reference.dtype, device=reference.device), persistent=False
        )
        self.__dict__["packing"] = PackingCache()  # not a module attribute: never saved or moved

    def add_delta(
        self, context: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``/``value`` plus every adapter's delta: one packed computation (:mod:`.packed`), or,
        while ``torch.compile`` traces or for inference-mode factors, the per-adapter formula."""
        deltas = list(self.adapters.values())
        usable, packed = self.__dict__["packing"].lookup(deltas, self.enabled)
        if usable:
            return (key, value) if packed is None else packed.add_to(context, key, value)
        for delta in deltas:
            delta_k, delta_v = delta.deltas(context, delta.multiplier(self.enabled))
            key = key + delta_k.to(key.dtype)
            value = value + delta_v.to(value.dtype)
        return key, value


def get_stack(attn: nn.Module) -> ACEAdapterStack | None:
    stack = getattr(attn, ACE_STACK_ATTR, None)
    return stack if isinstance(stack, ACEAdapterStack) else None


# ---------------------------------------------------------------------- the attention computation
# One forward for every ACE processor: prologue (norms, projections), the ACE K/V delta on cross-attention,
# an attention kernel (SDPA or sliced), an optional extra branch (IP-Adapter), epilogue (out-projection).
# With every multiplier at zero the sequence of operations is the one of the stock processor each variant
# stands in for, so outputs are bit-identical to it.


def _ace_forward(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
    kernel,
    extra=None,
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

    hidden_states, query_heads = kernel(attn, query, key, value, attention_mask, batch_size, sequence_length)
    if extra is not None:
        hidden_states = extra(attn, hidden_states, query_heads, batch_size)

    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)

    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    hidden_states = hidden_states / attn.rescale_output_factor
    return hidden_states


def _sdpa_kernel(attn, query, key, value, attention_mask, batch_size, sequence_length, per_head_norms=True):
    """``AttnProcessor2_0``'s math: one fused scaled-dot-product attention over all heads."""
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

    if per_head_norms and attn.norm_q is not None:
        query = attn.norm_q(query)
    if per_head_norms and attn.norm_k is not None:
        key = attn.norm_k(key)

    hidden_states = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
    )
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    return hidden_states.to(query.dtype), query


def _across_heads_kernel(attn, query, key, value, attention_mask, batch_size, sequence_length):
    """``SanaAttnProcessor2_0``'s math: the q/k norms over all heads at once, then the SDPA kernel."""
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return _sdpa_kernel(attn, query, key, value, attention_mask, batch_size, sequence_length, False)


def _sliced_kernel(slice_size: int):
    """``SlicedAttnProcessor``'s math: explicit softmax attention, ``slice_size`` (batch x head) rows at a "
    "time."""

    def kernel(attn, query, key, value, attention_mask, batch_size, sequence_length):
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        dim = query.shape[-1]
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        rows, query_tokens, _ = query.shape
        out = torch.zeros((rows, query_tokens, dim // attn.heads), device=query.device, dtype=query.dtype)
        for start in range(0, rows, slice_size):
            end = start + slice_size
            mask = attention_mask[start:end] if attention_mask is not None else None
            scores = attn.get_attention_scores(query[start:end], key[start:end], mask)
            out[start:end] = torch.bmm(scores, value[start:end])
        return attn.batch_to_head_dim(out), None

    return kernel


# ---------------------------------------------------------------------- processors
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
        return _ace_forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb, _sdpa_kernel)


class ACESlicedAttnProcessor(ACEAttnProcessor):
    """Sliced attention (as diffusers' ``SlicedAttnProcessor(slice_size)``) plus the ACE delta.

    What ``enable_attention_slicing`` gets while an ACE adapter is loaded. ``slice_size=None`` (the
    no-argument construction diffusers uses when it rebuilds processors) computes unsliced SDPA.
    """

    def __init__(self, slice_size: int | None = None) -> None:
        if slice_size is not None and (
            isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1
        ):
            raise ValueError(f"slice_size must be a positive integer or None, got {slice_size!r}.")
        self.slice_size = slice_size

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kernel = _sdpa_kernel if self.slice_size is None else _sliced_kernel(self.slice_size)
        return _ace_forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kernel)


class ACESanaAttnProcessor:
    """Sana's cross-attention (as its ``SanaAttnProcessor2_0``: q/k norms across heads) plus the ACE delta."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kernel = _across_heads_kernel
        return _ace_forward(attn, hidden_states, encoder_hidden_states, attention_mask, None, kernel)


class ACEIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """IP-Adapter attention (as ``IPAdapterAttnProcessor2_0``) with the ACE delta on the *text* tokens.

    What ``load_ip_adapter`` gets on cross-attention modules while an ACE adapter is loaded. Built with
    :meth:`wrap` it *shares* the image projections (``to_k_ip``/``to_v_ip``) and the ``scale`` list of
    the IP-Adapter processor diffusers created, so ``set_ip_adapter_scale``, ``unet.to(...)`` and
    ``unet.state_dict()`` (same keys) behave as without ACE, and unloading ACE puts that processor back.
    Image tokens are not gated: ACE edits what the *text* contributes.
    """

    def __init__(self, hidden_size=None, cross_attention_dim=None, num_tokens=(4,), scale=1.0):
        if hidden_size is not None:
            super().__init__(hidden_size, cross_attention_dim, num_tokens, scale)
            return
        nn.Module.__init__(self)  # no-argument construction: no image adapters (yet)
        self.hidden_size, self.cross_attention_dim = None, cross_attention_dim
        self.num_tokens, self.scale = [], []
        self.to_k_ip, self.to_v_ip = nn.ModuleList(), nn.ModuleList()

    @classmethod
    def wrap(cls, processor: nn.Module) -> ACEIPAdapterAttnProcessor:
        """An ACE version of a diffusers IP-Adapter processor that shares its weights and scales."""
        new = cls()
        new.hidden_size = processor.hidden_size
        new.cross_attention_dim = processor.cross_attention_dim
        new.num_tokens = processor.num_tokens
        new.scale = processor.scale  # the same list: set_ip_adapter_scale edits it in place
        new.to_k_ip = processor.to_k_ip
        new.to_v_ip = processor.to_v_ip
        new.__dict__["_diffusers_processor"] = processor  # not a submodule: no duplicate state_dict keys
        return new

    def diffusers_processor(self) -> IPAdapterAttnProcessor2_0:
        """The plain diffusers IP-Adapter processor with the same weights (what runs once ACE is unloaded)."""
        processor = self.__dict__.get("_diffusers_processor")
        if processor is None:
            processor = IPAdapterAttnProcessor2_0.__new__(IPAdapterAttnProcessor2_0)
            nn.Module.__init__(processor)
            processor.hidden_size, processor.cross_attention_dim = self.hidden_size, self.cross_attention_dim
            processor.num_tokens, processor.scale = self.num_tokens, self.scale
            processor.to_k_ip, processor.to_v_ip = self.to_k_ip, self.to_v_ip
            self.__dict__["_diffusers_processor"] = processor
        return processor

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_masks: torch.Tensor | list | None = None,
    ) -> torch.Tensor:
        ip_hidden_states: list = []
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        elif encoder_hidden_states is not None and self.num_tokens:
            # legacy layout: image tokens appended to the text tokens
            end = encoder_hidden_states.shape[1] - self.num_tokens[0]
            encoder_hidden_states, ip_hidden_states = (
                encoder_hidden_states[:, :end],
                [encoder_hidden_states[:, end:]],
            )
        masks = self._masks(ip_adapter_masks, ip_hidden_states)

        def image_branch(attn, hidden_states, query, batch_size):
            head_dim = query.shape[-1]
            for states, scale, to_k_ip, to_v_ip, mask in zip(
                ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip, masks, strict=False
            ):
                if all(s == 0 for s in (scale if isinstance(scale, list) else [scale])):
                    continue
                if mask is None:
                    out = _image_attention(attn, query, states, to_k_ip, to_v_ip, batch_size, head_dim)
                    hidden_states = hidden_states + scale * out
                    continue
                scales = scale if isinstance(scale, list) else [scale] * mask.shape[1]
                for i in range(mask.shape[1]):
                    out = _image_attention(attn, query, states[:, i], to_k_ip, to_v_ip, batch_size, head_dim)
                    weight = IPAdapterMaskProcessor.downsample(
                        mask[:, i], batch_size, out.shape[1], out.shape[2]
                    )
                    hidden_states = hidden_states + scales[i] * (
                        out * weight.to(dtype=query.dtype, device=query.device)
                    )
            return hidden_states

        return _ace_forward(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, _sdpa_kernel, image_branch
        )

    def _masks(self, masks, ip_hidden_states) -> list:
        if masks is None:
            return [None] * len(self.scale)
        if not isinstance(masks, list):  # tensor (num_adapters, 1, h, w) -> one mask per adapter
            masks = list(masks.unsqueeze(1))
        if not len(masks) == len(self.scale) == len(ip_hidden_states):
            raise ValueError(
                f"Got {len(masks)} ip_adapter_masks for {len(self.scale)} loaded IP-Adapters and "
                f"{len(ip_hidden_states)} image embeddings; pass one mask (or None) per IP-Adapter."
            )
        for mask, scale, states in zip(masks, self.scale, ip_hidden_states, strict=False):
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
                raise ValueError(
                    "Each IP-Adapter mask must be a tensor [1, num_images, height, width] "
                    "(see diffusers' IPAdapterMaskProcessor)."
                )
            if mask.shape[1] != states.shape[1] or (isinstance(scale, list) and len(scale) != mask.shape[1]):
                raise ValueError(
                    f"An IP-Adapter mask covers {mask.shape[1]} images but its adapter has {states.shape[1]} "
                    "images (or a different number of per-image scales)."
                )
        return masks


def _image_attention(attn, query, states, to_k_ip, to_v_ip, batch_size, head_dim) -> torch.Tensor:
    key = to_k_ip(states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = to_v_ip(states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)


ACE_PROCESSORS = (
    ACEAttnProcessor,
    ACEIPAdapterAttnProcessor,
    ACESanaAttnProcessor,
)  # ACESlicedAttnProcessor is an ACEAttnProcessor
