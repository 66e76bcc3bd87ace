"""One formula for the gated low-rank edit, used by the processor, the fitters, baking and the figures."""

import pytest
import torch

from ace_diffusers.core.factors import PROJECTIONS, LayerFactors, gate_values
from ace_diffusers.core.processor import ACELayerDelta


def factors(seed=0, d_text=12, d_out=8, rank=3):
    g = torch.Generator().manual_seed(seed)
    return LayerFactors(
        torch.randn(rank, d_text, generator=g),
        torch.randn(d_out, rank, generator=g),
        torch.randn(rank, d_text, generator=g),
        torch.randn(d_out, rank, generator=g),
        torch.randn(d_text, generator=g),
        torch.randn(1, generator=g),
    )


def test_the_gate_is_one_probability_per_token():
    f = factors()
    context = torch.randn(2, 5, 12)
    gate = f.gate(context)
    assert gate.shape == (2, 5) and gate.min() >= 0 and gate.max() <= 1
    torch.testing.assert_close(gate, torch.sigmoid(context @ f.gate_weight + f.gate_bias))
    assert torch.equal(gate, gate_values(context, f.gate_weight, f.gate_bias))


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_delta_is_the_gate_times_the_low_rank_term(projection):
    f = factors()
    context = torch.randn(2, 5, 12)
    down, up = f.factors_of(projection)
    expected = f.gate(context).unsqueeze(-1) * (context @ down.T @ up.T) * 0.5
    torch.testing.assert_close(f.delta(context, projection, 0.5), expected)
    with_gate_one = LayerFactors(f.k_down, f.k_up, f.v_down, f.v_up, torch.zeros(12), torch.tensor([30.0]))
    torch.testing.assert_close(
        with_gate_one.delta(context, projection), context @ f.delta_weight(projection).T
    )


def test_deltas_equal_the_two_single_deltas_bit_for_bit():
    f = factors()
    context = torch.randn(3, 7, 12)
    delta_k, delta_v = f.deltas(context, torch.tensor(0.7))
    assert torch.equal(delta_k, f.delta(context, "k", torch.tensor(0.7)))
    assert torch.equal(delta_v, f.delta(context, "v", torch.tensor(0.7)))


def test_the_processor_buffers_run_the_same_operations():
    """What the attention forward adds equals the offline formula exactly (same ops, same order)."""
    f = factors(seed=1)
    delta = ACELayerDelta(**f.tensors(), scale=0.8)
    context = torch.randn(2, 6, 12)
    enabled = torch.tensor(1.0)
    online = delta.deltas(context, delta.multiplier(enabled))
    offline = f.deltas(context, enabled * torch.tensor(0.8) * torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(online, offline, strict=True))


def test_shape_rank_and_conversion():
    f = factors(d_text=12, d_out=8, rank=3)
    assert f.shape == (12, 8, 8) and f.rank == 3
    half = f.to(torch.float16)
    assert all(t.dtype == torch.float16 for t in half.tensors().values())


def test_factors_and_adapters_refuse_what_is_not_a_tensor_with_a_typed_error():
    from ace_diffusers.core.adapter import ACEAdapter
    from ace_diffusers.errors import ACEAdapterFormatError

    with pytest.raises(ACEAdapterFormatError, match=r"k_down must be a torch.Tensor, got list.*as_tensor"):
        LayerFactors(*[[1.0, 2.0]] * 6)
    with pytest.raises(ACEAdapterFormatError, match="Layer 'x': expected a LayerFactors"):
        ACEAdapter({"x": {"k_down": torch.zeros(2, 4)}}, concepts=["cat"])
