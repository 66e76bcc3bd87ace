"""Prompts behind an instruction prefix (Sana): how the pipeline turns a prompt into the rows its
cross-attention reads, reproduced for the fit.

Sana's ``encode_prompt`` writes its ``complex_human_instruction`` lines (joined by newlines) in front of
every prompt, tokenises ``instruction + prompt`` right-padded to ``L = n_i + m − 2`` tokens (``n_i`` the
instruction's own token count, ``m`` = ``max_sequence_length``), runs Gemma with the attention mask, and
keeps row 0 (BOS) and the last ``m − 1`` rows: ``[BOS, the instruction's last token, the prompt's tokens,
padding]``, the padding masked out of the cross-attention. :class:`Instruction` holds that layout:
which rows are kept and where a phrase of the prompt lands among them.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch


def instruction_of(pipe: Any) -> str:
    """The instruction a pipeline puts in front of every prompt by default ("" for none)."""
    parameter = inspect.signature(type(pipe).__call__).parameters.get("complex_human_instruction")
    lines = getattr(parameter, "default", None)
    if isinstance(lines, str):
        return lines
    return "\n".join(lines) if isinstance(lines, (list, tuple)) and lines else ""


@dataclass(frozen=True)
class Instruction:
    """The instruction ``text``, the kept length ``m`` and the tokenised length ``L`` (module docstring)."""

    text: str
    kept: int  # m: rows the cross-attention reads
    total: int  # L: tokens the encoder runs on

    @classmethod
    def of(cls, text: str, tokenizer: Any, kept: int) -> Instruction:
        return cls(text, kept, len(tokenizer.encode(text)) + kept - 2)

    @property
    def first(self) -> int:
        """The full-sequence position of kept row 1 (row 0 is BOS)."""
        return self.total - self.kept + 1

    def rows(self) -> torch.Tensor:
        """The kept rows of the encoder output, as the pipeline's ``select_index``."""
        return torch.tensor([0, *range(self.first, self.total)])

    def texts(self, prompts: list[str]) -> list[str]:
        return [self.text + p for p in prompts]

    def span(self, full: tuple[int, int] | None) -> tuple[int, int] | None:
        """A token span of the full sequence as kept rows (None if any of it is not kept)."""
        if full is None or full[0] < self.first:
            return None
        return full[0] - self.first + 1, full[1] - self.first + 1

    def chars(self, span: tuple[int, int] | None) -> tuple[int, int] | None:
        """A character span of the prompt as a span of ``instruction + prompt``."""
        return None if span is None else (span[0] + len(self.text), span[1] + len(self.text))


@torch.no_grad()
def run_behind_instruction(
    encoder: Any, layout: Instruction, input_ids: torch.Tensor, mask: torch.Tensor, batch_size: int
) -> torch.Tensor | None:
    """The kept rows (float32) of ``instruction + prompt`` token ids, as the encoder gives them with the
    attention mask, with the instruction run once for all rows; None where that cannot be done (the
    rows do not share their beginning, or the encoder takes no key/value cache).

    The encoder is causal (Gemma): position ``j`` reads positions ``<= j`` only. So the tokens every row
    shares (the instruction's, ~800 of Sana's ~1,100) run once, and their per-layer keys and values serve
    each row's remaining tokens, which run only up to the last one any row attends to: the rows after
    it are padding, which Sana's cross-attention masks out; they are returned as zeros. Equal to the
    full run on every row that is read, up to float rounding.
    """
    parameters = inspect.signature(encoder.forward).parameters
    cache_arg = next((name for name in ("cache", "past_key_values") if name in parameters), None)
    differs = (input_ids != input_ids[:1]).any(dim=0).nonzero()
    shared = min(int(differs[0]) if len(differs) else input_ids.shape[1], layout.first)
    if cache_arg is None or shared < 2:
        return None
    device = next(encoder.parameters()).device
    ids, mask = input_ids.to(device), mask.to(device)
    end = int(mask.sum(dim=1).max())  # right padding: every row's tokens lie before this
    prefix = encoder(ids[:1, :shared], attention_mask=mask[:1, :shared], use_cache=True)
    cache = prefix["cache"] if "cache" in prefix else prefix["past_key_values"]  # newer / older names
    bos = prefix[0][0, 0].float()
    out = torch.zeros(len(ids), layout.total, bos.shape[-1], device=device)
    out[:, 0] = bos  # BOS reads itself only: the same row for every prompt
    for start in range(0, len(ids), batch_size):
        rows = slice(start, start + batch_size)
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(len(ids[rows]))
        tail = encoder(ids[rows, shared:end], attention_mask=mask[rows, :end], **{cache_arg: batch_cache})
        out[rows, shared:end] = tail[0].float()
    return out[:, layout.rows().to(device)]
