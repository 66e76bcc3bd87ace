"""Prompts -> the per-token text embeddings a pipeline's UNet cross-attends to.

Mirrors ``encode_prompt`` of the SD 1/2 pipelines (last hidden state of one encoder) and of SDXL
(penultimate hidden states of both encoders, concatenated), and additionally reports which tokens
spell the concept (character offsets -> token span), which the fitter needs to align concept tokens
with neutral-anchor tokens.

Speed: CLIP text encoders are causal, so the embedding of position ``i`` depends on tokens ``<= i``
only. Two exact savings follow: we may stop encoding a few padding tokens after the longest prompt
of a batch (the result is the prefix of the full 77-token encoding), and prompts that share their
tokens before the marked phrase (one template filled with many concepts) encode that shared prefix
once: its per-layer keys/values are computed for one row and every prompt's remaining tokens attend
to them (:func:`encode_with_shared_prefix`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .errors import ACECompatibilityError


@dataclass
class EncodedPrompt:
    """One prompt's token embeddings ``(tokens, d_text)`` and the token span of its marked phrase."""

    prompt: str
    embeddings: torch.Tensor
    span: tuple[int, int] | None  # [start, end) token indices of the phrase, if one was marked
    length: int  # tokens up to and including EOS


class TextEmbedder:
    """Encodes prompts exactly as ``pipe.encode_prompt`` would (SD 1.x/2.x and SDXL families)."""

    def __init__(self, pipe: object) -> None:
        encoders = []
        for tok_attr, enc_attr in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tokenizer, encoder = getattr(pipe, tok_attr, None), getattr(pipe, enc_attr, None)
            if tokenizer is not None and encoder is not None:
                encoders.append((tokenizer, encoder))
        if not encoders:
            raise ACECompatibilityError(
                f"{type(pipe).__name__} has no tokenizer/text_encoder pair; erase_concept needs the pipeline's "
                "text encoder(s) to find the concept's embeddings."
            )
        self.encoders = encoders
        # SDXL-style pipelines (two encoders) cross-attend to the penultimate layer of each encoder.
        self.penultimate = getattr(pipe, "text_encoder_2", None) is not None
        self.causal = all(isinstance(enc, (CLIPTextModel, CLIPTextModelWithProjection)) for _, enc in encoders)
        self.max_length = min(tok.model_max_length for tok, _ in encoders)

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0][1].parameters()).device

    def _tokenize(self, tokenizer, prompts: list[str]) -> dict:
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
            return_offsets_mapping=True,
        )

    @torch.no_grad()
    def encode(
        self,
        prompts: list[str],
        phrase_spans: list[tuple[int, int] | None] | None = None,
        *,
        extra_pad_tokens: int | None = 4,
        batch_size: int = 64,
        approximate: bool = False,
    ) -> list[EncodedPrompt]:
        """Encode ``prompts``; ``phrase_spans`` gives each phrase's character span (or None).

        ``extra_pad_tokens``: for causal encoders, keep only this many padding tokens after each batch's
        longest prompt (``None`` = all, i.e. the full ``model_max_length`` sequence).
        ``approximate``: truncate the padding of bidirectional encoders too (their outputs then differ
        from the pipeline's, a cheap proxy for screening many short phrases).
        """
        phrase_spans = phrase_spans or [None] * len(prompts)
        results: list[EncodedPrompt | None] = [None] * len(prompts)
        first_tokenizer = self.encoders[0][0]
        tokens = self._tokenize(first_tokenizer, prompts)
        lengths = tokens["attention_mask"].sum(dim=1).tolist()
        spans = [_token_span(tokens["offset_mapping"][i], phrase_spans[i], lengths[i]) for i in range(len(prompts))]
        all_ids = [tokens["input_ids"]] + [self._tokenize(tok, prompts)["input_ids"] for tok, _ in self.encoders[1:]]
        # prompts whose tokens before the phrase agree (in every tokenizer) encode that prefix once
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(len(prompts)):
            shared = spans[i][0] if spans[i] is not None and self._prefix_sharing else 0
            groups[tuple(tuple(ids[i, :shared].tolist()) for ids in all_ids)].append(i)
        for key, members in groups.items():
            shared = len(key[0])
            members.sort(key=lambda i: lengths[i])  # similar lengths batch together
            for start in range(0, len(members), batch_size):
                idx = members[start : start + batch_size]
                keep = self.max_length
                if (self.causal or approximate) and extra_pad_tokens is not None:
                    keep = min(self.max_length, max(lengths[i] for i in idx) + extra_pad_tokens)
                parts = []
                for (_, encoder), ids in zip(self.encoders, all_ids, strict=True):
                    batch_ids = ids[idx, :keep]
                    if shared > 1 and shared < keep:
                        parts.append(encode_with_shared_prefix(encoder, batch_ids, shared, self.penultimate))
                    else:
                        attention = tokens["attention_mask"][idx, :keep]
                        parts.append(self._run(encoder, {"input_ids": batch_ids, "attention_mask": attention}, keep))
                embeddings = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
                for row, i in enumerate(idx):
                    results[i] = EncodedPrompt(prompts[i], embeddings[row], spans[i], int(lengths[i]))
        return results  # type: ignore[return-value]

    @property
    def _prefix_sharing(self) -> bool:
        """Shared-prefix encoding needs causal CLIP encoders that ignore padding masks (as SD's do)."""
        return self.causal and all(
            not getattr(enc.config, "use_attention_mask", False) and _clip_text_model(enc) is not None
            for _, enc in self.encoders
        )

    def _run(self, encoder: nn.Module, tokens: dict, keep: int) -> torch.Tensor:
        input_ids = tokens["input_ids"][:, :keep].to(self.device)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens["attention_mask"][:, :keep].to(self.device)
        if self.penultimate:
            out = encoder(input_ids, attention_mask=mask, output_hidden_states=True)
            return out.hidden_states[-2].float()
        return encoder(input_ids, attention_mask=mask)[0].float()


def _token_span(offsets: torch.Tensor, chars: tuple[int, int] | None, length: int) -> tuple[int, int] | None:
    if chars is None:
        return None
    start_char, end_char = chars
    inside = [
        t
        for t in range(length)
        if offsets[t][1] > offsets[t][0] and offsets[t][0] < end_char and offsets[t][1] > start_char
    ]
    if not inside:  # the phrase was truncated away
        return None
    return inside[0], inside[-1] + 1


@torch.no_grad()
def encode_with_shared_prefix(encoder: nn.Module, input_ids: torch.Tensor, shared: int, penultimate: bool) -> torch.Tensor:
    """A CLIP text encoder's output for ``input_ids`` whose first ``shared`` tokens are the same in every row.

    Equal to ``encoder(input_ids)`` (last hidden state, or the penultimate layer's output for SDXL)
    up to float rounding: the shared prefix runs once as a single row; the other tokens of each row
    attend causally to the prefix's cached keys/values and to each other.
    """
    model = _clip_text_model(encoder)
    device = next(encoder.parameters()).device
    input_ids = input_ids.to(device)
    rows, length = input_ids.shape
    hidden = model.embeddings(input_ids=input_ids[:1, :shared])  # (1, P, d)
    tail = model.embeddings(input_ids=input_ids[:, shared:], position_ids=model.embeddings.position_ids[:, shared:length])
    allowed = torch.ones(length - shared, length, dtype=torch.bool, device=device).tril(diagonal=shared)
    layers = model.encoder.layers
    last = len(layers) - 1 if penultimate else len(layers)
    for layer in layers[:last]:
        attn = layer.self_attn
        normed_head, normed_tail = layer.layer_norm1(hidden), layer.layer_norm1(tail)

        def heads(x: torch.Tensor, projection: nn.Module, head_dim: int = attn.head_dim) -> torch.Tensor:
            return projection(x).view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)

        k_head, v_head = heads(normed_head, attn.k_proj), heads(normed_head, attn.v_proj)
        q_head = heads(normed_head, attn.q_proj)
        out_head = F.scaled_dot_product_attention(q_head, k_head, v_head, is_causal=True, scale=attn.scale)
        k_all = torch.cat([k_head.expand(rows, -1, -1, -1), heads(normed_tail, attn.k_proj)], dim=2)
        v_all = torch.cat([v_head.expand(rows, -1, -1, -1), heads(normed_tail, attn.v_proj)], dim=2)
        out_tail = F.scaled_dot_product_attention(heads(normed_tail, attn.q_proj), k_all, v_all, attn_mask=allowed, scale=attn.scale)
        hidden = hidden + attn.out_proj(out_head.transpose(1, 2).reshape(hidden.shape))
        tail = tail + attn.out_proj(out_tail.transpose(1, 2).reshape(tail.shape))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        tail = tail + layer.mlp(layer.layer_norm2(tail))
    out = torch.cat([hidden.expand(rows, -1, -1), tail], dim=1)
    if not penultimate:
        out = model.final_layer_norm(out)
    return out.float()


def _clip_text_model(encoder: nn.Module) -> nn.Module | None:
    """The module holding ``embeddings``, ``encoder.layers`` and ``final_layer_norm`` (CLIPTextModel itself
    in transformers 5, its ``text_model`` in 4.x and in ``CLIPTextModelWithProjection``), or None."""
    for model in (encoder, getattr(encoder, "text_model", None)):
        if model is not None and all(hasattr(model, a) for a in ("embeddings", "encoder", "final_layer_norm")):
            if hasattr(model.encoder, "layers") and hasattr(model.embeddings, "position_ids"):
                return model
    return None
