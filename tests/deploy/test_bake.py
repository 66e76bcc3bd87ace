"""Baking the gated edit into a plain weight edit: the least-squares minimiser, truncated in the right "
"metric."""

import torch

from ace_diffusers.deploy.bake import BakeSettings, bake, erasure_spec, recorded_fit_settings
from ace_diffusers.fitting.data import collect_fit_data
from ace_diffusers.fitting.text import TextEmbedder


def test_baked_edit_is_the_least_squares_minimiser(erased):
    pipe, adapter, _, _ = erased
    settings = BakeSettings()
    baked = bake(pipe, adapter, settings=settings)
    data = collect_fit_data(TextEmbedder(pipe), erasure_spec(adapter), recorded_fit_settings(adapter))
    xc, xo = data.concept.double(), data.others.double()
    layer = sorted(baked.layers)[0]
    f = adapter.layers[layer]
    d = xc.shape[1]
    energy = torch.trace(xc.T @ xc / len(xc) + xo.T @ xo / len(xo)) / (2 * d)

    def objective(delta):
        total = 0.0
        for x, weight in ((xc, 1 / len(xc)), (xo, 1 / len(xo))):
            gate = torch.sigmoid(x @ f.gate_weight.double() + f.gate_bias.double()).unsqueeze(1)
            target = gate * (x @ f.k_down.double().T @ f.k_up.double().T)
            total += weight * ((x @ delta.T - target) ** 2).sum()
        return float(total + settings.ridge * energy * (delta**2).sum())

    best = baked.layers[layer].delta_weight("k")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        nudge = torch.randn(best.shape, generator=generator, dtype=torch.float64) * 1e-3 * best.abs().mean()
        assert objective(best + nudge) > objective(best)
    assert baked.rank == adapter.rank
    truncated = bake(pipe, adapter, settings=BakeSettings(rank=4))
    assert truncated.rank == 4 and torch.linalg.matrix_rank(truncated.layers[layer].delta_weight("k")) == 4
    assert objective(truncated.layers[layer].delta_weight("k")) >= objective(best)
    half = bake(pipe, adapter, scale=0.5).layers[layer].delta_weight("k")
    assert torch.allclose(half, 0.5 * best, atol=1e-6 * float(best.abs().max()))
