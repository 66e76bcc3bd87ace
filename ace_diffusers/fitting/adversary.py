"""Embedding-space adversaries for fine-tuning: soft input embeddings of the concept's tokens that slip
through the current adapter (AdvUnlearn/RECE-style), found by a few projected gradient steps.

Given the adapter's factors ``θ`` and a prompt ``P`` naming the concept, the concept's input embeddings
``x`` (in the text encoder's input space, before any layer) are moved to minimise

    Σ_layers ||Attn_θ(q, E(P; x)) − Attn(q, E(P))||² / ||Attn(q, E(P))||²

— the *edited* model's attention output on the perturbed prompt against the *original* model's on the
concept — within a ball of ``radius`` times each token's norm around its own embedding. The encoded
result becomes one more prompt to erase.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .attention import QueryLayer, attention_output, encode_full
from .text import TextEmbedder


def soft_adversary(
    embedder: TextEmbedder,
    layers: list[QueryLayer],
    params: Any,
    prompt: str,
    concept_at: tuple[int, str],
    *,
    radius: float,
    steps: int,
) -> torch.Tensor | None:
    """The encoded ``prompt`` (1, T, d) with the concept's input embeddings replaced by an adversary;
    ``concept_at``: (character offset, text) of the concept in ``prompt``; ``params``: the adapter's
    factors, detached. ``None`` when the concept's tokens are not found or the pipeline has several
    text encoders."""
    start, concept = concept_at
    tokens, span = concept_tokens(embedder, prompt, start, concept)
    encoder = embedder.encoders[0][1]
    if not span or len(embedder.encoders) != 1:
        return None
    with torch.no_grad():
        original = encode_full(embedder, [prompt])
        wanted = [attention_output(layer, original, None) for layer in layers]
    embedding_module = token_embedding(encoder)
    init = embedding_module(tokens["input_ids"][:, span]).detach().float()
    soft = (
        init + 0.1 * init.norm(dim=-1, keepdim=True) * torch.randn_like(init) / math.sqrt(init.shape[-1])
    ).requires_grad_(True)
    ball = radius * init.norm(dim=-1, keepdim=True)
    optimizer = torch.optim.Adam([soft], lr=0.05 * float(init.norm(dim=-1).mean()))

    def replace(module, args, output):
        output = output.clone()
        output[:, span] = soft.to(output.dtype)
        return output

    handle = embedding_module.register_forward_hook(replace)
    try:
        for _ in range(steps):
            context = run_encoder(embedder, tokens["input_ids"])
            loss = sum(
                ((attention_output(layer, context, params) - w) ** 2).mean() / w.pow(2).mean()
                for layer, w in zip(layers, wanted, strict=True)
            )
            # the soft input's gradient only: none is computed for, or left on, the text encoder
            (soft.grad,) = torch.autograd.grad(loss, [soft])
            optimizer.step()
            with torch.no_grad():  # stay near the concept's own embedding
                delta = soft - init
                soft.copy_(
                    init
                    + delta * torch.clamp(ball / delta.norm(dim=-1, keepdim=True).clamp_min(1e-8), max=1.0)
                )
        with torch.no_grad():
            source = run_encoder(embedder, tokens["input_ids"])
    finally:
        handle.remove()
    return source.detach()


def token_embedding(encoder: torch.nn.Module) -> torch.nn.Module:
    """The embedding module the encoder's forward calls on input ids: ``get_input_embeddings()``, or the
    tied copy an encoder calls instead (T5's ``encoder.embed_tokens`` shares ``shared``'s weight) — where
    a hook must sit to replace token embeddings."""
    table = encoder.get_input_embeddings()
    tied = [
        m
        for m in encoder.modules()
        if isinstance(m, torch.nn.Embedding) and m is not table and m.weight is table.weight
    ]
    return tied[-1] if tied else table


def run_encoder(embedder: TextEmbedder, input_ids: torch.Tensor) -> torch.Tensor:
    """What the cross-attention reads of ``input_ids`` (the first text encoder's tokens, through a
    transformer's caption projection if it has one), differentiably; where the denoiser masks padding out
    (T5 pipelines) the padding rows are zero, as :func:`.attention.encode_full` leaves them."""
    tokenizer, encoder = embedder.encoders[0]
    mask = torch.ones_like(input_ids)
    if embedder.masked_context:
        mask = (input_ids != tokenizer.pad_token_id).long()
    if embedder.instruction is not None:  # Sana: ids of instruction + prompt (:func:`concept_tokens`)
        out = embedder.run_instructed(input_ids, mask)
        mask = mask[:, embedder.instruction.rows()]
    else:
        tokens = {"input_ids": input_ids, "attention_mask": mask}
        out = embedder.run_encoder(encoder, tokens, input_ids.shape[1])
    if embedder.context_map is not None:
        out = embedder.context_map(out.to(next(embedder.context_map.parameters()).dtype)).float()
    return out * mask[..., None].to(out) if embedder.masked_context else out


def concept_tokens(embedder: TextEmbedder, prompt: str, start: int, concept: str) -> tuple[dict, list[int]]:
    """The padded tokenisation of ``prompt`` (as the pipeline's tokenizer receives it: behind Sana's
    instruction, right-padded) and the positions of the tokens that spell ``concept``."""
    (prompt,), ((start, _),) = embedder.as_read([prompt], [(start, start + len(concept))])
    length, instruction = embedder.max_length, embedder.instruction
    if instruction is not None:  # Sana reads the prompt behind its instruction (:mod:`.instructed`)
        prompt, start, length = instruction.text + prompt, start + len(instruction.text), instruction.total
    tokens = embedder.encoders[0][0](
        prompt,
        padding="max_length",
        max_length=length,
        truncation=True,
        return_tensors="pt",
        return_offsets_mapping=True,
        padding_side="right",
    )
    offsets = tokens["offset_mapping"][0]
    span = [
        t
        for t in range(len(offsets))
        if offsets[t][1] > offsets[t][0] and offsets[t][0] < start + len(concept) and offsets[t][1] > start
    ]
    return tokens, span
