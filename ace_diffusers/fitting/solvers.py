"""The closed form's linear algebra: the gate, the text-space map and its best low-rank edits.

Pure functions of tensors (no pipeline, no text encoder); :mod:`.closed_form` feeds them the token
embeddings :mod:`.data` collects. Notation: ``c_i`` concept tokens, ``n_i`` the aligned neutral tokens,
``p_j`` the tokens to leave alone, ``g_i`` the gate on ``c_i``, ``W`` a ``to_k``/``to_v`` weight.

1. **Gate** (:func:`fit_gate`): a class-balanced logistic regression separating the tokens that carry
   the concept from everything else, sharpened so it is ~1 / ~0 on the two sides; shared by all layers.
2. **Edit** (:func:`solve_text_map`): with the gate fixed,
   ``min_Δ 1/N Σ w_i ||g_i Δ c_i − W (n_i − c_i)||² + λ_p/N_p Σ ||Δ p_j||² + λ ||Δ||²`` (``N = Σ w_i``;
   ``w_i`` = 1 for the user's concepts, less for mined neighbours) has the minimiser
   ``Δ* = W G``, ``G = R M⁻¹``, ``R = 1/N Σ w_i g_i (n_i − c_i) c_iᵀ``,
   ``M = 1/N Σ w_i g_i² c_i c_iᵀ + λ_p/N_p Σ p_j p_jᵀ + λ I``.
3. **Rank** (:func:`low_rank_edits`): the objective is ``||(Δ − Δ*) L||²`` up to a constant with
   ``M = L Lᵀ``, so the best rank-r edit is the top-r SVD ``U S Vᵀ`` of ``Δ* L``: ``B = U S``, ``A = Vᵀ L⁻¹``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..core.factors import gate_values
from ..integration.attach import MAX_GATE

GATE_MARGIN_LOGIT = 4.6  # sigmoid(4.6) ~ 0.99: where the sharpened gate puts its class quantiles
# sharpening stops where a gate weight or the bias would reach this: a tenth of what the loader accepts
# (classes that barely separate — a thousand concepts against a few hundred kept prompts — ask for more)
SHARPENED_GATE_LIMIT = MAX_GATE / 10


@dataclass
class FitData:
    concept: torch.Tensor  # (N, d) c_i
    target: torch.Tensor  # (N, d) n_i
    gate_positive: torch.Tensor  # (N,) bool: c_i carries the concept
    others: torch.Tensor  # (N_p, d) tokens of neutral, preservation and unrelated prompts
    others_moment: torch.Tensor | None = None  # (d, d) float64 ``others.T @ others / N_p``, if already known
    weights: torch.Tensor | None = None  # (N,) w_i of each concept token in the edit (None: all 1)


def minimize_lbfgs(
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x: np.ndarray,
    iterations: int,
    history: int = 20,
) -> np.ndarray:
    """Minimise a smooth convex ``objective(x) -> (value, gradient)`` by L-BFGS with Armijo backtracking.

    For the gate's ~770-d problem ``torch.optim.LBFGS`` spends most of its time dispatching the ~100
    tiny tensor operations of each iteration; the same two-loop recursion on NumPy vectors costs a
    fraction of that, and the objective's two matrix-vector products dominate again.
    """
    value, grad = objective(x)
    steps: list[np.ndarray] = []
    changes: list[np.ndarray] = []
    first_step = min(1.0, 1.0 / max(float(np.abs(grad).sum()), 1e-12))
    for _ in range(iterations):
        direction = grad.copy()  # two-loop recursion: direction = H grad, H the inverse-Hessian estimate
        alphas = []
        for s, y in zip(reversed(steps), reversed(changes), strict=True):
            alpha = s.dot(direction) / s.dot(y)
            alphas.append(alpha)
            direction -= alpha * y
        if steps:
            direction *= steps[-1].dot(changes[-1]) / changes[-1].dot(changes[-1])
        for s, y, alpha in zip(steps, changes, reversed(alphas), strict=True):
            direction += (alpha - y.dot(direction) / s.dot(y)) * s
        slope = -grad.dot(direction)
        if slope >= 0:  # not a descent direction (rounding): restart from the gradient
            direction, slope, steps, changes = grad.copy(), -grad.dot(grad), [], []
        step = 1.0 if steps else first_step
        while True:
            x_new = x - step * direction
            value_new, grad_new = objective(x_new)
            if value_new <= value + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s, y = x_new - x, grad_new - grad
        if s.dot(y) > 1e-10:  # keep only pairs with positive curvature
            steps.append(s)
            changes.append(y)
            if len(steps) > history:
                del steps[0], changes[0]
        converged = np.abs(grad_new).max() <= 1e-9 or abs(value - value_new) <= 1e-12
        x, value, grad = x_new, value_new, grad_new
        if converged:
            break
    return x


def fit_gate(
    positive: torch.Tensor, negative: torch.Tensor, *, ridge: float = 1e-3, iterations: int = 60
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Logistic-regression gate ``sigmoid(w·e + b)`` (class-balanced, ridge, L-BFGS), then sharpened.

    L-BFGS needs only matrix-vector products (cost O(N·d) per step), so the fit stays cheap for
    768- or 2048-d tokens where Newton's d x d Hessian would dominate the whole erasure. 60 iterations:
    the sharpened gate's statistics no longer move after ~50 on SD1.5-shaped fits of 1 and 100 concepts.
    Sharpening rescales the logit so that the 5th percentile of concept tokens and the 99.5th of the
    others sit at ±4.6 (gate 0.99 / 0.01) when the classes separate there — by at most the factor that
    keeps every weight and the bias within :data:`SHARPENED_GATE_LIMIT` (when the classes lie close
    together, a softer gate rather than one the loader refuses), and never beyond its ``MAX_GATE``.
    """
    # float32 is plenty for the features (standardised); the optimiser's own state is float64. The two
    # matrix-vector products stay in torch: NumPy's BLAS threads would spin and slow torch down after.
    x = torch.cat([positive, negative]).float().cpu()
    n_pos, n_all = len(positive), len(x)
    mean = x.mean(0)
    z = x - mean
    std = (z * z).sum(0).div_(n_all - 1).sqrt_().clamp_min_(1e-6)  # as x.std(0), without its slow reduction
    z /= std
    y = np.zeros(n_all)
    y[:n_pos] = 1.0
    sample_w = np.where(y > 0, 0.5 / n_pos, 0.5 / (n_all - n_pos))  # each class weighs one half

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[:-1]
        logits = torch.mv(z, torch.from_numpy(w.astype(np.float32))).numpy().astype(np.float64) + theta[-1]
        loss = sample_w.dot(np.logaddexp(0.0, logits) - y * logits) + 0.5 * ridge * w.dot(w)
        residual = sample_w * (0.5 * (1.0 + np.tanh(0.5 * logits)) - y)  # sigmoid(logits) - y, weighted
        grad = np.empty_like(theta)
        grad[:-1] = torch.mv(z.T, torch.from_numpy(residual.astype(np.float32))).numpy() + ridge * w
        grad[-1] = residual.sum()
        return float(loss), grad

    theta = torch.from_numpy(minimize_lbfgs(objective, np.zeros(z.shape[1] + 1), iterations))
    w = theta[:-1] / std.double()
    b = theta[-1] - (mean.double() * w).sum()
    logits = torch.mv(z, theta[:-1].float()).double() + theta[-1]  # = x·w + b, from the standardised features
    logit_pos, logit_neg = logits[:n_pos], logits[n_pos:]
    hi, lo = torch.quantile(logit_pos, 0.05), torch.quantile(logit_neg, 0.995)
    if hi <= lo:  # not separable at those quantiles: fall back to the class medians
        hi, lo = logit_pos.median(), logit_neg.median()
    if hi > lo:
        center = (hi + lo) / 2
        reach = max(float(w.abs().max()), abs(float(b - center)), 1e-12)
        wanted = 2 * GATE_MARGIN_LOGIT / (hi - lo)
        alpha = min(wanted, max(1.0, SHARPENED_GATE_LIMIT / reach), MAX_GATE / reach)
        w, b = w * alpha, (b - center) * alpha
        logit_pos, logit_neg = (logit_pos - center) * alpha, (logit_neg - center) * alpha
    gate_pos, gate_neg = torch.sigmoid(logit_pos), torch.sigmoid(logit_neg)
    stats = {
        "gate_mean_concept_tokens": float(gate_pos.mean()),
        "gate_mean_other_tokens": float(gate_neg.mean()),
        "gate_concept_tokens_open": float((gate_pos > 0.5).double().mean()),
        "gate_other_tokens_open": float((gate_neg > 0.5).double().mean()),
        "gate_sharpening": float(alpha) if hi > lo else 1.0,
    }
    return w.float(), b.float().reshape(1), stats


# ---------------------------------------------------------------------- edit
def solve_text_map(
    data: FitData, gate_w: torch.Tensor, gate_b: torch.Tensor, *, preserve_weight: float, ridge: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Return ``(h, L, stats)``: the closed-form text map in the objective's metric, ``h = G L``, and
    the Cholesky factor ``M = L Lᵀ``.

    Any square root ``S`` of ``M`` (``S Sᵀ = M``) gives the same objective ``||(Δ − Δ*) S||²``, so
    the triangular ``L`` stands in for the symmetric ``M^{1/2}``: it costs one Cholesky instead of an
    eigendecomposition. Since ``G = R M⁻¹ = R L⁻ᵀ L⁻¹``, ``h = G L = R L⁻ᵀ`` is one triangular solve.
    With ``R = Aᵀ C / N`` (rows ``A_i = g_i (n_i − c_i)``, ``C_i = c_i``) that solve can take the N
    concept tokens as right-hand sides instead of the d text dimensions, ``h = Aᵀ (L⁻¹ Cᵀ)ᵀ / N``:
    a one-concept fit has ~200 tokens against SD1.5's 768 dimensions.
    """
    c, n, p = data.concept.float(), data.target.float(), data.others.float()
    g = gate_values(c, gate_w.float(), gate_b.float())
    tokens, d = c.shape
    count = tokens
    if data.weights is not None:  # w_i on every term of token i: scale c_i and n_i by √w_i, N by Σ w_i
        root_w = data.weights.float().clamp_min(0).sqrt().unsqueeze(1)
        c, n, count = c * root_w, n * root_w, float(data.weights.sum())
    weighted = c * g.unsqueeze(1)
    pulled = (n - c) * g.unsqueeze(1)  # A
    m_other = data.others_moment if data.others_moment is not None else (p.T @ p / len(p)).double()
    # the N x d^2 accumulation runs in float32, the d x d algebra in float64, in place (d x d float64
    # temporaries cost as much as the arithmetic at this size)
    m = (weighted.T @ weighted / count).double()
    energy = (m.trace() + m_other.trace()) / (2 * d)
    m.add_(m_other, alpha=preserve_weight).diagonal().add_(ridge * energy)
    root = torch.linalg.cholesky(m)  # the ridge keeps M positive definite
    del m
    if tokens < d:  # N right-hand sides
        pushed = torch.linalg.solve_triangular(root, c.T.double(), upper=False)  # L⁻¹ Cᵀ
        h = (pulled.T @ pushed.T.float()).double() / count
        rows = torch.linalg.solve_triangular(root.T, pushed, upper=True).T.float()  # C M⁻¹: G = Aᵀ rows / N
        text_map = pulled.T @ rows / count
        # ||P Gᵀ||² = N_p tr(G M_p Gᵀ) = N_p Σ (rows M_p rowsᵀ) ∘ (A Aᵀ) / N²: no d x d x d product
        preserve_sq = (
            len(p)
            * float(((rows @ m_other.float() @ rows.T) * (pulled @ pulled.T)).sum().clamp_min(0))
            / count**2
        )
    else:  # d right-hand sides
        r = (pulled.T @ c / count).double()
        h = torch.linalg.solve_triangular(root, r.T, upper=False).T  # R L⁻ᵀ
        text_map = torch.linalg.solve_triangular(root.T, h.T, upper=True).T.float()
        preserve_sq = len(p) * float(((text_map @ m_other.float()) * text_map).sum().clamp_min(0))
    # statistics without N x d^2 work: tr(G M Gᵀ) = tr(G Rᵀ) = ||h||², so the concept residual
    # Σ||g_i G c_i − (n_i − c_i)||² = Σ||n_i − c_i||² − N (||h||² + λ_p tr(G M_p Gᵀ) + λ E ||G||²)
    wanted_sq = float((n - c).norm()) ** 2
    residual_sq = wanted_sq - count * (
        float(torch.linalg.vector_norm(h)) ** 2
        + preserve_weight * preserve_sq / len(p)
        + ridge * float(energy) * float(torch.linalg.vector_norm(text_map, dtype=torch.float64)) ** 2
    )
    stats = {
        "text_residual": max(residual_sq, 0.0) ** 0.5 / max(wanted_sq**0.5, 1e-12),
        "preserve_drift": preserve_sq**0.5 / max(float(p.norm()), 1e-12),
        "concept_tokens": int(tokens),
        "other_tokens": int(len(p)),
    }
    return h, root, stats


def low_rank_edits(
    weights: list[torch.Tensor],
    h: torch.Tensor,
    root: torch.Tensor,
    rank: int,
    *,
    seed: int = 0,
    power_iterations: int = 2,
    shared: list | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Best rank-``rank`` approximation of each ``Δ* = W G`` in the metric of the objective: ``(A, B)``.

    With ``h = G L`` (shared by all layers, float32) the problem is the top-``rank`` SVD of ``X = W h``
    per projection; then ``B = U S`` and ``A = Vᵀ L⁻¹``. Every ``X`` has its rows in the row space of
    ``h``, so one *shared* sketch serves all layers: a randomized range finder (``power_iterations``)
    gives an orthonormal ``Q`` (d x k, ``k = 2·rank + 32``) spanning the top of that row space, and
    each layer only needs the exact SVD of the small ``Y = W h Q = U S V_Yᵀ`` (d_out x k), found from
    its k x k (or d_out x d_out) Gram matrix (accumulated in float32, decomposed in float64; layers of
    equal shape as one batch). Right
    vectors are ``Q V_Y``, so ``A = V_Yᵀ (L⁻ᵀ Q)ᵀ`` with ``L⁻ᵀ Q`` solved once for all layers. When
    ``k`` reaches the text width, ``Q = I`` and the SVD is exact.

    ``shared``: a list that receives ``(h Q, (L⁻ᵀ Q)ᵀ, [V_Y of each weight])`` — everything but ``W``
    that the factors are made of (:class:`ace_diffusers.core.text_space.TextSpaceEdit`).
    """
    d = h.shape[1]
    k = sketch_width(rank, d)
    if k < d:
        generator = torch.Generator().manual_seed(seed)
        basis = torch.linalg.qr(h.T @ torch.randn(h.shape[0], k, generator=generator)).Q  # row space of h
        for _ in range(power_iterations):
            basis = torch.linalg.qr(h.T @ torch.linalg.qr(h @ basis).Q).Q
    else:
        basis = torch.eye(d, dtype=h.dtype)
    h_q = h @ basis  # (d, k)
    down_basis = torch.linalg.solve_triangular(root.T, basis, upper=True)  # L⁻ᵀ Q: (d, k)
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(weights)
    rights: list[torch.Tensor | None] = [None] * len(weights)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    for (d_out, _), members in by_shape.items():
        y = torch.empty(
            len(members), d_out, k, dtype=h_q.dtype, device=h_q.device
        )  # W itself is never copied
        for row, i in enumerate(members):
            torch.matmul(weights[i].float(), h_q, out=y[row])
        keep = min(rank, d_out, k)
        if k <= d_out:  # SVD from the right Gram matrix YᵀY = V S² Vᵀ
            values, vectors = torch.linalg.eigh((y.mT @ y).double())
            right = vectors.flip(-1)[..., :keep].float()  # (B, k, keep), by decreasing singular value
            up = y @ right  # U S
        else:  # from the left one, Y Yᵀ = U S² Uᵀ
            values, vectors = torch.linalg.eigh((y @ y.mT).double())
            sigma = values.flip(-1)[..., :keep].clamp_min(0).sqrt()
            left = vectors.flip(-1)[..., :keep]
            up = (left * sigma[..., None, :]).float()
            alive = sigma > sigma[..., :1] * 1e-6  # directions with no energy get no right vector
            right = ((y.mT.double() @ left) / torch.where(alive, sigma, torch.inf)[..., None, :]).float()
        down = (down_basis @ right).mT  # V_Yᵀ (L⁻ᵀ Q)ᵀ = Vᵀ L⁻¹: (B, keep, d)
        for row, i in enumerate(members):
            out[i] = (down[row].contiguous(), up[row].contiguous())
            rights[i] = right[row].contiguous()
    if shared is not None:
        shared.append((h_q.contiguous(), down_basis.T.contiguous(), rights))
    return out  # type: ignore[return-value]


def sketch_width(rank: int, d_text: int) -> int:
    """``k``: the width of the shared row-space sketch of :func:`low_rank_edits` (rank ``rank``)."""
    return min(d_text, 2 * rank + 32)


def default_rank(n_concepts: int, d_text: int) -> int:
    """32 for one concept, +8 per extra concept, at most 256 (or the text width)."""
    return min(d_text, 24 + 8 * n_concepts, 256)
