"""What fine-tuning draws its batches from: encoded prompts with their unedited keys/values, and the
fixed targets they are aligned with (:mod:`.trainer`).

Everything here is independent of the adapter being trained, so it is computed once per prompt rather
than at every step: each anchor prompt's unedited attention output (:class:`TargetBank`; a concept's,
its mined words' and its adversaries' prompts share the same few anchors), and, while they fit in
:data:`KEPT_PROJECTIONS_BYTES`, every training prompt's unedited keys and values (:class:`PromptPool`),
the bulk of an attention pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integration.modules import kv_projections, projection_weight
from .attention import (
    KeysValues,
    QueryLayer,
    TrainableFactors,
    alignment_losses,
    encode_full,
    unedited_keys_values,
    unedited_outputs,
)
from .text import TextEmbedder

KEPT_PROJECTIONS_BYTES = 1 << 30  # the unedited keys/values of every training prompt are kept below this


def kept_projections(layers: list[QueryLayer], rows: int, tokens: int) -> bool:
    """Whether every training prompt's unedited keys/values fit in :data:`KEPT_PROJECTIONS_BYTES`
    (the miniature world: a few MB; many long prompts at SDXL size: recomputed at every step)."""
    width = sum(
        sum(projection_weight(p).shape[0] for p in kv_projections(layer.attn))
        for layer in layers
    )
    return rows * tokens * width * 4 <= KEPT_PROJECTIONS_BYTES


class PromptPool:
    """Encoded training prompts and, when kept, every layer's unedited keys/values of them (the bulk of
    an attention pass that does not depend on the adapter: computed once, not at every step)."""

    def __init__(self, layers: list[QueryLayer], context: torch.Tensor, keep_projections: bool) -> None:
        self.layers, self.context = layers, context
        self.unedited = unedited_keys_values(layers, context) if keep_projections else None

    def __len__(self) -> int:
        return len(self.context)

    def add(self, context: torch.Tensor) -> None:
        self.context = torch.cat([self.context, context])
        if self.unedited is not None:
            self.unedited = [
                (torch.cat([k, k_new]), torch.cat([v, v_new]))
                for (k, v), (k_new, v_new) in zip(
                    self.unedited, unedited_keys_values(self.layers, context), strict=True
                )
            ]

    @staticmethod
    def take(picks: list[tuple[PromptPool, torch.Tensor]]) -> tuple[torch.Tensor, list[KeysValues] | None]:
        """The rows ``index`` of each pool, in order: (context, per-layer unedited keys/values or None)."""
        context = torch.cat([pool.context[index] for pool, index in picks])
        if any(pool.unedited is None for pool, _ in picks):
            return context, None
        per_layer = zip(*[pool.unedited for pool, _ in picks], strict=True)
        unedited = [
            (
                torch.cat([k[index] for (k, _), (_, index) in zip(layer, picks, strict=True)]),
                torch.cat([v[index] for (_, v), (_, index) in zip(layer, picks, strict=True)]),
            )
            for layer in per_layer
        ]
        return context, unedited


class TargetBank:
    """The unedited attention outputs of the anchor prompts that erase prompts are aligned with, each
    prompt encoded and attended once (a concept's, its mined words' and its adversaries' prompts share
    the same few anchor prompts)."""

    def __init__(self, embedder: TextEmbedder, layers: list[QueryLayer]) -> None:
        self.embedder, self.layers = embedder, layers
        self.position: dict[str, int] = {}
        self.outputs: list[torch.Tensor] | None = None  # per layer: (prompts, n_queries, d_v)

    def index(self, prompts: list[str]) -> torch.Tensor:
        """The rows of ``prompts``, computing the outputs of those not seen before."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.position]
        if new:
            outputs = unedited_outputs(self.layers, encode_full(self.embedder, new))
            self.outputs = (
                outputs
                if self.outputs is None
                else [torch.cat([old, add]) for old, add in zip(self.outputs, outputs, strict=True)]
            )
            self.position.update({p: len(self.position) + i for i, p in enumerate(new)})
        return torch.tensor([self.position[p] for p in prompts], dtype=torch.long)

    def rows(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's outputs at ``index``."""
        assert self.outputs is not None, "index() adds prompts before rows() reads them"
        return [out[index] for out in self.outputs]


@dataclass
class TrainingSet:
    """One fit's prompts: erase pairs (the user's words, and the augmentations: mined words, synonyms,
    adversaries) as source pools with rows in ``targets``, and the keep prompts with their outputs."""

    targets: TargetBank
    given: PromptPool
    given_targets: torch.Tensor  # rows in ``targets``
    extra: PromptPool
    extra_targets: torch.Tensor
    keep: PromptPool
    keep_wanted: list[torch.Tensor]  # per layer: the keep prompts' unedited outputs

    def __post_init__(self) -> None:
        self.fixed = len(self.extra)  # the augmentations known before training (adversaries come later)

    def add(self, source: torch.Tensor, target_prompt: str) -> None:
        """One more pair to erase (an adversary): its encoded source and its anchor prompt."""
        self.extra.add(source)
        self.extra_targets = torch.cat([self.extra_targets, self.targets.index([target_prompt])])

    def losses(
        self,
        layers: list[QueryLayer],
        params: TrainableFactors,
        idx_given: torch.Tensor,
        idx_extra: torch.Tensor,
        idx_keep: torch.Tensor,
    ) -> torch.Tensor:
        """``(erase loss, keep loss)`` of the chosen rows, in one attention pass per layer."""
        erase_targets = torch.cat([self.given_targets[idx_given], self.extra_targets[idx_extra]])
        source, unedited = PromptPool.take(
            [(self.given, idx_given), (self.extra, idx_extra), (self.keep, idx_keep)]
        )
        wanted = [
            torch.cat([erase, kept[idx_keep]])
            for erase, kept in zip(self.targets.rows(erase_targets), self.keep_wanted, strict=True)
        ]
        return alignment_losses(layers, params, source, wanted, [len(erase_targets), len(idx_keep)], unedited)

    def fixed_loss(self, layers: list[QueryLayer], params: TrainableFactors) -> torch.Tensor:
        """The erase loss over every pair known before training (reported before and after)."""
        every_given = torch.arange(len(self.given))
        fixed_extra = torch.arange(self.fixed)
        rows = torch.cat([self.given_targets, self.extra_targets[: self.fixed]])
        source, unedited = PromptPool.take([(self.given, every_given), (self.extra, fixed_extra)])
        return alignment_losses(layers, params, source, self.targets.rows(rows), [len(rows)], unedited)[0]
