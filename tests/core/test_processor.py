import inspect

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ace_diffusers.core.processor import ACE_STACK_ATTR, ACEAdapterStack, ACEAttnProcessor, ACELayerDelta

D_TEXT, D_QUERY = 16, 32


def make_attention(cross: bool = True) -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=D_QUERY, cross_attention_dim=D_TEXT if cross else None, heads=4, dim_head=8)


def make_delta(attn: Attention, seed: int, rank: int = 3, gate_axis: int | None = None, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    d_text, d_k = attn.to_k.in_features, attn.to_k.out_features
    gate_weight = torch.randn(d_text, generator=g)
    gate_bias = torch.zeros(1)
    if (
        gate_axis is not None
    ):  # gate = sigmoid(200 * x[gate_axis]): open where that feature is +1, shut where -1
        gate_weight = torch.zeros(d_text)
        gate_weight[gate_axis] = 200.0
    return ACELayerDelta(
        k_down=torch.randn(rank, d_text, generator=g),
        k_up=torch.randn(d_k, rank, generator=g),
        v_down=torch.randn(rank, d_text, generator=g),
        v_up=torch.randn(d_k, rank, generator=g),
        gate_weight=gate_weight,
        gate_bias=gate_bias,
        scale=scale,
    )


def attach(attn: Attention, **deltas: ACELayerDelta) -> ACEAdapterStack:
    stack = ACEAdapterStack(attn.to_k.weight)
    for name, delta in deltas.items():
        stack.adapters[name] = delta
    attn.add_module(ACE_STACK_ATTR, stack)
    attn.set_processor(ACEAttnProcessor())
    return stack


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 10, D_QUERY, generator=g)
    context = torch.randn(2, 7, D_TEXT, generator=g)
    return hidden, context


def stock_out(attn: Attention, hidden, context):
    return AttnProcessor2_0()(attn, hidden, encoder_hidden_states=context)


def test_constructible_without_arguments_and_names_its_kwargs():
    processor = ACEAttnProcessor()
    params = inspect.signature(processor.__call__).parameters
    assert list(params) == ["attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb"]
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values())


@pytest.mark.parametrize("cross", [True, False])
def test_without_adapter_bit_identical_to_sdpa_processor(cross):
    attn = make_attention(cross)
    hidden, context = inputs()
    context = context if cross else None
    expected = stock_out(attn, hidden, context)
    attn.set_processor(ACEAttnProcessor())
    assert torch.equal(attn(hidden, encoder_hidden_states=context), expected)


def test_attention_mask_and_4d_input_match_stock():
    attn = make_attention(True)
    hidden = torch.randn(2, D_QUERY, 3, 3)
    _, context = inputs()
    mask = torch.ones(2, 7)
    mask[:, -2:] = 0
    expected = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=context, attention_mask=mask)
    attach(attn, a=make_delta(attn, 0, scale=0.0))
    assert torch.equal(attn(hidden, encoder_hidden_states=context, attention_mask=mask), expected)


def test_scale_zero_and_disabled_are_bit_identical():
    attn = make_attention()
    hidden, context = inputs()
    expected = stock_out(attn, hidden, context)
    stack = attach(attn, a=make_delta(attn, 0), b=make_delta(attn, 1))
    assert not torch.equal(attn(hidden, encoder_hidden_states=context), expected)
    stack.enabled.fill_(0.0)
    assert torch.equal(attn(hidden, encoder_hidden_states=context), expected)
    stack.enabled.fill_(1.0)
    for delta in stack.adapters.values():
        delta.scale.fill_(0.0)
    assert torch.equal(attn(hidden, encoder_hidden_states=context), expected)


def test_self_attention_ignores_the_store():
    attn = make_attention(cross=False)
    hidden, _ = inputs()
    expected = stock_out(attn, hidden, None)
    attach(attn, a=make_delta(attn, 0))
    assert torch.equal(attn(hidden), expected)


def recorded_kv(attn, hidden, context, recorder):
    recorder.calls.clear()
    attn(hidden, encoder_hidden_states=context)
    ((query, key, value),) = recorder.calls
    return query, key, value


def test_delta_changes_only_k_v_of_tokens_with_open_gate(sdpa_recorder):
    attn = make_attention()
    hidden, context = inputs()
    context[..., 0] = -1.0
    open_tokens = [1, 4]
    context[:, open_tokens, 0] = 1.0
    q0, k0, v0 = recorded_kv(attn, hidden, context, sdpa_recorder)
    attn.set_processor(ACEAttnProcessor())
    attach(attn, a=make_delta(attn, 0, gate_axis=0))
    q1, k1, v1 = recorded_kv(attn, hidden, context, sdpa_recorder)
    assert torch.equal(q0, q1)  # queries come from the image tokens: untouched
    closed = [t for t in range(context.shape[1]) if t not in open_tokens]
    # key/value layout is (batch, heads, tokens, head_dim)
    assert torch.equal(k0[:, :, closed], k1[:, :, closed])
    assert torch.equal(v0[:, :, closed], v1[:, :, closed])
    assert (k0[:, :, open_tokens] - k1[:, :, open_tokens]).abs().amin(dim=-1).amax() > 0
    assert (v0[:, :, open_tokens] - v1[:, :, open_tokens]).abs().sum() > 1.0


def test_delta_is_linear_in_scale_and_adapters_compose(sdpa_recorder):
    attn = make_attention()
    hidden, context = inputs()
    _, k_stock, v_stock = recorded_kv(attn, hidden, context, sdpa_recorder)
    a, b = make_delta(attn, 0), make_delta(attn, 1)
    stack = attach(attn, a=a, b=b)

    def delta_with(scale_a, scale_b):
        a.scale.fill_(scale_a)
        b.scale.fill_(scale_b)
        _, k, v = recorded_kv(attn, hidden, context, sdpa_recorder)
        return k - k_stock, v - v_stock

    ka1, va1 = delta_with(1.0, 0.0)
    ka2, va2 = delta_with(2.0, 0.0)
    kb1, vb1 = delta_with(0.0, 1.0)
    kab, vab = delta_with(1.0, 1.0)
    torch.testing.assert_close(ka2, 2 * ka1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(va2, 2 * va1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kab, ka1 + kb1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vab, va1 + vb1, rtol=1e-5, atol=1e-5)
    assert ka1.abs().max() > 0.1 and kb1.abs().max() > 0.1
    assert len(stack.adapters) == 2


def test_store_is_not_in_state_dict_but_follows_dtype():
    attn = make_attention()
    keys_before = set(attn.state_dict())
    attach(attn, a=make_delta(attn, 0))
    assert set(attn.state_dict()) == keys_before
    attn.to(torch.float64)
    assert attn.ace_stack.adapters["a"].k_down.dtype == torch.float64
    assert attn.ace_stack.enabled.dtype == torch.float64
