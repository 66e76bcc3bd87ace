"""Prompts -> the per-token text embeddings a pipeline's UNet cross-attends to.

Mirrors ``encode_prompt`` of the SD 1/2 pipelines (last hidden state of one encoder) and of SDXL
(penultimate hidden states of both encoders, concatenated), and additionally reports which tokens
spell the concept (character offsets -> token span), which the fitter needs to align concept tokens
with neutral-anchor tokens.

Speed: CLIP text encoders are causal, so the embedding of position ``i`` depends on tokens ``<= i``
only. Two exact savings follow: we may stop encoding a few padding tokens after a prompt's EOS (the
result is the prefix of the full 77-token encoding), and prompts that share their tokens before the
marked phrase (one template filled with many concepts) encode that shared prefix once: its
per-layer keys/values are computed once and every prompt's remaining tokens attend to them
(:func:`encode_with_shared_prefixes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .errors import ACECompatibilityError

# On a CPU an encoder pass costs about what 40 more tokens do (it streams all the weights; CLIP-L on
# 2 cores: ~55 ms per pass, ~1.45 ms per token), so batching and prefix sharing trade against it.
PASS_COST_TOKENS = 40


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
        extra_pad_tokens: int | None | list[int | None] = 4,
        batch_size: int = 64,
        approximate: bool = False,
    ) -> list[EncodedPrompt]:
        """Encode ``prompts``; ``phrase_spans`` gives each phrase's character span (or None).

        ``extra_pad_tokens``: for causal encoders, keep only this many padding tokens after each
        prompt's EOS (``None`` = all, i.e. the full ``model_max_length`` sequence); one value for all
        prompts or one per prompt. What a prompt gets never depends on the other prompts of the call.
        ``approximate``: truncate the padding of bidirectional encoders too (their outputs then differ
        from the pipeline's, a cheap proxy for screening many short phrases).
        """
        phrase_spans = phrase_spans or [None] * len(prompts)
        extra = extra_pad_tokens if isinstance(extra_pad_tokens, list) else [extra_pad_tokens] * len(prompts)
        if len(extra) != len(prompts) or len(phrase_spans) != len(prompts):
            raise ValueError("phrase_spans and a list of extra_pad_tokens need one entry per prompt.")
        if not prompts:
            return []
        first_tokenizer = self.encoders[0][0]
        tokens = self._tokenize(first_tokenizer, prompts)
        lengths = tokens["attention_mask"].sum(dim=1).tolist()
        spans = [_token_span(tokens["offset_mapping"][i], phrase_spans[i], lengths[i]) for i in range(len(prompts))]
        all_ids = [tokens["input_ids"]] + [self._tokenize(tok, prompts)["input_ids"] for tok, _ in self.encoders[1:]]
        truncates = self.causal or approximate
        keep = [
            self.max_length if e is None or not truncates else min(self.max_length, lengths[i] + e)
            for i, e in enumerate(extra)
        ]
        if self._prefix_sharing:
            # split each row before its phrase; rows whose tokens before the split agree share that prefix
            # (any split point is exact: each encoder groups rows by its own tokens)
            shared = [spans[i][0] if spans[i] is not None else 0 for i in range(len(prompts))]
            parts = [
                encode_with_shared_prefixes(encoder, ids, shared, keep, self.penultimate, batch_size=batch_size)
                for (_, encoder), ids in zip(self.encoders, all_ids, strict=True)
            ]
            rows = [torch.cat([part[i] for part in parts], dim=-1) if len(parts) > 1 else parts[0][i] for i in range(len(prompts))]
        else:
            rows = [None] * len(prompts)
            order = sorted(range(len(prompts)), key=lambda i: keep[i])  # similar lengths batch together
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(keep[i] for i in idx)
                parts = [
                    self._run(encoder, {"input_ids": ids[idx], "attention_mask": tokens["attention_mask"][idx]}, width)
                    for (_, encoder), ids in zip(self.encoders, all_ids, strict=True)
                ]
                embeddings = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
                for row, i in enumerate(idx):
                    rows[i] = embeddings[row, : keep[i]]
        return [EncodedPrompt(prompts[i], rows[i], spans[i], int(lengths[i])) for i in range(len(prompts))]

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
def encode_with_shared_prefixes(
    encoder: nn.Module,
    input_ids: torch.Tensor,
    shared: list[int],
    keep: list[int],
    penultimate: bool,
    *,
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """A causal CLIP text encoder's output for each row of ``input_ids``, first ``keep[i]`` positions.

    Row ``i``'s first ``shared[i]`` tokens are its *prefix*; rows with the same prefix (one template
    filled with many phrases) share it. Every distinct prefix runs once, all of them in one batch;
    then each row's remaining tokens run, batched with rows of similar length whatever their prefix,
    attending causally to their own prefix's cached per-layer keys/values and to each other.
    Equal to ``encoder(input_ids)[i, :keep[i]]`` (last hidden state, or the penultimate layer's output
    for SDXL) up to float rounding, because position ``j`` of a causal encoder reads positions ``<= j``
    only. Few large batches matter on CPUs: each pass streams all the encoder's weights.
    """
    model = _clip_text_model(encoder)
    device = next(encoder.parameters()).device
    input_ids = input_ids.to(device)
    n_rows, width = input_ids.shape
    layers = model.encoder.layers
    last = len(layers) - 1 if penultimate else len(layers)
    finish = (lambda x: x) if penultimate else model.final_layer_norm
    # share a prefix only where it saves more than a pass costs: >= 2 rows, and enough tokens in all
    counts: dict[tuple[int, ...], int] = {}
    keys = [tuple(input_ids[i, : shared[i]].tolist()) if shared[i] >= 2 else () for i in range(n_rows)]
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    saved = sum((c - 1) * len(key) for key, c in counts.items() if c > 1)
    if saved <= PASS_COST_TOKENS:
        keys = [()] * n_rows
    shared = [len(key) if counts.get(key, 0) > 1 else 0 for key in keys]

    # 1. every distinct prefix, once, in one causal batch (right-padded: later positions never leak back)
    group_of: dict[tuple[int, ...], int] = {}
    owner = [group_of.setdefault(key, len(group_of)) if shared[i] else -1 for i, key in enumerate(keys)]
    prefixes = [key for key in group_of]
    prefix_len = max((len(k) for k in prefixes), default=0)
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    prefix_out = None
    if prefixes:
        ids = torch.tensor([list(k) + [k[-1]] * (prefix_len - len(k)) for k in prefixes], device=device)
        hidden = model.embeddings(input_ids=ids)
        for layer in layers[:last]:
            normed = layer.layer_norm1(hidden)
            q, k, v = (_heads(proj(normed), layer.self_attn.head_dim) for proj in _qkv(layer))
            prefix_kv.append((k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.self_attn.scale)
            hidden = hidden + layer.self_attn.out_proj(_merge(out))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        prefix_out = finish(hidden)

    # 2. every row's tail, in batches of similar tail length
    tail_len = [keep[i] - shared[i] for i in range(n_rows)]
    order = sorted(range(n_rows), key=lambda i: tail_len[i])
    batches, current = [], []
    for i in order:  # a batch runs at its longest tail: start a new one when padding would cost more than a pass
        if current and (len(current) == batch_size or len(current) * (tail_len[i] - tail_len[current[-1]]) > PASS_COST_TOKENS):
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    max_position = model.embeddings.position_embedding.weight.shape[0]
    pad_id = int(input_ids[0, -1])
    results: list[torch.Tensor | None] = [None] * n_rows
    for idx in batches:
        length = max(tail_len[i] for i in idx)
        starts = torch.tensor([shared[i] for i in idx], device=device)
        positions = starts[:, None] + torch.arange(length, device=device)[None]
        padded = torch.cat([input_ids[idx], torch.full((len(idx), length), pad_id, device=device)], dim=1)
        ids = padded.gather(1, positions)  # beyond a row's keep: filler, never read by its kept positions
        tail = model.embeddings(input_ids=ids, position_ids=positions.clamp_max(max_position - 1))
        allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if prefixes:
            rows_owner = torch.tensor([max(owner[i], 0) for i in idx], device=device)
            sees_prefix = torch.arange(prefix_len, device=device)[None] < starts[:, None]  # (rows, P)
            allowed = torch.cat(
                [sees_prefix[:, None, :].expand(-1, length, -1), allowed.expand(len(idx), -1, -1)], dim=2
            ).unsqueeze(1)  # (rows, 1, T, P + T)
        for layer_index, layer in enumerate(layers[:last]):
            normed = layer.layer_norm1(tail)
            q, k, v = (_heads(proj(normed), layer.self_attn.head_dim) for proj in _qkv(layer))
            if prefixes:
                k_prefix, v_prefix = prefix_kv[layer_index]
                k = torch.cat([k_prefix[rows_owner], k], dim=2)
                v = torch.cat([v_prefix[rows_owner], v], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=layer.self_attn.scale)
            tail = tail + layer.self_attn.out_proj(_merge(out))
            tail = tail + layer.mlp(layer.layer_norm2(tail))
        tail = finish(tail)
        for row, i in enumerate(idx):
            head = prefix_out[owner[i], : shared[i]] if shared[i] else tail[row, :0]
            results[i] = torch.cat([head, tail[row, : tail_len[i]]]).float()
    return results  # type: ignore[return-value]


def _qkv(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    attn = layer.self_attn
    return attn.q_proj, attn.k_proj, attn.v_proj


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _clip_text_model(encoder: nn.Module) -> nn.Module | None:
    """The module holding ``embeddings``, ``encoder.layers`` and ``final_layer_norm`` (CLIPTextModel itself
    in transformers 5, its ``text_model`` in 4.x and in ``CLIPTextModelWithProjection``), or None."""
    for model in (encoder, getattr(encoder, "text_model", None)):
        if model is not None and all(hasattr(model, a) for a in ("embeddings", "encoder", "final_layer_norm")):
            if hasattr(model.encoder, "layers") and hasattr(model.embeddings, "position_ids"):
                return model
    return None
