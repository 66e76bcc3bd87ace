"""Baselines for the erasure benchmarks, implemented from their published formulas (no code copied).

Both edit the UNet's weights in place and return a :class:`WeightEdit` — the undo handle that restores
the original weights bit-exactly (``restore()``), re-applies the edit (``reapply()``), or shows the
original model temporarily (``with edit.original(): ...``, what :func:`ace_diffusers.eval.evaluate`
takes as ``original=edit.original``). ``edit.seconds`` is the fit time.

**UCE** (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024), closed form on
every cross-attention ``to_k`` / ``to_v`` — no gate, no low rank::

    W' = (λ W + e Σ_i W n_i c_iᵀ + s Σ_j W p_j p_jᵀ) (λ I + e Σ_i c_i c_iᵀ + s Σ_j p_j p_jᵀ)⁻¹

``c_i``: the text-encoder output at the concept's *last* token (one per concept and template, as in
the paper's code, where the prompt is the concept itself); ``n_i``: the neutral anchor's last token in
the same template (for an empty anchor, the token before the concept's position — BOS for the bare
concept); ``p_j``: the last token of each preserved concept; ``e`` = ``erase_scale``,
``s`` = ``preserve_scale``, ``λ`` = ``lamb`` (keeps ``W'`` close to ``W`` on everything else). Because
all layers read the same text tokens, ``W' = W G`` with one shared ``d_text x d_text`` matrix ``G``.
Defaults follow the authors' current script: ``lamb=0.5``, ``erase_scale=1``, ``preserve_scale=1``,
templates ``["{}"]``, ``tokens="last"``. ``tokens="aligned"`` (not in the paper) uses *every* token of
each template instead — the concept's tokens paired with the anchor's, the others with themselves, and
all tokens of the preserved prompts — the data ACE's closed form sees; useful with bidirectional text
encoders (the miniature world's BERT), where the concept leaks into every token.

**ESD-x** (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023), fine-tuning of the
cross-attention parameters (every parameter under ``attn2``: ``to_q``, ``to_k``, ``to_v``, ``to_out``;
``parameters="kv"`` restricts it to ``to_k``/``to_v``) with the negative-guidance loss::

    || ε_θ(x_t, c, t) − [ε*(x_t, t) − η (ε*(x_t, c, t) − ε*(x_t, t))] ||²

``ε*`` is the frozen original model (unconditional and concept-conditioned), ``x_t`` are intermediate
latents of the frozen model's own classifier-free-guided generations of the concept prompt. We draw
them once into a bank (``trajectories`` images per prompt, every denoising step but the first), and
record ``ε*(x_t, c)`` and ``ε*(x_t)`` — the two halves of the guided prediction — on the way, so a
training step costs one UNet forward/backward. (The authors re-sample one trajectory per step, partly
with the model being trained; a fixed frozen-model bank gives the same loss at a fraction of the cost.)
Published settings for SD 1.4: 1000 iterations, Adam lr 1e-5, η = 1, 50 DDIM steps, start guidance 3.
Defaults here are sized for the CPU miniature world: ``steps=200``, ``learning_rate=1e-4``,
``negative_guidance=1.0``, ``guidance_scale=3.0``, ``trajectories=4`` per prompt, ``batch_size=4``,
the pipeline's scheduler with ``num_inference_steps=25``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ACEValueError
from ..fitting.data import align_tokens
from ..fitting.presets import filled
from ..fitting.text import TextEmbedder
from ..integration.modules import cross_attention_modules, get_unet
from ..integration.modules import projection_weight as base_weight
from .common import check_sd_pipeline, seeded_latents
from .weight_edit import WeightEdit


def _weight(linear: nn.Module) -> nn.Parameter:
    return base_weight(linear)


# ---------------------------------------------------------------------- UCE
def _as_list(value: str | Sequence[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    out = list(value)
    if not all(isinstance(v, str) for v in out):
        raise ACEValueError(f"{what} must be strings.")
    return out


def _last_token(span: tuple[int, int] | None, fallback: int) -> int:
    return span[1] - 1 if span is not None else fallback


def uce_text_map(
    concept: torch.Tensor,
    target: torch.Tensor,
    preserve: torch.Tensor | None = None,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
) -> torch.Tensor:
    """UCE's solution as a text-space map ``G`` (float64) with ``W' = W G`` for every projection ``W``:
    ``G = (λ I + e Σ n_i c_iᵀ + s Σ p_j p_jᵀ)(λ I + e Σ c_i c_iᵀ + s Σ p_j p_jᵀ)⁻¹`` (rows are tokens)."""
    c, n = concept.double(), target.double()
    if c.shape != n.shape or c.ndim != 2:
        raise ACEValueError(
            f"concept and target embeddings must both be (N, d); got {tuple(c.shape)} and {tuple(n.shape)}."
        )
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    left = lamb * eye + erase_scale * n.T @ c
    right = lamb * eye + erase_scale * c.T @ c
    if preserve is not None and len(preserve):
        p = preserve.double()
        left = left + preserve_scale * p.T @ p
        right = right + preserve_scale * p.T @ p
    return torch.linalg.solve(right, left.T).T  # left @ right⁻¹ (right is symmetric)


def _uce_arguments(
    concepts: str | Sequence[str], neutral: str | Sequence[str], preserve: str | Sequence[str] | None,
    templates: Sequence[str], lamb: float, tokens: str,
) -> tuple[list[str], list[str], list[str]]:
    """Checked ``(concepts, one neutral anchor per concept, preserved concepts that are not erased)``."""
    concept_list = _as_list(concepts, "concepts")
    if not concept_list or any(not c.strip() for c in concept_list):
        raise ACEValueError("uce_erase needs at least one non-empty concept.")
    anchors = _as_list(neutral, "neutral")
    if len(anchors) == 1:
        anchors = anchors * len(concept_list)
    if len(anchors) != len(concept_list):
        raise ACEValueError(f"Got {len(concept_list)} concepts but {len(anchors)} neutral anchors.")
    keep = [p for p in _as_list(preserve, "preserve") if p.lower() not in {c.lower() for c in concept_list}]
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ACEValueError("Each template must contain '{}' exactly once.")
    if lamb <= 0:
        raise ACEValueError(f"lamb must be positive (it keeps the solve well-posed), got {lamb}.")

    if tokens not in ("last", "aligned"):
        raise ACEValueError(f"tokens must be 'last' (published UCE) or 'aligned', got {tokens!r}.")
    return concept_list, anchors, keep


def _encode_phrases(
    embedder: TextEmbedder, phrases: list[str], templates: Sequence[str]
) -> list[tuple[Any, int]]:
    """(encoded prompt, index of the token just before the phrase) per phrase and template."""
    tokenizer = embedder.encoders[0][0]
    prompts, spans, befores = [], [], []
    for phrase in phrases:
        for template in templates:
            start = template.index("{}")
            prompts.append(filled(template, phrase))
            spans.append((start, start + len(phrase)) if phrase else None)
            # +1 for BOS/CLS: where the phrase starts; minus one: the token before it (BOS for the bare
            # concept)
            befores.append(len(tokenizer(template[:start], add_special_tokens=False)["input_ids"]))
    encoded = embedder.encode(prompts, spans, extra_pad_tokens=None)
    return list(zip(encoded, befores, strict=True))


def _last_embedding(enc: Any, before: int) -> torch.Tensor:
    index = _last_token(enc.span, before)
    return enc.embeddings[min(index, len(enc.embeddings) - 1)].double()


def _uce_rows(
    pipe: Any, concepts: list[str], anchors: list[str], keep: list[str], templates: Sequence[str], tokens: str
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The data of UCE's solve: concept tokens ``c``, their targets ``n``, preserved tokens ``p``
    (float64)."""
    embedder = TextEmbedder(pipe)
    concept_enc = _encode_phrases(embedder, concepts, templates)
    by_anchor = {anchor: _encode_phrases(embedder, [anchor], templates) for anchor in dict.fromkeys(anchors)}
    anchor_enc = [row for anchor in anchors for row in by_anchor[anchor]]
    keep_enc = _encode_phrases(embedder, keep, templates) if keep else []
    c_rows: list[torch.Tensor] = []
    n_rows: list[torch.Tensor] = []
    if tokens == "last":
        for (ce, cb), (ne, nb) in zip(concept_enc, anchor_enc, strict=True):
            c_rows.append(_last_embedding(ce, cb))
            n_rows.append(_last_embedding(ne, nb))
        p_rows = [_last_embedding(pe, pb) for pe, pb in keep_enc]
    else:
        for (ce, _), (ne, _) in zip(concept_enc, anchor_enc, strict=True):
            for i, j in align_tokens(ce, ne):
                c_rows.append(ce.embeddings[i].double())
                n_rows.append(ne.embeddings[j].double())
        p_rows = [row.double() for pe, _ in keep_enc for row in pe.embeddings]
    return c_rows, n_rows, p_rows


def _apply_text_map(
    pipe: Any, text_map: torch.Tensor
) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor]]:
    """``W ← W G`` on every cross-attention ``to_k``/``to_v``: ``(edited parameters, their original
    values)``."""
    unet = get_unet(pipe)
    params: dict[str, nn.Parameter] = {}
    originals: dict[str, torch.Tensor] = {}
    for name, attn in sorted(cross_attention_modules(unet).items()):
        for proj in ("to_k", "to_v"):
            weight = _weight(getattr(attn, proj))
            key = f"{name}.{proj}.weight"
            params[key] = weight
            originals[key] = weight.detach().clone()
    for key, weight in params.items():
        new = (originals[key].double() @ text_map.to(originals[key].device)).to(weight.dtype)
        weight.copy_(new)
    return params, originals


@torch.no_grad()
def uce_erase(
    pipe: Any,
    concepts: str | Sequence[str],
    neutral: str | Sequence[str] = "",
    preserve: str | Sequence[str] | None = None,
    *,
    templates: Sequence[str] = ("{}",),
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
    tokens: str = "last",
) -> WeightEdit:
    """UCE: closed-form edit of every cross-attention ``to_k``/``to_v`` (module docstring); returns the
    undo handle."""

    started = time.perf_counter()
    concept_list, anchors, keep = _uce_arguments(concepts, neutral, preserve, templates, lamb, tokens)
    c_rows, n_rows, p_rows = _uce_rows(pipe, concept_list, anchors, keep, templates, tokens)
    c = torch.stack(c_rows)
    n = torch.stack(n_rows)
    p = torch.stack(p_rows) if p_rows else None
    text_map = uce_text_map(c, n, p, erase_scale=erase_scale, preserve_scale=preserve_scale, lamb=lamb)
    params, originals = _apply_text_map(pipe, text_map)
    moved = (c @ text_map.T - n).norm() / (n - c).norm().clamp_min(1e-12)
    stats = {
        "concept_tokens": len(c_rows),
        "tokens": tokens,
        "preserve_tokens": len(p_rows),
        # ||G c − n|| / ||c − n||: 0 = concept tokens fully mapped to the anchor
        "concept_residual": float(moved),
    }
    if p is not None:
        stats["preserve_drift"] = float((p @ text_map.T - p).norm() / p.norm().clamp_min(1e-12))
    settings = {"concepts": concept_list, "neutral": anchors, "preserve": keep, "templates": list(templates),
                "erase_scale": erase_scale, "preserve_scale": preserve_scale, "lamb": lamb, "tokens": tokens}
    return WeightEdit("uce", params, originals, settings, time.perf_counter() - started, stats)


# ---------------------------------------------------------------------- ESD-x
def _esd_parameters(unet: nn.Module, which: str) -> dict[str, nn.Parameter]:
    if which not in ("xattn", "kv"):
        raise ACEValueError(f"parameters must be 'xattn' (all attn2 weights, ESD-x) or 'kv', got {which!r}.")
    chosen = {}
    for name, param in unet.named_parameters():
        if "attn2" not in name or "lora_" in name or ".ace_" in name:
            continue
        if which == "kv" and not (".to_k." in name or ".to_v." in name):
            continue
        chosen[name] = param
    if not chosen:
        raise ACEValueError("The UNet has no cross-attention (attn2) parameters to fine-tune.")
    return chosen


@torch.no_grad()
def _trajectory_bank(pipe: Any, prompts: list[str], *, trajectories: int, num_inference_steps: int,
                     guidance_scale: float, height: int | None, width: int | None, seed: int,
                     ) -> tuple[torch.Tensor, ...]:
    """Frozen-model generations of each prompt: ``(x_t, t, prompt index, ε*(x_t, c), ε*(x_t), prompt
    embeds)``."""

    device, dtype = pipe._execution_device, pipe.unet.dtype
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    embeds = torch.cat([pipe.encode_prompt(p, device, 1, False)[0] for p in prompts])
    uncond = pipe.encode_prompt("", device, 1, False)[0]
    xs, ts, idx, e_cs, e_us = [], [], [], [], []
    for p_index in range(len(prompts)):
        seeds = [seed * 1000 + 20_000 + p_index * trajectories + k for k in range(trajectories)]
        x = seeded_latents(pipe, seeds, height, width)
        scheduler.set_timesteps(num_inference_steps, device=device)
        cond = embeds[p_index : p_index + 1].expand(trajectories, -1, -1)
        context = torch.cat([uncond.expand(trajectories, -1, -1), cond])
        for step, t in enumerate(scheduler.timesteps):
            x_in = scheduler.scale_model_input(x, t)
            out = pipe.unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=context).sample
            e_u, e_c = out.chunk(2)
            if step > 0 or num_inference_steps <= 2:  # ESD samples t strictly inside the trajectory
                xs.append(x_in.float().cpu())
                ts.append(torch.full((trajectories,), int(t)))
                idx.append(torch.full((trajectories,), p_index))
                e_cs.append(e_c.float().cpu())
                e_us.append(e_u.float().cpu())
            guided = e_u + guidance_scale * (e_c - e_u)
            x = scheduler.step(guided, t, x).prev_sample.to(dtype)
    return torch.cat(xs), torch.cat(ts), torch.cat(idx), torch.cat(e_cs), torch.cat(e_us), embeds.detach()


def _check_esd_arguments(
    pipe: Any, concept: str, steps: int, trajectories: int, batch_size: int, num_inference_steps: int,
    learning_rate: float,
) -> None:
    check_sd_pipeline(pipe, "esd_x_erase")
    if not isinstance(concept, str) or not concept.strip():
        raise ACEValueError("esd_x_erase needs a non-empty concept string.")
    for name, value in (("steps", steps), ("trajectories", trajectories), ("batch_size", batch_size),
                        ("num_inference_steps", num_inference_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
            raise ACEValueError(f"{name} must be a positive integer, got {value!r}.")
    if not learning_rate > 0:
        raise ACEValueError(f"learning_rate must be positive, got {learning_rate!r}.")


def _fine_tune(
    pipe: Any, chosen: dict[str, nn.Parameter], originals: dict[str, torch.Tensor],
    bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], *,
    steps: int, learning_rate: float, batch_size: int, seed: int,
) -> list[float]:
    """Adam on ``chosen`` against ``bank`` = ``(x_t, t, prompt index, target, prompt embeds)``; the loss
    per step. Gradient flags and the training mode are restored afterwards; an interrupted run also
    puts the original weights back."""
    unet = get_unet(pipe)
    x_t, t_all, p_idx, targets, embeds = bank
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    was_training = unet.training
    device, dtype = pipe._execution_device, unet.dtype
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    try:
        unet.requires_grad_(False)
        for p in chosen.values():
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(list(chosen.values()), lr=learning_rate)
        for _ in range(steps):
            batch = torch.randint(len(x_t), (min(batch_size, len(x_t)),), generator=generator)
            pred = unet(x_t[batch].to(device, dtype), t_all[batch].to(device),
                        encoder_hidden_states=embeds[p_idx[batch]].to(device, dtype)).sample
            loss = F.mse_loss(pred.float(), targets[batch].to(pred.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
    except BaseException:
        with torch.no_grad():
            for n, p in chosen.items():
                p.copy_(originals[n])
        raise
    finally:
        for n, p in unet.named_parameters():
            p.requires_grad_(flags[n])
        for p in chosen.values():
            p.grad = None
        unet.train(was_training)
    return history


def esd_x_erase(
    pipe: Any,
    concept: str,
    *,
    steps: int = 200,
    learning_rate: float = 1e-4,
    negative_guidance: float = 1.0,
    parameters: str = "xattn",
    prompts: Sequence[str] | None = None,
    trajectories: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 4,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
) -> WeightEdit:
    """ESD-x: fine-tune cross-attention weights with ESD's negative-guidance loss (module docstring).

    ``prompts``: prompts naming the concept (default: the concept itself, as ESD does); the loss is
    conditioned on them. Returns the undo handle; ``seconds`` includes drawing the trajectory bank.
    """

    _check_esd_arguments(pipe, concept, steps, trajectories, batch_size, num_inference_steps, learning_rate)
    prompt_list = list(prompts) if prompts else [concept]
    started = time.perf_counter()
    unet = get_unet(pipe)
    chosen = _esd_parameters(unet, parameters)
    originals = {n: p.detach().clone() for n, p in chosen.items()}

    x_t, t_all, p_idx, e_c, e_u, embeds = _trajectory_bank(
        pipe, prompt_list, trajectories=trajectories, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, height=height, width=width, seed=seed,
    )
    targets = e_u - negative_guidance * (e_c - e_u)
    bank_seconds = time.perf_counter() - started
    history = _fine_tune(pipe, chosen, originals, (x_t, t_all, p_idx, targets, embeds), steps=steps,
                         learning_rate=learning_rate, batch_size=batch_size, seed=seed)

    settings = {"concept": concept, "prompts": prompt_list, "steps": steps, "learning_rate": learning_rate,
                "negative_guidance": negative_guidance, "parameters": parameters,
                "trajectories": trajectories, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "batch_size": batch_size, "seed": seed}
    window = max(1, min(20, len(history) // 5))
    stats = {"bank_size": len(x_t), "bank_seconds": round(bank_seconds, 3),
             "loss_first": sum(history[:window]) / window if history else None,
             "loss_last": sum(history[-window:]) / window if history else None}
    return WeightEdit("esd-x", dict(chosen), originals, settings, time.perf_counter() - started, stats)
