"""The closed form's algebra against its definitions (minimiser, best rank-r edit, gate, L-BFGS)."""

import dataclasses

import pytest
import torch

from ace_diffusers.fitting.data import FitSettings
from ace_diffusers.fitting.solvers import FitData, low_rank_edits, solve_text_map


def test_low_rank_edits_are_the_best_rank_r_edit_in_the_objective_metric():
    """The shared-sketch SVDs reach the Eckart–Young optimum of ||(BA − WG) L||, L Lᵀ = M, for every shape."""
    gen = torch.Generator().manual_seed(0)
    d, rank = 96, 8
    basis = torch.randn(d, d, generator=gen)
    metric = basis @ basis.T / d + 0.1 * torch.eye(d)
    root = torch.linalg.cholesky(metric)
    text_map = torch.randn(d, 12, generator=gen) @ torch.randn(12, d, generator=gen) + 0.05 * torch.randn(
        d, d, generator=gen
    )
    weights = [torch.randn(rows, d, generator=gen) for rows in (40, 64, 40, 64, 64)]
    edits = low_rank_edits(weights, text_map @ root, root, rank)
    single = low_rank_edits(weights[1:2], text_map @ root, root, rank)[0]
    torch.testing.assert_close(single[1] @ single[0], edits[1][1] @ edits[1][0], rtol=1e-4, atol=1e-4)
    for weight, (down, up) in zip(weights, edits, strict=True):
        assert down.shape == (rank, d) and up.shape == (weight.shape[0], rank)
        target = weight @ text_map
        u, s, vh = torch.linalg.svd(target @ root)
        best = ((u[:, :rank] * s[:rank]) @ vh[:rank] - target @ root).norm()
        ours = ((up @ down - target) @ root).norm()
        assert ours <= best * 1.01 + 1e-6


@pytest.mark.parametrize("concept_tokens", [10, 40], ids=["fewer-tokens-than-dims", "more-tokens-than-dims"])
def test_solve_text_map_is_the_closed_form_minimiser(concept_tokens):
    """h = G L with G = R M⁻¹ (both solve routes), and the statistics equal their explicit sums."""
    gen = torch.Generator().manual_seed(1)
    d = 24
    concept = torch.randn(concept_tokens, d, generator=gen) + 2.0
    target = concept + 0.3 * torch.randn(concept_tokens, d, generator=gen)
    others = torch.randn(60, d, generator=gen) + 1.0
    data = FitData(concept, target, torch.ones(concept_tokens, dtype=torch.bool), others)
    settings = FitSettings()
    gate_w, gate_b = 0.05 * torch.randn(d, generator=gen), torch.tensor([0.5])
    h, root, stats = solve_text_map(
        data, gate_w, gate_b, preserve_weight=settings.preserve_weight, ridge=settings.ridge
    )

    c, n, p = concept.double(), target.double(), others.double()
    g = torch.sigmoid(c @ gate_w.double() + gate_b.double())
    m_concept, m_other = (c * g[:, None] ** 2).T @ c / len(c), p.T @ p / len(p)
    energy = (m_concept.trace() + m_other.trace()) / (2 * d)
    metric = (
        m_concept
        + settings.preserve_weight * m_other
        + settings.ridge * energy * torch.eye(d, dtype=torch.float64)
    )
    text_map = ((n - c) * g[:, None]).T @ c / len(c) @ torch.linalg.inv(metric)
    torch.testing.assert_close(root @ root.T, metric, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(h.double(), text_map @ root, rtol=1e-4, atol=1e-6)
    residual = (g[:, None] * (c @ text_map.T) - (n - c)).norm() / (n - c).norm()
    assert stats["text_residual"] == pytest.approx(float(residual), rel=1e-3)
    assert stats["preserve_drift"] == pytest.approx(float((p @ text_map.T).norm() / p.norm()), rel=1e-3)
    assert stats["concept_tokens"] == concept_tokens and stats["other_tokens"] == 60
    moment_given = dataclasses.replace(data, others_moment=m_other)
    torch.testing.assert_close(
        solve_text_map(
            moment_given, gate_w, gate_b, preserve_weight=settings.preserve_weight, ridge=settings.ridge
        )[0],
        h,
        rtol=1e-4,
        atol=1e-6,
    )


def test_minimize_lbfgs_finds_the_minimum_of_a_convex_quadratic():
    import numpy as np

    from ace_diffusers.fitting.solvers import minimize_lbfgs

    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 20))
    hessian, target = a @ a.T + np.eye(20), rng.normal(size=20)

    def objective(x):
        diff = x - target
        return float(0.5 * diff @ hessian @ diff), hessian @ diff

    assert np.allclose(minimize_lbfgs(objective, np.zeros(20), iterations=200), target, atol=1e-5)


def test_the_gate_opens_on_concept_tokens_and_stays_shut_elsewhere():
    from ace_diffusers.fitting.solvers import fit_gate

    g = torch.Generator().manual_seed(0)
    direction = torch.randn(32, generator=g)
    positive = torch.randn(200, 32, generator=g) + 3 * direction
    negative = torch.randn(400, 32, generator=g) - 3 * direction
    w, b, stats = fit_gate(positive, negative)
    assert w.shape == (32,) and b.shape == (1,)
    assert stats["gate_concept_tokens_open"] > 0.95 and stats["gate_other_tokens_open"] < 0.01
    assert float(torch.sigmoid(positive @ w + b).quantile(0.05)) > 0.98  # sharpened to ~1 on the concept


def test_sharpening_stops_before_the_gate_grows_beyond_what_the_loader_accepts():
    """Classes that barely separate (a thousand concepts against a few hundred kept prompts) asked the
    sharpening for gate weights of ~9e4, which ``load_ace_adapter`` then refused as corrupted; now the
    gate sharpens only as far as :data:`SHARPENED_GATE_LIMIT` (a tenth of the loader's bound) allows."""
    from ace_diffusers.fitting import solvers
    from ace_diffusers.integration.attach import MAX_GATE

    g = torch.Generator().manual_seed(0)
    positive, negative = torch.randn(20000, 32, generator=g), torch.randn(200, 32, generator=g)
    positive[:, 0] = 1e-3 * (0.2 + torch.randn(20000, generator=g))  # one faint direction tells them apart
    negative[:, 0] = 1e-3 * (-0.2 + torch.randn(200, generator=g))
    w, b, stats = solvers.fit_gate(positive, negative)
    assert float(w.abs().max()) <= solvers.SHARPENED_GATE_LIMIT * (1 + 1e-5) < MAX_GATE
    assert float(b.abs().max()) <= solvers.SHARPENED_GATE_LIMIT
    assert stats["gate_sharpening"] >= 1.0  # never softer than the logistic fit itself
    assert stats["gate_mean_concept_tokens"] > stats["gate_mean_other_tokens"] + 0.1
    unbounded = pytest.MonkeyPatch.context()
    with unbounded as patch:  # what the same data asked for before: weights the loader refuses
        patch.setattr(solvers, "SHARPENED_GATE_LIMIT", float("inf"))
        patch.setattr(solvers, "MAX_GATE", float("inf"))
        assert float(solvers.fit_gate(positive, negative)[0].abs().max()) > MAX_GATE
