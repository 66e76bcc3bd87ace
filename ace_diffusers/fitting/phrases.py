"""Phrases the model reads like the concept, found by coordinate search over vocabulary words.

The neighbour miner (:mod:`.mining`) proposes single vocabulary words. A synonym written in several
words or pieces ("five-pointed star", "rhombus"), or the few unrelated words an attacker's search turns
up that the UNet happens to read as the concept, is none of them. For a concept ``c`` in its first
template ``t``, starting from ``n`` random vocabulary words ``w`` at the concept's place, greedy
coordinate gradient (GCG) on the one-hot relaxation minimises, on the *original* model,

    L(w) = Σ_layers ||Attn(q, E(t(w))) − Attn(q, E(t(c)))||² / ||Attn(q, E(t(c)))||²

(``q`` the query bank, ``E`` the text encoder): each step ranks, per position, the ``top_k`` swaps by
the gradient of ``L`` through the one-hot rows, evaluates ``candidates`` random single swaps exactly in
one batch, and keeps the best if it lowers ``L``. A found phrase is kept only if it passes the miner's
in-context test (:func:`.mining.in_context`): it moves attention towards the concept and sits nearer to
it than to its neutral anchor or any preserved concept. The same search run against an erased model is
the discrete-token attack of :mod:`ace_diffusers.eval.discrete_tokens`; erasing what it finds on the
original model is the trainer's defence against it (``ACETrainer(search_phrases=...)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adversary import concept_tokens, run_encoder, token_embedding
from .attention import QueryLayer, attention_output, encode_full
from .mining import in_context
from .presets import ErasureSpec, filled
from .text import TextEmbedder
from .vocabulary import vocabulary_words

PLACEHOLDER = "x"  # stands in for a searched word while the template is tokenised


def search_phrases(
    embedder: TextEmbedder,
    layers: list[QueryLayer],
    spec: ErasureSpec,
    *,
    per_concept: int,
    steps: int = 30,
    top_k: int = 32,
    candidates: int = 32,
    seed: int = 0,
    known: list[str] | None = None,
) -> dict[str, str]:
    """Up to ``per_concept`` phrases of 2 or 3 vocabulary words per concept: ``{phrase: its concept}``;
    ``known``: words already erased (the mined ones), never part of a phrase."""
    if per_concept <= 0 or len(embedder.encoders) != 1:
        return {}
    words = vocabulary_words(embedder)
    banned = {w.lower() for phrase in spec.concepts + spec.preserve + spec.neutral for w in phrase.split()}
    banned |= {w for phrase in (known or ()) for w in phrase.lower().split()}
    spelling = {i: w for w, i in words.items()}
    generator = torch.Generator().manual_seed(seed)
    found: dict[str, str] = {}
    for concept_index, concept in enumerate(spec.concepts):
        template = spec.templates_for(concept)[0]
        wanted = [
            attention_output(layer, encode_full(embedder, [filled(template, concept)]), None)
            for layer in layers
        ]
        phrases: list[str] = []
        for attempt in range(2 * per_concept):  # twice as many searches as wanted: some fail the test
            # every search avoids the words earlier ones settled on: each finds another route
            used = banned | {w for p in phrases for w in p.split()}
            allowed = torch.tensor(sorted(i for w, i in words.items() if w not in used))
            length = 2 + attempt % 2
            search = PhraseSearch(embedder, layers, template, length, wanted, allowed, top_k, candidates)
            ids = allowed[torch.randint(len(allowed), (length,), generator=generator)]
            for _ in range(steps):
                ids = search.step(ids, generator)
            phrases.append(" ".join(spelling[int(i)] for i in ids))
        anchors = [concept, spec.neutral[concept_index]] + list(spec.preserve)
        kept = in_context(
            embedder, layers, spec.templates_for(concept)[:2], anchors, list(dict.fromkeys(phrases))
        )
        for phrase in kept[:per_concept]:
            found[phrase] = concept
    return found


class PhraseSearch:
    """GCG over the words at the concept's place in one template (module docstring)."""

    def __init__(
        self,
        embedder: TextEmbedder,
        layers: list[QueryLayer],
        template: str,
        length: int,
        wanted: list[torch.Tensor],
        allowed: torch.Tensor,
        top_k: int,
        candidates: int,
    ) -> None:
        self.embedder, self.layers, self.wanted = embedder, layers, wanted
        self.top_k, self.candidates = top_k, candidates
        placeholders = " ".join([PLACEHOLDER] * length)
        tokens, span = concept_tokens(
            embedder, filled(template, placeholders), template.index("{}"), placeholders
        )
        self.input_ids, self.span = tokens["input_ids"], span
        encoder = embedder.encoders[0][1]
        self.embedding = token_embedding(encoder)
        self.table = self.embedding.weight.detach()
        self.mask = torch.ones(self.table.shape[0], dtype=torch.bool)
        self.mask[allowed] = False  # True: never a candidate

    def _loss(self, context: torch.Tensor) -> torch.Tensor:
        """``(B,)``: the normalised attention-output gap of each row of ``context`` to the concept's."""
        total = context.new_zeros(len(context))
        for layer, want in zip(self.layers, self.wanted, strict=True):
            gap = (attention_output(layer, context, None) - want) ** 2
            total = total + gap.flatten(1).mean(1) / want.pow(2).mean()
        return total

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B,)``: :math:`L` of each row of word ids ``ids`` (B, length)."""
        with torch.no_grad():
            return self._loss(self._encode(ids))

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        batch = self.input_ids.repeat(len(ids), 1)
        batch[:, self.span] = ids
        return run_encoder(self.embedder, batch)

    def step(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One GCG step from word ids ``ids`` (length,): the best single swap if it lowers the loss."""
        one_hot = F.one_hot(ids, self.table.shape[0]).to(self.table.dtype).requires_grad_(True)
        soft = one_hot @ self.table

        def replace(module, args, output):
            output = output.clone()
            output[:, self.span] = soft.to(output.dtype)
            return output

        handle = self.embedding.register_forward_hook(replace)
        try:
            current = self._loss(run_encoder(self.embedder, self.input_ids))[0]
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(current, [one_hot])
        top = (-grad.float().masked_fill(self.mask, float("inf"))).topk(self.top_k, dim=1).indices
        position = torch.randint(len(ids), (self.candidates,), generator=generator)
        choice = top[position, torch.randint(self.top_k, (self.candidates,), generator=generator)]
        batch = ids.repeat(self.candidates, 1)
        batch[torch.arange(self.candidates), position] = choice
        losses = self.loss(batch)
        best = int(losses.argmin())
        return batch[best] if float(losses[best]) < float(current.detach()) else ids
