import pytest
import torch

from ace_diffusers.core.packed import PackedDeltas, same_state, state_key
from ace_diffusers.core.processor import ACEAdapterStack, ACELayerDelta

D_TEXT, D_OUT = 12, 20


def delta(seed: int, rank: int, scale: float = 1.0) -> ACELayerDelta:
    g = torch.Generator().manual_seed(seed)
    return ACELayerDelta(
        torch.randn(rank, D_TEXT, generator=g), torch.randn(D_OUT, rank, generator=g),
        torch.randn(rank, D_TEXT, generator=g), torch.randn(D_OUT, rank, generator=g),
        torch.randn(D_TEXT, generator=g), torch.randn(1, generator=g), scale=scale,
    )


def stack_of(*deltas: ACELayerDelta) -> ACEAdapterStack:
    stack = ACEAdapterStack(torch.zeros(1))
    for i, d in enumerate(deltas):
        stack.adapters[f"a{i}"] = d
    return stack


def per_adapter(stack: ACEAdapterStack, context, key, value):
    """The formula of GatedLowRank, one adapter after the other (what the packing must equal)."""
    for d in stack.adapters.values():
        dk, dv = d.deltas(context, d.multiplier(stack.enabled))
        key, value = key + dk, value + dv
    return key, value


def kv(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 7, D_TEXT, generator=g), torch.randn(2, 7, D_OUT, generator=g),
            torch.randn(2, 7, D_OUT, generator=g))


CASES = [((3,), (1.0,)), ((3, 5, 2), (1.0, 0.5, 0.0)), ((4, 4), (-1.0, 2.0))]


@pytest.mark.parametrize("ranks,scales", CASES)
def test_packed_delta_equals_the_per_adapter_formula(ranks, scales):
    stack = stack_of(*[delta(i, r, s) for i, (r, s) in enumerate(zip(ranks, scales, strict=True))])
    context, key, value = kv()
    got_k, got_v = stack.add_delta(context, key, value)
    want_k, want_v = per_adapter(stack, context, key, value)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)


def test_all_multipliers_zero_adds_nothing_at_all():
    stack = stack_of(delta(0, 3, scale=0.0), delta(1, 2, scale=0.0))
    context, key, value = kv()
    got_k, got_v = stack.add_delta(context, key, value)
    assert got_k is key and got_v is value  # not even a + 0
    stack.adapters["a0"].scale.fill_(1.0)
    stack.enabled.fill_(0.0)
    got_k, got_v = stack.add_delta(context, key, value)
    assert got_k is key and got_v is value


def test_packing_follows_in_place_switches_and_moved_factors():
    stack = stack_of(delta(0, 3), delta(1, 2))
    context, key, value = kv()
    first = stack.add_delta(context, key, value)
    assert torch.equal(stack.add_delta(context, key, value)[0], first[0])  # same packing reused
    for change in (
        lambda: stack.adapters["a1"].scale.fill_(0.25),  # in place, as set_ace_adapters does
        lambda: stack.adapters["a0"].active.fill_(0.0),
        lambda: stack.adapters["a0"].active.fill_(1.0),
        lambda: stack.adapters.pop("a1"),
    ):
        change()
        got, want = stack.add_delta(context, key, value), per_adapter(stack, context, key, value)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    assert not torch.equal(got[0], key)
    stack.double()  # new buffer tensors: repacked in the new dtype
    context, key, value = context.double(), key.double(), value.double()
    got = stack.add_delta(context, key, value)
    assert got[0].dtype == torch.float64
    torch.testing.assert_close(got[0], per_adapter(stack, context, key, value)[0])


def test_state_key_tells_versions_and_identities_apart():
    d = delta(0, 2)
    enabled = torch.tensor(1.0)
    key = state_key([d], enabled)
    assert same_state(key, state_key([d], enabled))
    d.scale.fill_(0.5)
    assert not same_state(key, state_key([d], enabled))
    assert not same_state(state_key([d], enabled), state_key([d], enabled.clone()))
    assert not same_state(None, key)


def test_inference_mode_factors_use_the_per_adapter_formula():
    with torch.inference_mode():
        stack = stack_of(delta(0, 3), delta(1, 2, scale=0.5))
        context, key, value = kv()
        got_k, _ = stack.add_delta(context, key, value)
        want_k, _ = per_adapter(stack, context, key, value)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)


def test_pack_of_nothing_live_is_none_and_spread_only_for_several():
    one = PackedDeltas.pack([delta(0, 3)], [1.0])
    assert one.spread is None and one.gates == 1 and one.down.shape == (1 + 6, D_TEXT)
    two = PackedDeltas.pack([delta(0, 3), delta(1, 2), delta(2, 4)], [1.0, 0.0, 2.0])
    assert two.gates == 2 and two.spread.shape == (2, 7) and two.k_up.shape == (7, D_OUT)
    assert PackedDeltas.pack([delta(0, 3)], [0.0]) is None


def test_gradients_flow_to_the_context_through_the_packing():
    stack = stack_of(delta(0, 3), delta(1, 2))
    context, key, value = kv()
    context.requires_grad_(True)
    k, v = stack.add_delta(context, key, value)
    (k.sum() + v.sum()).backward()
    assert context.grad is not None and context.grad.abs().sum() > 0
