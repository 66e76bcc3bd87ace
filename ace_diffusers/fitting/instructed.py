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
