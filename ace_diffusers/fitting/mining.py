"""Near-synonyms mined from the model itself: vocabulary words the UNet's cross-attention reads like the
concept.

Never from a synonym list and never from a benchmark's vocabulary: the only inputs are the concept's own
words, the text encoder's vocabulary and the UNet's projections. Three stages, each cheaper per word than
the next:

1. the ``pool`` words whose input embedding is closest to the concept's (with ``dictionary``, every
   English word the tokenizer splits into pieces joins them: a split word has no one input embedding to
   compare; :func:`.vocabulary.dictionary_words`);
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

from ..integration.modules import kv_projections, projection_weight
from .attention import QueryLayer, attention_output
from .embedding_cache import EMBEDDINGS
from .presets import ErasureSpec, fill_phrase, filled, normalize_prompt
from .text import TextEmbedder
from .vocabulary import dictionary_words, encode_words, prepare_vocabulary, vocabulary_words

# With the dictionary's ~10⁵ more candidates, stage 2 (a proxy) ranks a word the UNet reads as the concept
# lower: on the miniature world "rhombus" (diamond) came 151st and "pentagram" (star) 165th of them.
DICTIONARY_SHORTLIST = 256
MINED_MIN_SHIFT = 0.4  # a mined word must move attention at least this far towards the concept
SIGNATURE_PAD_TOKENS = 6  # causal encoders: padding tokens kept after EOS in stage 3's prompts


@torch.no_grad()
def mine_synonyms(
    embedder: TextEmbedder,
    layers: list[QueryLayer],
    spec: ErasureSpec,
    *,
    per_concept: int,
    pool: int,
    shortlist: int | None = None,
    gram: torch.Tensor | None = None,
    dictionary: bool = False,
) -> dict[str, str]:
    """Up to ``per_concept`` mined words per concept of ``spec``: ``{word: the concept it stands in for}``;
    ``shortlist``: how many of the ``pool`` go on to stage 3 (default ``4 * per_concept``, with the
    dictionary :data:`DICTIONARY_SHORTLIST`); ``gram``:
    :func:`projection_gram` of ``layers``, if already known; ``dictionary``: split English words are
    candidates too (encoded once per text encoder and stored: :func:`.vocabulary.prepare_vocabulary`)."""
    tokenizer, encoder = embedder.encoders[0]
    table = encoder.get_input_embeddings().weight.detach().float()
    words = vocabulary_words(embedder)
    split = _split_words(embedder) if dictionary else []
    banned = {w.lower() for phrase in spec.concepts + spec.preserve + spec.neutral for w in phrase.split()}
    gram = projection_gram(layers) if gram is None else gram
    table_n = F.normalize(table, dim=-1)
    found: dict[str, str] = {}
    for concept_index, concept in enumerate(spec.concepts):
        ids = tokenizer(embedder.as_read([concept], [None])[0][0], add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        lowered = concept.lower()
        candidates = [w for w in words if w not in banned and w not in lowered and w not in found]
        if not candidates:
            continue
        index = torch.tensor([words[w] for w in candidates])
        sims = table_n[index] @ F.normalize(table[ids].mean(0), dim=-1)
        nearest = [candidates[i] for i in sims.topk(min(pool, len(candidates))).indices.tolist()]
        own = set(ids)  # a split word spelled with the concept's own pieces reads as it through them
        nearest += [w for w, pieces in split if not pieces & own and w not in banned and w not in found]
        size = shortlist or (DICTIONARY_SHORTLIST if dictionary else 4 * per_concept)
        short = _keyed_shortlist(embedder, concept, nearest, gram, size)
        if not short:
            continue
        anchors = [concept, spec.neutral[concept_index]] + list(spec.preserve)
        kept = in_context(embedder, layers, spec.templates_for(concept)[:2], anchors, short)
        for word in kept[:per_concept]:
            found[word] = concept
    return found


def _split_words(embedder: TextEmbedder) -> list[tuple[str, set[int]]]:
    """The dictionary's split words (encoded and stored once: :func:`.vocabulary.prepare_vocabulary`),
    each with its pieces. A word that shares a piece with the concept is left out: the erasure of the
    concept's own tokens covers what that piece carries, and shared sub-word pieces pull in unrelated
    words ("starbase" for *star*, "pendragon" for *hexagon* on the miniature world)."""
    prepare_vocabulary(embedder, dictionary=True)
    words = dictionary_words(embedder)
    pieces = embedder.encoders[0][0](words, add_special_tokens=False)["input_ids"]
    return [(word, set(ids)) for word, ids in zip(words, pieces, strict=True)]


def projection_gram(layers: list[QueryLayer]) -> torch.Tensor:
    """``PᵀP`` (d x d) of every layer's ``to_k`` and ``to_v`` stacked into ``P``: cosines of projected
    tokens, ``cos(Pt, Pc) = tᵀGc / sqrt(tᵀGt · cᵀGc)``, without projecting each word to every layer."""
    gram = None
    for layer in layers:
        for proj in kv_projections(layer.attn):
            weight = projection_weight(proj).detach().float().cpu()
            gram = weight.T @ weight if gram is None else gram.addmm_(weight.T, weight)
    return gram


def _keyed_shortlist(
    embedder: TextEmbedder, concept: str, pool: list[str], gram: torch.Tensor, size: int
) -> list[str]:
    """Stage 2: the ``size`` words whose projected token points most nearly where the concept's does."""
    (encoded,) = embedder.encode(
        [concept], [(0, len(concept))], extra_pad_tokens=0, batch_size=512, approximate=True
    )
    target = encoded.embeddings[encoded.span[0] : encoded.span[1]].mean(0).float().cpu()
    tokens = encode_words(embedder, pool)
    target_g, tokens_g = gram @ target, tokens @ gram
    scores = (tokens_g @ target) / ((tokens_g * tokens).sum(1) * target.dot(target_g)).clamp_min(1e-12).sqrt()
    return [pool[i] for i in scores.topk(min(size, len(pool))).indices.tolist()]


def in_context(
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
    signature = torch.cat(
        [
            _signatures(embedder, layers, prompts(anchors[:1])),
            _signatures(embedder, layers, prompts(anchors[1:]), persistent=True),
            _signatures(embedder, layers, *_marked(templates, shortlist)),
        ]
    )
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


def _marked(templates: list[str], words: list[str]) -> tuple[list[str], list[tuple[int, int] | None]]:
    """Each word in each template, with the word's character span (None where filling changed spacing)."""
    prompts, spans = [], []
    for word in words:
        for template in templates:
            prompt, span = fill_phrase(template, word)
            prompts.append(normalize_prompt(prompt))
            spans.append(span if prompts[-1] == prompt else None)
    return prompts, spans


def _signatures(
    embedder: TextEmbedder,
    layers: list[QueryLayer],
    prompts: list[str],
    spans: list[tuple[int, int] | None] | None = None,
    *,
    persistent: bool = False,
) -> torch.Tensor:
    """``(prompts, features)``: every layer's attention output of its query bank over each prompt.

    A causal encoder's prompts stop :data:`SIGNATURE_PAD_TOKENS` after their EOS (an exact prefix of the
    full encoding, at a fraction of its cost); a bidirectional encoder's keep every padding token. With
    ``spans`` (each word's place in its prompt), prompts of one template encode their shared beginning
    once (:func:`.clip_packing.encode_with_shared_prefixes`: exact for causal encoders, but for float
    rounding).
    """
    pad = SIGNATURE_PAD_TOKENS if embedder.causal else None
    jobs = [(p, None, pad) for p in prompts]
    encoded = (
        EMBEDDINGS.encode(embedder, jobs, persistent=jobs)
        if persistent
        else embedder.encode(prompts, spans, extra_pad_tokens=pad)
    )
    out = torch.empty(len(prompts), 0)
    by_length: dict[int, list[int]] = {}
    for i, enc in enumerate(encoded):
        by_length.setdefault(enc.embeddings.shape[0], []).append(i)
    for members in by_length.values():
        context = torch.stack([encoded[i].embeddings for i in members]).float()
        rows = torch.cat([attention_output(layer, context, None).flatten(1).cpu() for layer in layers], dim=1)
        if out.shape[1] == 0:
            out = torch.zeros(len(prompts), rows.shape[1])
        out[members] = rows
    return out
