"""Prompts -> the per-token text embeddings a pipeline's UNet cross-attends to.

Mirrors ``encode_prompt`` of the SD 1/2 pipelines (last hidden state of one encoder) and of SDXL
(penultimate hidden states of both encoders, concatenated), and additionally reports which tokens
spell the concept (character offsets -> token span), which the fitter needs to align concept tokens
with neutral-anchor tokens.

Speed: CLIP text encoders are causal, so the embedding of position ``i`` depends on tokens ``<= i``
only. For them we may stop encoding a few padding tokens after the longest prompt of a batch; the
result is *exactly* the prefix of the full 77-token encoding, at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
    ) -> list[EncodedPrompt]:
        """Encode ``prompts``; ``phrase_spans`` gives each phrase's character span (or None).

        ``extra_pad_tokens``: for causal encoders, keep only this many padding tokens after each batch's
        longest prompt (``None`` = all, i.e. the full ``model_max_length`` sequence).
        """
        phrase_spans = phrase_spans or [None] * len(prompts)
        results: list[EncodedPrompt | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [prompts[i] for i in idx]
            first = self._tokenize(self.encoders[0][0], batch)
            lengths = first["attention_mask"].sum(dim=1).tolist()
            keep = self.max_length
            if self.causal and extra_pad_tokens is not None:
                keep = min(self.max_length, max(lengths) + extra_pad_tokens)
            parts = [self._run(enc, self._tokenize(tok, batch), keep) for tok, enc in self.encoders]
            embeddings = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
            for row, i in enumerate(idx):
                span = _token_span(first["offset_mapping"][row], phrase_spans[i], lengths[row])
                results[i] = EncodedPrompt(prompts[i], embeddings[row], span, int(lengths[row]))
        return results  # type: ignore[return-value]

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
