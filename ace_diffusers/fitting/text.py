"""Prompts -> the per-token text embeddings a pipeline's UNet cross-attends to.

Mirrors ``encode_prompt`` of the SD 1/2 pipelines (last hidden state of one encoder), of SDXL
(penultimate hidden states of both encoders, concatenated) and of PixArt-α/Σ (a T5 encoder with its
attention mask, ``max_sequence_length`` tokens), followed by whatever the denoiser runs on the encoder
output before its cross-attention reads it (PixArt's ``caption_projection``:
:func:`~ace_diffusers.integration.modules.context_projection`), and additionally reports which tokens
spell the concept (character offsets -> token span), which the fitter needs to align concept tokens
with neutral-anchor tokens.

Speed: CLIP text encoders are causal, so the embedding of position ``i`` depends on tokens ``<= i``
only. Two exact savings follow: we may stop encoding a few padding tokens after a prompt's EOS (the
result is the prefix of the full 77-token encoding), and prompts that share their tokens before the
marked phrase (one template filled with many concepts) encode that shared prefix once: its
per-layer keys/values are computed once and every prompt's remaining tokens attend to them
(:func:`.clip_packing.encode_with_shared_prefixes`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from ..errors import ACECompatibilityError
from ..integration.modules import context_projection, find_denoiser, reads_joint_text
from .clip_packing import PrefixStore, clip_text_model, encode_with_shared_prefixes
from .instructed import Instruction, instruction_of, run_behind_instruction


@dataclass
class EncodedPrompt:
    """One prompt's token embeddings ``(tokens, d_text)`` and the token span of its marked phrase."""

    prompt: str
    embeddings: torch.Tensor
    span: tuple[int, int] | None  # [start, end) token indices of the phrase, if one was marked
    length: int  # tokens up to and including EOS


class TextEmbedder:
    """Encodes prompts exactly as ``pipe.encode_prompt`` would (SD 1.x/2.x, SDXL, PixArt, Sana), as the
    rows the denoiser's cross-attention reads."""

    def __init__(self, pipe: object) -> None:
        encoders = []
        for tok_attr, enc_attr in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tokenizer, encoder = getattr(pipe, tok_attr, None), getattr(pipe, enc_attr, None)
            if tokenizer is not None and encoder is not None:
                encoders.append((tokenizer, encoder))
        if not encoders:
            raise ACECompatibilityError(
                f"{type(pipe).__name__} has no tokenizer/text_encoder pair; erase_concept needs the "
                f"pipeline's "
                "text encoder(s) to find the concept's embeddings."
            )
        self.encoders = encoders
        # SDXL-style pipelines (two encoders) cross-attend to the penultimate layer of each encoder.
        self.penultimate = getattr(pipe, "text_encoder_2", None) is not None
        self.causal = all(
            isinstance(enc, (CLIPTextModel, CLIPTextModelWithProjection)) for _, enc in encoders
        )
        self.max_length = sequence_length(pipe) or min(tok.model_max_length for tok, _ in encoders)
        # T5 pipelines (PixArt) pass the prompt's attention mask to the encoder and to the denoiser, whose
        # cross-attention then never reads a padding position: their rows are left out
        self.masked_context = all(isinstance(enc, T5EncoderModel) for _, enc in encoders)
        # pipelines with a clean_caption switch (PixArt, Sana) lowercase and strip every prompt before their
        # tokenizer sees it (clean_caption=True cleans further when bs4 and ftfy are installed)
        self.lowercase = "clean_caption" in inspect.signature(type(pipe).__call__).parameters
        # Sana: an instruction in front of every prompt, of whose rows only the last ones are kept
        text = instruction_of(pipe)
        self.instruction = Instruction.of(text, encoders[0][0], self.max_length) if text else None
        self.masked_context = self.masked_context or self.instruction is not None
        denoiser = find_denoiser(pipe)  # None: a text-only pipeline, the encoder output as it is
        if reads_joint_text(pipe):
            raise ACECompatibilityError(
                f"{type(pipe).__name__}'s transformer reads the text through joint attention (SD3, FLUX), "
                "whose per-block text streams this step does not model yet. The closed form "
                "(pipe.erase_concept), fusing, LoRA export and loading, scaling and unloading adapters have "
                "their own path."
            )
        self.context_map = context_projection(denoiser) if denoiser is not None else None

    @property
    def layout(self) -> str:
        """How prompts become rows (a cache key part): encoder layer, length, masking, casing, prefix."""
        parts = (self.penultimate, self.max_length, self.masked_context, self.lowercase, self.instruction)
        return " ".join(map(str, parts))

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0][1].parameters()).device

    def _tokenize(self, tokenizer, prompts: list[str], max_length: int | None = None) -> dict:
        """Ids and mask as tensors, character offsets as lists (turning the nested offset lists into a
        tensor cost more than the tokenizer itself); right-padded to ``max_length`` (default the
        embedder's), as the pipelines pad."""
        tokens = tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length or self.max_length,
            truncation=True,
            return_offsets_mapping=True,
            padding_side="right",
        )
        return {
            "input_ids": torch.tensor(tokens["input_ids"]),
            "attention_mask": torch.tensor(tokens["attention_mask"]),
            "offset_mapping": tokens["offset_mapping"],
        }

    @torch.no_grad()
    def encode(
        self,
        prompts: list[str],
        phrase_spans: list[tuple[int, int] | None] | None = None,
        *,
        extra_pad_tokens: int | None | list[int | None] = 4,
        batch_size: int = 64,
        approximate: bool = False,
        prefix_stores: list[PrefixStore] | None = None,
    ) -> list[EncodedPrompt]:
        """Encode ``prompts``; ``phrase_spans`` gives each phrase's character span (or None).

        ``extra_pad_tokens``: for causal encoders, keep only this many padding tokens after each
        prompt's EOS (``None`` = all, i.e. the full ``model_max_length`` sequence); one value for all
        prompts or one per prompt. What a prompt gets never depends on the other prompts of the call.
        ``approximate``: truncate the padding of bidirectional encoders too (their outputs then differ
        from the pipeline's, a cheap proxy for screening many short phrases).
        ``prefix_stores``: one dict per text encoder that keeps shared prefixes for later calls (see
        :func:`encode_with_shared_prefixes`); the caller drops them when the encoder's weights change.
        """
        phrase_spans = phrase_spans or [None] * len(prompts)
        extra = extra_pad_tokens if isinstance(extra_pad_tokens, list) else [extra_pad_tokens] * len(prompts)
        if len(extra) != len(prompts) or len(phrase_spans) != len(prompts):
            raise ValueError("phrase_spans and a list of extra_pad_tokens need one entry per prompt.")
        if not prompts:
            return []
        if self.instruction is not None and not approximate:  # screening (approximate) skips the prefix
            return self._encode_instructed(prompts, phrase_spans, batch_size)
        texts, phrase_spans = self.as_read(prompts, phrase_spans)
        first_tokenizer = self.encoders[0][0]
        tokens = self._tokenize(first_tokenizer, texts)
        lengths = tokens["attention_mask"].sum(dim=1).tolist()
        spans = [
            token_span(tokens["offset_mapping"][i], phrase_spans[i], lengths[i]) for i in range(len(prompts))
        ]
        all_ids = [tokens["input_ids"]] + [
            self._tokenize(tok, texts)["input_ids"] for tok, _ in self.encoders[1:]
        ]
        truncates = self.causal or approximate
        keep = [
            self.max_length if e is None or not truncates else min(self.max_length, lengths[i] + e)
            for i, e in enumerate(extra)
        ]
        if self.masked_context:  # the denoiser masks padding out: only the prompt's own tokens matter
            keep = [min(k, lengths[i]) for i, k in enumerate(keep)]
        if self._prefix_sharing:
            # split each row before its phrase; rows whose tokens before the split agree share that prefix
            # (any split point is exact: each encoder groups rows by its own tokens)
            shared = [spans[i][0] if spans[i] is not None else 0 for i in range(len(prompts))]
            stores = prefix_stores or [None] * len(self.encoders)
            parts = [
                encode_with_shared_prefixes(
                    encoder, ids, shared, keep, self.penultimate, batch_size=batch_size, prefix_store=store
                )
                for (_, encoder), ids, store in zip(self.encoders, all_ids, stores, strict=True)
            ]
            rows = [
                self.to_context(
                    torch.cat([part[i] for part in parts], dim=-1) if len(parts) > 1 else parts[0][i]
                )
                for i in range(len(prompts))
            ]
        else:
            rows = self._encode_batched(all_ids, tokens["attention_mask"], keep, batch_size)
        return [EncodedPrompt(prompts[i], rows[i], spans[i], int(lengths[i])) for i in range(len(prompts))]

    def _encode_instructed(
        self, prompts: list[str], phrase_spans: list[tuple[int, int] | None], batch_size: int
    ) -> list[EncodedPrompt]:
        """Sana's encoding (:mod:`.instructed`): ``instruction + prompt`` through the encoder with its
        attention mask, the kept rows, each prompt's valid ones (its padding is masked out downstream)."""
        texts, spans = self.as_read(prompts, phrase_spans)
        tokenizer, layout = self.encoders[0][0], self.instruction
        tokens = self._tokenize(tokenizer, layout.texts(texts), layout.total)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        kept = run_behind_instruction(self.encoders[0][1], layout, ids, mask, batch_size)
        if kept is None:
            parts = [
                self.run_instructed(ids[i : i + batch_size], mask[i : i + batch_size])
                for i in range(0, len(prompts), batch_size)
            ]
            kept = torch.cat(parts)
        valid = mask[:, layout.rows()].sum(1).tolist()
        out = []
        for i, prompt in enumerate(prompts):
            full = token_span(tokens["offset_mapping"][i], layout.chars(spans[i]), int(mask[i].sum()))
            rows_i = self.to_context(kept[i, : valid[i]])
            out.append(EncodedPrompt(prompt, rows_i, layout.span(full), int(valid[i])))
        return out

    def run_instructed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The kept rows (float32, before any context map) of ``instruction + prompt`` token ids
        (:mod:`.instructed`), differentiably: the encoder with the attention mask, as Sana runs it."""
        device = self.device
        out = self.encoders[0][1](input_ids.to(device), attention_mask=attention_mask.to(device))[0]
        return out.float()[:, self.instruction.rows().to(device)]

    def as_read(
        self, prompts: list[str], spans: list[tuple[int, int] | None]
    ) -> tuple[list[str], list[tuple[int, int] | None]]:
        """The prompts as the pipeline's tokenizer receives them (PixArt/Sana: lowercased, stripped), with
        the phrase spans moved to match."""
        if not self.lowercase:
            return prompts, spans
        texts, moved = [], []
        for prompt, span in zip(prompts, spans, strict=True):
            cut = len(prompt) - len(prompt.lstrip())
            texts.append(prompt.lower().strip())
            moved.append(None if span is None else (span[0] - cut, span[1] - cut))
        return texts, moved

    def _encode_batched(
        self, all_ids: list[torch.Tensor], mask: torch.Tensor, keep: list[int], batch_size: int
    ) -> list[torch.Tensor]:
        """Every row's first ``keep[i]`` positions, rows of similar length batched together."""
        rows: list[torch.Tensor | None] = [None] * len(keep)
        order = sorted(range(len(keep)), key=lambda i: keep[i])
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(keep[i] for i in idx)
            parts = [
                self.run_encoder(encoder, {"input_ids": ids[idx], "attention_mask": mask[idx]}, width)
                for (_, encoder), ids in zip(self.encoders, all_ids, strict=True)
            ]
            embeddings = self.to_context(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])
            for row, i in enumerate(idx):
                rows[i] = embeddings[row, : keep[i]]
        return rows  # type: ignore[return-value]

    @property
    def _prefix_sharing(self) -> bool:
        """Shared-prefix encoding needs causal CLIP encoders that ignore padding masks (as SD's do)."""
        return self.causal and all(
            not getattr(enc.config, "use_attention_mask", False) and clip_text_model(enc) is not None
            for _, enc in self.encoders
        )

    @torch.no_grad()
    def to_context(self, embeddings: torch.Tensor) -> torch.Tensor:
        """What the cross-attention reads of these encoder outputs (float32)."""
        if self.context_map is None:
            return embeddings
        weight = next(self.context_map.parameters())
        return self.context_map(embeddings.to(weight.device, weight.dtype)).float()

    def run_encoder(self, encoder: nn.Module, tokens: dict, keep: int) -> torch.Tensor:
        input_ids = tokens["input_ids"][:, :keep].to(self.device)
        mask = None
        if isinstance(encoder, T5EncoderModel) or getattr(encoder.config, "use_attention_mask", False):
            mask = tokens["attention_mask"][:, :keep].to(self.device)
        if self.penultimate:
            out = encoder(input_ids, attention_mask=mask, output_hidden_states=True)
            return out.hidden_states[-2].float()
        return encoder(input_ids, attention_mask=mask)[0].float()


def sequence_length(pipe: object) -> int | None:
    """The prompt length a pipeline encodes by default when it says (``max_sequence_length``: PixArt's
    120/300 T5 tokens), else None (the tokenizer's own limit: CLIP's 77)."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    default = getattr(parameter, "default", None)
    return default if isinstance(default, int) and not isinstance(default, bool) and default > 0 else None


def token_span(
    offsets: list[tuple[int, int]], chars: tuple[int, int] | None, length: int
) -> tuple[int, int] | None:
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
