"""Near-synonyms mined from the model itself: vocabulary words the UNet's cross-attention reads like the
concept.

Never from a synonym list and never from a benchmark's vocabulary: the only inputs are the concept's own
words, the text encoder's vocabulary and the UNet's projections. Three stages, each cheaper per word than
the next:

1. the ``pool`` words whose input embedding is closest to the concept's;
2. of those, the ones whose encoded token, projected by every cross-attention layer's ``to_k``/``to_v``,
   points most nearly where the concept's does — what the UNet was trained to react to;
3. in the concept's own templates, the attention output of the query bank must move from the neutral
   prompt's towards the concept's by at least :data:`MINED_MIN_SHIFT` of the concept's own shift, and sit
   closer to the concept's than to any preserved concept's — so synonyms of what must be kept are never
   erased.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..integration.modules import projection_weight
from .attention import QueryLayer, attention_output, encode_full
from .presets import ErasureSpec, filled, normalize_prompt
from .text import TextEmbedder

MINED_MIN_SHIFT = 0.4  # a mined word must move attention at least this far towards the concept


def vocabulary_words(embedder: TextEmbedder) -> dict[str, int]:
    """Whole alphabetic words (> 2 letters) of the first tokenizer's vocabulary, with their token ids."""
    tokenizer, encoder = embedder.encoders[0]
    rows = encoder.get_input_embeddings().weight.shape[0]
    vocab = tokenizer.get_vocab()
    clip_style = any(token.endswith("</w>") for token in vocab)  # BPE marks word ends, WordPiece "##" pieces
    words = {}
    for token, index in vocab.items():
        if clip_style != token.endswith("</w>") or token.startswith("##") or index >= rows:
            continue
        word = token[:-4] if clip_style else token
        if word.isalpha() and len(word) > 2:
            words[word.lower()] = index
    return words


@torch.no_grad()
def mine_synonyms(
    embedder: TextEmbedder, layers: list[QueryLayer], spec: ErasureSpec, *, per_concept: int, pool: int
) -> dict[str, str]:
    """Up to ``per_concept`` mined words per concept of ``spec``: ``{word: the concept it stands in for}``."""
    tokenizer, encoder = embedder.encoders[0]
    table = encoder.get_input_embeddings().weight.detach().float()
    words = vocabulary_words(embedder)
    banned = {w.lower() for phrase in spec.concepts + spec.preserve + spec.neutral for w in phrase.split()}
    projection = torch.cat(
        [projection_weight(layer.attn.to_k).float() for layer in layers]
        + [projection_weight(layer.attn.to_v).float() for layer in layers]
    )
    table_n = F.normalize(table, dim=-1)
    found: dict[str, str] = {}
    for concept_index, concept in enumerate(spec.concepts):
        ids = tokenizer(concept, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        lowered = concept.lower()
        candidates = [w for w in words if w not in banned and w not in lowered and w not in found]
        index = torch.tensor([words[w] for w in candidates])
        sims = table_n[index] @ F.normalize(table[ids].mean(0), dim=-1)
        nearest = [candidates[i] for i in sims.topk(min(pool, len(candidates))).indices.tolist()]
        shortlist = _keyed_shortlist(embedder, concept, nearest, projection, 4 * per_concept)
        if not shortlist:
            continue
        anchors = [concept, spec.neutral[concept_index]] + list(spec.preserve)
        kept = _in_context(embedder, layers, spec.templates_for(concept)[:2], anchors, shortlist)
        for word in kept[:per_concept]:
            found[word] = concept
    return found


def _keyed_shortlist(
    embedder: TextEmbedder, concept: str, pool: list[str], projection: torch.Tensor, size: int
) -> list[str]:
    """Stage 2: the ``size`` words whose projected token points most nearly where the concept's does."""
    encoded = embedder.encode(
        [concept] + pool,
        [(0, len(concept))] + [(0, len(w)) for w in pool],
        extra_pad_tokens=0,
        batch_size=512,
        approximate=True,
    )
    tokens = torch.stack([e.embeddings[e.span[0] : e.span[1]].mean(0) for e in encoded])
    keyed = F.normalize(tokens @ projection.T, dim=-1)
    return [pool[i] for i in (keyed[1:] @ keyed[0]).topk(min(size, len(pool))).indices.tolist()]


def _in_context(
    embedder: TextEmbedder,
    layers: list[QueryLayer],
    templates: list[str],
    anchors: list[str],
    shortlist: list[str],
) -> list[str]:
    """Stage 3: shortlisted words that move attention towards ``anchors[0]`` (the concept) from
    ``anchors[1]`` (its neutral) and sit nearest the concept among all anchors, best first."""
    phrases = anchors + shortlist

    def prompts(group: list[str]) -> list[str]:
        return [normalize_prompt(filled(t, p)) for p in group for t in templates]

    # the anchors but the concept (its neutral, what is kept) are the same for every concept: cached
    context = torch.cat(
        [
            encode_full(embedder, prompts(anchors[:1])),
            encode_full(embedder, prompts(anchors[1:]), persistent=True),
            encode_full(embedder, prompts(shortlist)),
        ]
    )
    signature = torch.cat([attention_output(layer, context, None).flatten(1) for layer in layers], dim=1)
    signature = signature.view(len(phrases), len(templates), -1).flatten(1)
    target, neutral = signature[0], signature[1]
    shift = target - neutral
    alpha = ((signature[len(anchors) :] - neutral) @ shift) / shift.dot(shift).clamp_min(1e-12)
    distance = torch.cdist(signature[len(anchors) :], signature[: len(anchors)])  # (words, anchors)
    nearest_is_concept = distance.argmin(dim=1) == 0
    ranked = sorted(range(len(shortlist)), key=lambda i: -float(alpha[i]))
    return [
        shortlist[i] for i in ranked if bool(nearest_is_concept[i]) and float(alpha[i]) >= MINED_MIN_SHIFT
    ]
