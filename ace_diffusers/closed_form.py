"""The closed-form fitter: prompts -> token embeddings -> gate + low-rank K/V edit -> :class:`ACEAdapter`.

Notation: ``c_i`` a text-token embedding from a prompt containing the concept, ``n_i`` the embedding
of the aligned token in the same prompt with the neutral anchor instead, ``p_j`` tokens of
preservation and unrelated prompts, ``W`` a layer's ``to_k`` or ``to_v`` weight.

1. **Gate.** ``g(e) = sigmoid(w·e + b)`` is a logistic regression separating tokens that carry the
   concept (``c_i`` that differ from their neutral counterpart) from everything else, then sharpened
   so it is ~1 / ~0 on the two sides. It is shared by all layers (they read the same text tokens).
2. **Edit.** With the gate fixed, the edited projection of a concept token is ``W c_i + g_i Δ c_i`` and
   we solve::

       min_Δ  1/N Σ_i ||g_i Δ c_i − W (n_i − c_i)||²  +  λ_p/N_p Σ_j ||Δ p_j||²  +  λ ||Δ||²

   whose minimiser is ``Δ* = W G`` with the text-space map ``G = R M⁻¹``,
   ``R = 1/N Σ g_i (n_i − c_i) c_iᵀ``, ``M = 1/N Σ g_i² c_i c_iᵀ + λ_p/N_p Σ p_j p_jᵀ + λ I``.
3. **Rank.** The objective equals ``||(Δ − Δ*) L||²`` up to a constant, with ``M = L Lᵀ`` (Cholesky; any
   square root of ``M`` would do), so the best rank-r edit (Eckart–Young) is the top-r SVD ``U S Vᵀ``
   of ``Δ* L``: ``B = U S``, ``A = Vᵀ L⁻¹``.

Everything but step 3 is shared by all layers, so one fit costs a few text-encoder passes plus one
small SVD per K/V projection.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import attach, embedding_cache
from .adapter import ACEAdapter, LayerFactors
from .errors import ACETruncationWarning, ACEValueError
from .pipeline import _default_name, get_unet
from .presets import ErasureSpec, fill_template, load_presets, resolve_spec
from .text import EncodedPrompt, TextEmbedder

CHANGED_TOKEN_THRESHOLD = 0.02  # relative change that marks a token as carrying the concept
GATE_MARGIN_LOGIT = 4.6  # sigmoid(4.6) ~ 0.99: where the sharpened gate puts its class quantiles


@dataclass
class FitSettings:
    rank: int | None = None  # None: default_rank(n_concepts, d_text)
    preserve_weight: float = 0.05  # λ_p
    ridge: float = 1e-3  # λ, relative to the mean token energy
    gate_ridge: float = 1e-3
    preserve_templates: int = 2
    full_length_templates: int = 2  # causal encoders: templates per concept encoded with all padding tokens
    full_length_budget: int = 16  # ... while the total stays within this many (spread over the concepts)
    extra_pad_tokens: int = 6  # causal encoders, other prompts: padding tokens kept after each prompt's EOS
    preserve_pad_tokens: int = 12  # ... and after each preservation prompt's: far padding must stay unedited too

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FitData:
    concept: torch.Tensor  # (N, d) c_i
    target: torch.Tensor  # (N, d) n_i
    gate_positive: torch.Tensor  # (N,) bool: c_i carries the concept
    others: torch.Tensor  # (N_p, d) tokens of neutral, preservation and unrelated prompts
    others_moment: torch.Tensor | None = None  # (d, d) float64 ``others.T @ others / N_p``, if already known


# ---------------------------------------------------------------------- embeddings
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encode_cached(
    embedder: TextEmbedder, jobs: list[tuple[str, Any, int | None]], persistent: list[tuple[str, Any, int | None]] = ()
) -> list[EncodedPrompt]:
    """Encode ``(prompt, phrase span, extra padding tokens or None for all)`` jobs in one call, each
    distinct job once, with a per-text-encoder cache invalidated when any encoder weight changes in place
    (preset neutral, preservation and unrelated prompts are shared by every fit on the pipeline).
    ``persistent`` jobs (those that do not depend on the concept) are also kept on disk across
    processes (:mod:`.embedding_cache`)."""
    encoder = embedder.encoders[0][1]
    signature = tuple(  # in-place edits bump versions; .to(dtype/device) does not, so those are part of it too
        (len(tok), sum(p._version for p in enc.parameters()), sum(1 for _ in enc.parameters()),
         str(next(enc.parameters()).dtype), str(next(enc.parameters()).device))
        for tok, enc in embedder.encoders
    )
    entry = _cache.get(encoder)
    if entry is None or entry[0] != signature:
        entry = (signature, {}, {})
        _cache[encoder] = entry
    store: dict = entry[1]
    use_disk = embedding_cache.cache_root() is not None

    def disk_key() -> str:
        if "fingerprint" not in entry[2]:  # once per encoder and weight version
            entry[2]["fingerprint"] = embedding_cache.fingerprint(embedder)
        return entry[2]["fingerprint"]

    on_disk = [job for job in dict.fromkeys(persistent) if job not in store]
    if on_disk and use_disk:
        store.update(embedding_cache.load(disk_key(), on_disk, embedder.device))
    missing = list(dict.fromkeys(job for job in jobs if job not in store))  # many concepts share one anchor
    if missing:
        if "prefixes" not in entry[2]:  # the templates' prefixes, kept for every later fit (and process)
            entry[2]["prefixes"] = (
                embedding_cache.load_prefixes(disk_key(), [next(enc.parameters()) for _, enc in embedder.encoders])
                if use_disk else [{} for _ in embedder.encoders]
            )
        prefixes = entry[2]["prefixes"]
        known = [set(p) for p in prefixes]
        encoded = embedder.encode(
            [job[0] for job in missing],
            [job[1] for job in missing],
            extra_pad_tokens=[job[2] for job in missing],
            prefix_stores=prefixes,
        )
        for job, enc in zip(missing, encoded, strict=True):
            store[job] = enc
        if use_disk:
            not_on_disk = set(on_disk)
            embedding_cache.save(disk_key(), {job: store[job] for job in missing if job in not_on_disk})
            embedding_cache.save_prefixes(
                disk_key(), [{k: v for k, v in p.items() if k not in old} for p, old in zip(prefixes, known, strict=True)]
            )
    result = [store[job] for job in jobs]
    if len(store) > 4096:
        for key in list(store)[: len(store) - 4096]:
            del store[key]
    return result


Job = embedding_cache.Job  # (prompt, phrase's character span or None, padding tokens kept after EOS or None for all)


def _fill(template: str, phrase: str) -> tuple[str, tuple[int, int] | None]:
    prompt, span = fill_template(template, phrase)
    return (prompt, span) if phrase else (" ".join(prompt.split()), None)


def _template_jobs(phrase: str, templates: list[str], full: set[int], settings: FitSettings) -> list[Job]:
    """``phrase`` in each template; those in ``full`` with all padding tokens, the rest with a few."""
    return [(*_fill(t, phrase), None if i in full else settings.extra_pad_tokens) for i, t in enumerate(templates)]


@dataclass
class FitJobs:
    """A fit's encoder jobs: the concept prompts, their neutral counterparts (same order), and the
    preservation and unrelated prompts; ``preset`` are the concept prompts of the kind's own terms
    (explicit's), which every fit of the kind has too."""

    concept: list[Job]
    neutral: list[Job]
    other: list[Job]
    preset: list[Job]

    @property
    def concept_independent(self) -> list[Job]:
        """What :func:`prepare_erasure` encodes ahead and the on-disk cache keeps."""
        return self.neutral + self.other + self.preset


def fit_jobs(spec: ErasureSpec, settings: FitSettings) -> FitJobs:
    """The encoder jobs of a fit of ``spec``.

    The first four generic prompts keep all their padding tokens; which four does not depend on the
    concepts (one that names a concept is left out, not replaced), so :func:`prepare_erasure` knows them.
    """
    concept_jobs, neutral_jobs, preset_jobs = [], [], []
    # the kind's own terms take the slots they would have after one concept of the user's, whatever the
    # user passed, so that their prompts are the same in every fit of the kind
    kind_terms = {t: i + 1 for i, t in enumerate(load_presets()["kinds"].get(spec.kind, {}).get("expand", []))}
    expanded = set(spec.expanded)
    for c_index, (concept, anchor) in enumerate(zip(spec.concepts, spec.neutral, strict=True)):
        templates = spec.templates_for(concept)
        slot = kind_terms[concept] if concept in expanded else c_index
        full = full_length_template_indices(slot, len(spec.concepts), len(templates), settings)
        jobs = _template_jobs(concept, templates, full, settings)
        concept_jobs += jobs
        preset_jobs += jobs if concept in expanded else []
        neutral_jobs += _template_jobs(anchor, templates, full, settings)
    unrelated = set(spec.unrelated_prompts())
    other_jobs = [(p, None, None if i < 4 else settings.extra_pad_tokens) for i, p in enumerate(spec.negatives) if p in unrelated]
    other_jobs += [(p, span, settings.preserve_pad_tokens) for p, span in spec.preserve_prompt_spans(settings.preserve_templates)]
    return FitJobs(concept_jobs, neutral_jobs, other_jobs, preset_jobs)


def collect_fit_data(embedder: TextEmbedder, spec: ErasureSpec, settings: FitSettings) -> FitData:
    """Encode concept/neutral/preservation prompts and align concept tokens with neutral tokens."""
    jobs = fit_jobs(spec, settings)
    concept_jobs, neutral_jobs, other_jobs = jobs.concept, jobs.neutral, jobs.other
    # one call (few, large batches); what does not depend on the concepts is also cached on disk
    encoded = _encode_cached(embedder, concept_jobs + neutral_jobs + other_jobs, persistent=jobs.concept_independent)
    concept_enc = encoded[: len(concept_jobs)]
    neutral_enc = encoded[len(concept_jobs) : len(concept_jobs) + len(neutral_jobs)]
    other_enc = encoded[len(concept_jobs) + len(neutral_jobs) :]

    concept_rows, target_rows, positive = [], [], []
    for c_enc, n_enc in zip(concept_enc, neutral_enc, strict=True):
        pairs = align_tokens(c_enc, n_enc)
        if not pairs:
            continue
        ci = torch.tensor([i for i, _ in pairs])
        nj = torch.tensor([j for _, j in pairs])
        c, n = c_enc.embeddings[ci], n_enc.embeddings[nj]
        change = (c - n).norm(dim=-1) / c.norm(dim=-1).clamp_min(1e-8)
        concept_rows.append(c)
        target_rows.append(n)
        positive.append(change > CHANGED_TOKEN_THRESHOLD)
    if not concept_rows:
        raise ACEValueError(
            "None of the concept prompts kept the concept after tokenisation (all truncated); use shorter concepts."
        )
    others, moment = _other_tokens(embedder, neutral_jobs, neutral_enc, other_jobs, other_enc)
    return FitData(  # the fit's algebra runs on the CPU, with the UNet weights (small d x d problems)
        concept=torch.cat(concept_rows).cpu(),
        target=torch.cat(target_rows).cpu(),
        gate_positive=torch.cat(positive).cpu(),
        others=others,
        others_moment=moment,
    )


def _other_tokens(
    embedder: TextEmbedder, neutral_jobs: list[Job], neutral_enc: list[EncodedPrompt],
    other_jobs: list[Job], other_enc: list[EncodedPrompt],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the edit must leave alone (preservation, unrelated and neutral prompts; an anchor shared
    by many concepts counted once) and their second moment."""
    unique_neutral = {id(e): e for e in neutral_enc}.values()
    others = torch.cat([e.embeddings for e in other_enc] + [e.embeddings for e in unique_neutral]).cpu()
    moment = _other_tokens_moment(embedder, (tuple(other_jobs), tuple(dict.fromkeys(neutral_jobs))), others)
    return others, moment


def _other_tokens_moment(embedder: TextEmbedder, jobs: tuple[tuple, tuple], others: torch.Tensor) -> torch.Tensor:
    """``others.T @ others / N_p`` (float64) for the other tokens of ``jobs``: the same for every fit of a
    kind, so kept in memory (at most 4, d x d each) and on disk beside the embeddings (float32, as
    accumulated; the disk key exists once :func:`_encode_cached` used the disk cache)."""
    entry = _cache[embedder.encoders[0][1]][2]
    moments = entry.setdefault("moments", {})
    if jobs not in moments:
        disk_key = entry.get("fingerprint")
        flat = [list(job) for part in jobs for job in part]
        stored = embedding_cache.load_moment(disk_key, flat) if disk_key else None
        if stored is None or stored.shape != (others.shape[1],) * 2:
            stored = others.T @ others / len(others)
            if disk_key:
                embedding_cache.save_moment(disk_key, flat, stored)
        moments[jobs] = stored.double()
        while len(moments) > 4:  # 32 MB each at SDXL's 2048
            del moments[next(iter(moments))]
    return moments[jobs]


def full_length_template_indices(concept_index: int, n_concepts: int, n_templates: int, settings: FitSettings) -> set[int]:
    """Which of a concept's templates are encoded with all padding tokens (causal encoders).

    A full-length prompt costs ~5x a short one, and far padding tokens mostly carry what the near
    ones do; so each concept gets ``full_length_templates`` of them while the total stays within
    ``full_length_budget``. Beyond that, ``full_length_budget`` concepts spread evenly over the list
    get one each (rotating through the templates) so the gate still sees far padding tokens.
    """
    per_concept = min(settings.full_length_templates, n_templates)
    if n_concepts * per_concept <= settings.full_length_budget:
        return set(range(per_concept))
    if per_concept and (concept_index * settings.full_length_budget) % n_concepts < settings.full_length_budget:
        return {concept_index % n_templates}
    return set()


def align_tokens(c_enc: EncodedPrompt, n_enc: EncodedPrompt) -> list[tuple[int, int]]:
    """Pairs (concept-prompt token, neutral-prompt token): same prefix, span stretched, suffix shifted."""
    if c_enc.span is None:
        return []
    s, e = c_enc.span
    if n_enc.span is not None:
        ns, ne = n_enc.span
    else:  # empty anchor: the concept collapses onto the token that follows it in the neutral prompt
        ns = ne = s
    rows_c, rows_n = c_enc.embeddings.shape[0], n_enc.embeddings.shape[0]
    pairs = []
    for i in range(rows_c):
        if i < s:
            j = i
        elif i < e:
            j = ns + ((i - s) * (ne - ns)) // (e - s) if ne > ns else ns
        else:
            j = ne + (i - e)
        if j < rows_n:
            pairs.append((i, j))
    return pairs


# ---------------------------------------------------------------------- gate
def minimize_lbfgs(
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]], x: np.ndarray, iterations: int, history: int = 20
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
    others sit at ±4.6 (gate 0.99 / 0.01) when the classes separate there.
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
        alpha = 2 * GATE_MARGIN_LOGIT / (hi - lo)
        center = (hi + lo) / 2
        w, b = w * alpha, (b - center) * alpha
        logit_pos, logit_neg = (logit_pos - center) * alpha, (logit_neg - center) * alpha
    gate_pos, gate_neg = torch.sigmoid(logit_pos), torch.sigmoid(logit_neg)
    stats = {
        "gate_mean_concept_tokens": float(gate_pos.mean()),
        "gate_mean_other_tokens": float(gate_neg.mean()),
        "gate_concept_tokens_open": float((gate_pos > 0.5).double().mean()),
        "gate_other_tokens_open": float((gate_neg > 0.5).double().mean()),
    }
    return w.float(), b.float().reshape(1), stats


# ---------------------------------------------------------------------- edit
def solve_text_map(
    data: FitData, gate_w: torch.Tensor, gate_b: torch.Tensor, settings: FitSettings
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
    g = torch.sigmoid(c @ gate_w.float() + gate_b.float())
    count, d = c.shape
    weighted = c * g.unsqueeze(1)
    pulled = (n - c) * g.unsqueeze(1)  # A
    m_other = data.others_moment if data.others_moment is not None else (p.T @ p / len(p)).double()
    # the N x d^2 accumulation runs in float32, the d x d algebra in float64, in place (d x d float64
    # temporaries cost as much as the arithmetic at this size)
    m = (weighted.T @ weighted / count).double()
    energy = (m.trace() + m_other.trace()) / (2 * d)
    m.add_(m_other, alpha=settings.preserve_weight).diagonal().add_(settings.ridge * energy)
    root = torch.linalg.cholesky(m)  # the ridge keeps M positive definite
    del m
    if count < d:  # N right-hand sides
        pushed = torch.linalg.solve_triangular(root, c.T.double(), upper=False)  # L⁻¹ Cᵀ
        h = (pulled.T @ pushed.T.float()).double() / count
        rows = torch.linalg.solve_triangular(root.T, pushed, upper=True).T.float()  # C M⁻¹: G = Aᵀ rows / N
        text_map = pulled.T @ rows / count
        # ||P Gᵀ||² = N_p tr(G M_p Gᵀ) = N_p Σ (rows M_p rowsᵀ) ∘ (A Aᵀ) / N²: no d x d x d product
        preserve_sq = len(p) * float(
            ((rows @ m_other.float() @ rows.T) * (pulled @ pulled.T)).sum().clamp_min(0)
        ) / count**2
    else:  # d right-hand sides
        r = (pulled.T @ c / count).double()
        h = torch.linalg.solve_triangular(root, r.T, upper=False).T  # R L⁻ᵀ
        text_map = torch.linalg.solve_triangular(root.T, h.T, upper=True).T.float()
        preserve_sq = len(p) * float(((text_map @ m_other.float()) * text_map).sum().clamp_min(0))
    # statistics without N x d^2 work: tr(G M Gᵀ) = tr(G Rᵀ) = ||h||², so the concept residual
    # Σ||g_i G c_i − (n_i − c_i)||² = Σ||n_i − c_i||² − N (||h||² + λ_p tr(G M_p Gᵀ) + λ E ||G||²)
    wanted_sq = float((n - c).norm()) ** 2
    residual_sq = wanted_sq - count * (
        float(torch.linalg.vector_norm(h)) ** 2 + settings.preserve_weight * preserve_sq / len(p)
        + settings.ridge * float(energy) * float(torch.linalg.vector_norm(text_map, dtype=torch.float64)) ** 2
    )
    stats = {
        "text_residual": max(residual_sq, 0.0) ** 0.5 / max(wanted_sq ** 0.5, 1e-12),
        "preserve_drift": preserve_sq ** 0.5 / max(float(p.norm()), 1e-12),
        "concept_tokens": int(count),
        "other_tokens": int(len(p)),
    }
    return h, root, stats


def low_rank_edits(
    weights: list[torch.Tensor], h: torch.Tensor, root: torch.Tensor, rank: int,
    *, seed: int = 0, power_iterations: int = 2,
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
    """
    d = h.shape[1]
    k = min(d, 2 * rank + 32)
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
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    for (d_out, _), members in by_shape.items():
        y = torch.empty(len(members), d_out, k, dtype=h_q.dtype, device=h_q.device)  # W itself is never copied
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
    return out  # type: ignore[return-value]


def default_rank(n_concepts: int, d_text: int) -> int:
    """32 for one concept, +8 per extra concept, at most 256 (or the text width)."""
    return min(d_text, 24 + 8 * n_concepts, 256)


def fit_adapter(pipe: Any, spec: ErasureSpec, settings: FitSettings, *, progress: bool | None = None) -> ACEAdapter:
    """Run the whole closed-form fit on ``pipe`` (nothing is loaded into the pipeline)."""
    started = time.perf_counter()
    unet = get_unet(pipe)
    modules = attach.cross_attention_modules(unet)
    names = sorted(modules)
    d_text = attach._weight(modules[names[0]].to_k).shape[1]
    rank = settings.rank if settings.rank is not None else default_rank(len(spec.concepts), d_text)
    _check_rank(rank, d_text)
    embedder = TextEmbedder(pipe)
    check_fit_size(embedder, spec, settings, d_text)
    with tqdm(total=3, desc="ACE closed form", disable=not progress, leave=False) as bar:
        bar.set_postfix_str("encoding prompts")
        data = collect_fit_data(embedder, spec, settings)
        if data.concept.shape[1] != d_text:
            raise ACEValueError(
                f"The text encoder produces {data.concept.shape[1]}-d tokens but the UNet cross-attends to "
                f"{d_text}-d tokens; this pipeline's text encoder and UNet do not belong together."
            )
        if not bool(data.gate_positive.any()):
            raise ACEValueError(
                f"The text encoder gives identical embeddings for {spec.concepts} and their neutral anchors "
                f"{spec.neutral}; there is nothing to erase. Check the spelling or choose another anchor."
            )
        bar.update()
        bar.set_postfix_str("gate and text map")
        negatives = torch.cat([data.concept[~data.gate_positive], data.others])
        gate_w, gate_b, gate_stats = fit_gate(data.concept[data.gate_positive], negatives, ridge=settings.gate_ridge)
        h, root, edit_stats = solve_text_map(data, gate_w, gate_b, settings)
        bar.update()
        bar.set_postfix_str("low-rank edits")
        weights = [attach._weight(getattr(modules[n], proj)).detach().cpu() for n in names for proj in ("to_k", "to_v")]
        factors = low_rank_edits(weights, h.float(), root.float(), rank)
        bar.update()
    layers = {}
    for i, name in enumerate(names):
        (k_down, k_up), (v_down, v_up) = factors[2 * i], factors[2 * i + 1]
        layers[name] = LayerFactors(k_down, k_up, v_down, v_up, gate_w.clone(), gate_b.clone())

    fit = {
        "settings": {**settings.to_dict(), "rank": rank},
        "templates": spec.templates,
        **({"phrase_templates": spec.phrase_templates} if spec.phrase_templates else {}),
        "preserve": spec.preserve,
        "stats": {**gate_stats, **edit_stats},
        "seconds": round(time.perf_counter() - started, 3),
    }
    base_model = getattr(getattr(pipe, "config", None), "_name_or_path", None) or None
    return ACEAdapter(
        layers,
        concepts=spec.concepts,
        neutral=spec.neutral,
        kind=spec.kind,
        method="closed-form",
        fit=fit,
        base_model=base_model if isinstance(base_model, str) else None,
    )


def estimate_fit_bytes(embedder: TextEmbedder, spec: ErasureSpec, settings: FitSettings, d_text: int) -> int:
    """Upper bound of the token embeddings held during a fit (concept + neutral prompts dominate)."""
    prompts = 2 * sum(len(spec.templates_for(c)) for c in spec.concepts)
    prompts += len(spec.unrelated_prompts()) + settings.preserve_templates * len(spec.preserve)
    return prompts * embedder.max_length * d_text * 4 * 3  # float32 embeddings, aligned copies, float64 solve


def check_fit_size(embedder: TextEmbedder, spec: ErasureSpec, settings: FitSettings, d_text: int) -> None:
    """Warn about truncated concepts; refuse fits that would not fit in memory, before any work."""
    tokenizer = embedder.encoders[0][0]
    for concept in spec.concepts:
        n_tokens = len(tokenizer(concept, add_special_tokens=False)["input_ids"])
        if n_tokens + 2 > embedder.max_length:
            warnings.warn(
                f"Concept {concept[:60]!r} is {n_tokens} tokens long; the text encoder keeps "
                f"{embedder.max_length - 2}, so it is truncated and only its beginning is erased.",
                ACETruncationWarning,
                stacklevel=3,
            )
    needed = estimate_fit_bytes(embedder, spec, settings, d_text)
    available = _available_memory()
    if available is not None and needed > 0.7 * available:
        raise ACEValueError(
            f"Erasing {len(spec.concepts)} concepts at once needs about {needed / 2**30:.1f} GiB for token "
            f"embeddings but about {available / 2**30:.1f} GiB is available; split the concepts into several "
            "adapters (they compose) or pass fewer templates."
        )


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_rank(rank: Any, d_text: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ACEValueError(f"rank must be a positive integer, got {rank!r}.")
    if rank > d_text:
        raise ACEValueError(f"rank {rank} exceeds the text width {d_text} of this UNet's cross-attention; use <= {d_text}.")


def erase_concept(
    pipe: Any,
    concepts: str | list[str],
    *,
    neutral: str | list[str] | None = None,
    kind: str | None = None,
    preserve: str | list[str] | None = None,
    rank: int | None = None,
    adapter_name: str | None = None,
    templates: list[str] | dict[str, list[str]] | None = None,
    scale: float = 1.0,
    preserve_weight: float = 0.05,
    load: bool = True,
    progress: bool | None = None,
    settings: FitSettings | None = None,
) -> ACEAdapter:
    """Erase ``concepts`` from ``pipe`` in closed form: fit an :class:`ACEAdapter`, load it, return it.

    Args:
        concepts: one phrase or a list (hundreds fit in one adapter).
        neutral: what the concept should turn into; default from ``kind`` (e.g. ``"art"`` for styles).
        kind: ``"object"``, ``"style"``, ``"celebrity"``, ``"explicit"`` or ``None`` (custom) — picks
            templates, anchor and preservation set (``ace_diffusers/data/presets.json``).
        preserve: concepts that must stay intact; default from ``kind``.
        rank: rank of the K/V edit per layer; default ``min(24 + 8 * len(concepts), 256, d_text)``.
        adapter_name: name in the pipeline; default derived from the first concept.
        load: set False to only fit (the pipeline is not changed).
        settings: advanced fitter settings (:class:`FitSettings`); ``rank``/``preserve_weight`` win.
    """
    spec = resolve_spec(concepts, neutral=neutral, kind=kind, preserve=preserve, templates=templates)
    unet = get_unet(pipe)
    if adapter_name is not None:
        attach.validate_adapter_name(adapter_name)
        if adapter_name in attach.loaded_adapters(unet):
            raise attach.ACEAdapterNameError(
                f"An ACE adapter named '{adapter_name}' is already loaded; choose another adapter_name."
            )
    if progress is None:
        progress = len(spec.concepts) >= 20
    settings = dataclasses.replace(settings or FitSettings(), preserve_weight=preserve_weight)
    if rank is not None:
        settings.rank = rank
    # The fit reads text embeddings and the base to_k/to_v weights only, so adapters already loaded
    # (ACE or PEFT LoRA) do not influence it.
    adapter = fit_adapter(pipe, spec, settings, progress=progress)
    if load:
        name = adapter_name or _default_name(unet, adapter)
        attach.attach_adapter(unet, adapter, name, scale=scale)
    return adapter


PREPARATION_PLACEHOLDER = "ace-diffusers preparation placeholder"  # stands in for the concepts to come


@dataclass
class Preparation:
    """What :func:`prepare_erasure` cached: for which kind, how many prompts, where, in how long."""

    kind: str
    neutral: list[str]
    prompts: int  # concept-independent prompts now in the cache (neutral, preservation, unrelated)
    cache_dir: str | None  # where they are kept for later processes too (None: memory only)
    seconds: float


def prepare_erasure(
    pipe: Any,
    *,
    kind: str | None = None,
    neutral: str | list[str] | None = None,
    preserve: str | list[str] | None = None,
    templates: list[str] | dict[str, list[str]] | None = None,
    settings: FitSettings | None = None,
) -> Preparation:
    """Pay, now, the part of :func:`erase_concept` that does not depend on the concept.

    Every fit of a kind encodes the same neutral-anchor prompts (in every template), preservation prompts
    and unrelated prompts. The first fit with a new text encoder encodes all of them (on a CPU that is
    more than the rest of a one-concept fit); afterwards they come from memory, or from the on-disk
    cache in a new process. A service that must answer its first request quickly calls this once per
    kind at start-up (or when building its image, so the disk cache ships with it); then each
    ``erase_concept`` with the same ``kind``/``neutral``/``preserve``/``templates`` encodes only the
    concept's own prompts. Nothing is fitted and the pipeline is not changed.

    The arguments mean what they mean for :func:`erase_concept`; ``neutral`` may list several anchors
    (each is prepared for fits that use it alone). What stays for a fit is its concept prompts and, for a
    fit of more concepts (more than eight, or more than one besides ``explicit``'s own terms) or of several
    anchors, the d x d second moment of its other tokens (one matrix product: which templates such a fit
    encodes in full depends on its number of concepts).
    """
    started = time.perf_counter()
    anchors = list(neutral) if isinstance(neutral, (list, tuple)) else [neutral]
    if not anchors:
        raise ACEValueError("neutral=[] names no anchor: pass None for the kind's default, or one or more anchors.")
    settings = settings or FitSettings()
    embedder = TextEmbedder(pipe)
    jobs: list[Job] = []
    prepared_anchors: list[str] = []
    moments = []  # (neutral jobs, other jobs) of each one-anchor layout whose second moment is kept
    concept_prefixes: list[Job] = []  # an empty anchor marks no phrase, so its prompts share no prefix
    for anchor in anchors:
        base = resolve_spec(PREPARATION_PLACEHOLDER, neutral=anchor, kind=kind, preserve=preserve, templates=templates)
        prepared_anchors.append(base.neutral[0])
        # per-phrase templates: the first concept's also serve the preserved phrases without their own
        for template_list in dict.fromkeys(tuple(t) for t in [base.templates, *base.phrase_templates.values()]):
            spec = dataclasses.replace(base, templates=list(template_list))
            fit = fit_jobs(spec, settings)  # the layout of a fit of one concept (plus the kind's own terms)
            every_layout = [  # more concepts take other templates at full length (full_length_template_indices)
                job for full in (set(range(len(template_list))), set())
                for job in _template_jobs(spec.neutral[0], list(template_list), full, settings)
            ]
            jobs += fit.concept_independent + every_layout
            moments.append((fit.neutral, fit.other))
            if not spec.neutral[0]:
                concept_prefixes += fit.concept
    jobs = list(dict.fromkeys(jobs))
    encoded = dict(zip(jobs + concept_prefixes, _encode_cached(embedder, jobs + concept_prefixes, persistent=jobs),
                       strict=True))
    for neutral_jobs, other_jobs in moments:
        _other_tokens(embedder, neutral_jobs, [encoded[j] for j in neutral_jobs], other_jobs,
                      [encoded[j] for j in other_jobs])
    root = embedding_cache.cache_root()
    return Preparation(
        kind=base.kind,
        neutral=list(dict.fromkeys(prepared_anchors)),
        prompts=len(jobs),
        cache_dir=str(root) if root is not None else None,
        seconds=round(time.perf_counter() - started, 3),
    )
