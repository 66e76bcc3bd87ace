"""A causal CLIP text encoder run over many prompts at once: shared prefixes computed once, tails packed.

The exact savings :class:`~ace_diffusers.fitting.text.TextEmbedder` relies on (see its module): a causal
encoder's position ``i`` reads positions ``<= i`` only, so a prefix shared by many prompts (one template,
many concepts) can run once and its per-layer keys/values serve every prompt's remaining tokens, and
several short tails can share one sequence behind a block-diagonal causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# On a CPU an encoder pass costs about what 40 more tokens do (it streams all the weights; CLIP-L on
# 2 cores: ~55 ms per pass, ~1.45 ms per token), so batching and prefix sharing trade against it.
PASS_COST_TOKENS = 40
PACK_TOKENS = 128  # positions per packed sequence: attention over it stays a few % of a pass's work
PASS_TOKENS = 512  # positions per pass: larger activations spill the CPU caches and run slower
MAX_STORED_PREFIXES = 512  # per encoder; ~75 KB per CLIP-L prefix token

# (penultimate, *prefix token ids) -> (output (len, d), [(keys, values) (heads, len, head_dim) per layer])
PrefixStore = dict


@torch.no_grad()
def encode_with_shared_prefixes(
    encoder: nn.Module,
    input_ids: torch.Tensor,
    shared: list[int],
    keep: list[int],
    penultimate: bool,
    *,
    batch_size: int = 64,
    prefix_store: PrefixStore | None = None,
) -> list[torch.Tensor]:
    """A causal CLIP text encoder's output for each row of ``input_ids``, first ``keep[i]`` positions.

    Row ``i``'s first ``shared[i]`` tokens are its *prefix*; rows with the same prefix (one template
    filled with many phrases) share it. Every distinct prefix runs once; then every row's remaining
    tokens (its *tail*) run, attending causally to their own prefix's cached per-layer keys/values.
    Equal to ``encoder(input_ids)[i, :keep[i]]`` (last hidden state, or the penultimate layer's output
    for SDXL) up to float rounding, because position ``j`` of a causal encoder reads positions ``<= j``
    only.

    On CPUs each pass streams all the encoder's weights and a padded position costs as much as a real
    one, so tails are *packed*: several rows share one sequence of about ``PACK_TOKENS`` positions,
    each row with its own position ids, kept apart by a block-diagonal causal mask (first-fit
    decreasing bin packing leaves almost no filler). A pass runs up to ``PASS_TOKENS`` positions (more
    would spill the CPU caches), fullest sequences first; a sequence whose filler would cost more than
    a pass (``PASS_COST_TOKENS``) starts a new one. The prefixes are packed into one more sequence.

    ``prefix_store`` keeps computed prefixes across calls (the same templates come back in every
    fit): prefixes found there cost nothing, and with a store every prefix (of two or more tokens) is
    computed once and added, even one used by a single row, since later calls will reuse it.
    """
    model = clip_text_model(encoder)
    device = next(encoder.parameters()).device
    input_ids = input_ids.to(device)
    n_rows = input_ids.shape[0]
    layers = model.encoder.layers[: len(model.encoder.layers) - 1 if penultimate else None]
    finish = (lambda x: x) if penultimate else model.final_layer_norm
    store = prefix_store if prefix_store is not None else {}
    keys = [
        (penultimate, *input_ids[i, : shared[i]].tolist()) if shared[i] >= 2 else () for i in range(n_rows)
    ]
    counts: dict[tuple[int, ...], int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    if prefix_store is None:  # share where it saves more than the extra pass costs
        new = {key for key, c in counts.items() if key and c > 1}
        if sum((counts[key] - 1) * (len(key) - 1) for key in new) <= PASS_COST_TOKENS:
            new = set()
    else:  # stored prefixes pay off in later calls: every prefix is worth computing once
        new = {key for key in counts if key and key not in store}
    keys = [key if key in store or key in new else () for key in keys]

    # 1. prefixes not stored yet: once each, packed into one sequence
    if new:
        pieces = sorted(new)
        ids, positions, segment = _packed([[(list(key[1:]), 0, j) for j, key in enumerate(pieces)]], device)
        out, kv = run_clip_layers(
            model, layers, finish, ids, positions, _block_causal(segment), None, keep_kv=True
        )
        at = 0
        for key in pieces:
            n = len(key) - 1
            store[key] = (out[0, at : at + n], [(k[0, :, at : at + n], v[0, :, at : at + n]) for k, v in kv])
            at += n
    # every prefix this call uses, as one packed sequence that all tails see through the mask
    used = list(dict.fromkeys(key for key in keys if key))
    offset, prefix_kv = {}, None
    for key in used:
        offset[key] = sum(len(k) - 1 for k in offset)
    if used:
        prefix_kv = [
            (
                torch.cat([store[key][1][layer][0] for key in used], dim=1)[None],
                torch.cat([store[key][1][layer][1] for key in used], dim=1)[None],
            )
            for layer in range(len(layers))
        ]
    starts = [max(len(key) - 1, 0) for key in keys]  # keys start with the penultimate flag

    # 2. every row's tail, packed
    tail_len = [keep[i] - starts[i] for i in range(n_rows)]
    # about PACK_TOKENS per sequence, evened out so that no sequence is left mostly filler
    wanted_bins = -(-sum(tail_len) // PACK_TOKENS)
    capacity = max(max(tail_len), -(-sum(tail_len) * 11 // (10 * wanted_bins)))
    bins = _first_fit_decreasing(tail_len, capacity)
    fill = [sum(tail_len[i] for i in b) for b in bins]
    passes: list[list[list[int]]] = []
    for b in sorted(range(len(bins)), key=lambda b: -fill[b]):  # fullest first; a short remainder runs alone
        current = passes[-1] if passes else None
        if (
            current is None
            or len(current) * capacity >= PASS_TOKENS
            or len(current) == batch_size
            or (
                sum(tail_len[i] for i in current[0]) - fill[b]
                > PASS_COST_TOKENS  # its filler would cost more than a pass
            )
        ):
            passes.append([])
        passes[-1].append(bins[b])
    results: list[torch.Tensor | None] = [None] * n_rows
    for group in passes:
        ids, positions, segment = _packed(
            [[(input_ids[i, starts[i] : keep[i]].tolist(), starts[i], i) for i in b] for b in group], device
        )
        allowed = _block_causal(segment)
        if prefix_kv is not None:
            seen_from = torch.tensor([offset.get(key, 0) for key in keys] + [0], device=device)[segment]
            seen_to = seen_from + torch.tensor(starts + [0], device=device)[segment]
            key_index = torch.arange(prefix_kv[0][0].shape[2], device=device)
            sees_prefix = (key_index >= seen_from[..., None]) & (key_index < seen_to[..., None])  # (B, T, P)
            allowed = torch.cat([sees_prefix.unsqueeze(1), allowed], dim=3)
        out, _ = run_clip_layers(model, layers, finish, ids, positions, allowed, prefix_kv)
        for seq, b in enumerate(group):
            at = 0
            for i in b:
                tail = out[seq, at : at + tail_len[i]]
                results[i] = (torch.cat([store[keys[i]][0], tail]) if starts[i] else tail).float()
                at += tail_len[i]
    if prefix_store is not None and len(prefix_store) > MAX_STORED_PREFIXES:
        for key in list(prefix_store)[: len(prefix_store) - MAX_STORED_PREFIXES]:
            del prefix_store[key]
    return results  # type: ignore[return-value]


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped so that each group's lengths sum to at most ``capacity`` (few, nearly full groups)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _packed(
    sequences: list[list[tuple[list[int], int, int]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, position ids and segment ids ``(B, T)`` for sequences made of ``(tokens, first
    position, segment id)`` pieces; the end of a shorter sequence is filler of segment ``-1``."""
    width = max(sum(len(tokens) for tokens, _, _ in seq) for seq in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    positions = torch.zeros(len(sequences), width, dtype=torch.long)
    segment = torch.full((len(sequences), width), -1, dtype=torch.long)
    for row, seq in enumerate(sequences):
        at = 0
        for tokens, first, seg in seq:
            n = len(tokens)
            ids[row, at : at + n] = torch.tensor(tokens)
            positions[row, at : at + n] = torch.arange(first, first + n)
            segment[row, at : at + n] = seg
            at += n
    return ids.to(device), positions.to(device), segment.to(device)


def _block_causal(segment: torch.Tensor) -> torch.Tensor:
    """``(B, 1, T, T)`` mask: a position sees the earlier positions of its own segment and itself."""
    causal = torch.ones(segment.shape[1], segment.shape[1], dtype=torch.bool, device=segment.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal).unsqueeze(1)


def run_clip_layers(
    model: nn.Module,
    layers: nn.ModuleList,
    finish,
    ids: torch.Tensor,
    positions: torch.Tensor,
    allowed: torch.Tensor,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    *,
    keep_kv: bool = False,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The CLIP text transformer on packed ``ids``: its output and each layer's keys/values. Each
    layer's ``prefix_kv`` (one packed sequence, seen by every row through ``allowed``) comes first."""
    embeddings = model.embeddings  # its forward refuses sequences longer than the position table
    hidden = embeddings.token_embedding(ids) + embeddings.position_embedding(positions)
    kv = []
    for layer_index, layer in enumerate(layers):
        normed = layer.layer_norm1(hidden)
        q, k, v = (_heads(proj(normed), layer.self_attn.head_dim) for proj in _qkv(layer))
        if keep_kv:  # only the prefix pass needs them afterwards
            kv.append((k, v))
        if prefix_kv is not None:
            k_prefix, v_prefix = prefix_kv[layer_index]
            k = torch.cat([k_prefix.expand(k.shape[0], -1, -1, -1), k], dim=2)
            v = torch.cat([v_prefix.expand(v.shape[0], -1, -1, -1), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=layer.self_attn.scale)
        hidden = hidden + layer.self_attn.out_proj(_merge(out))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return finish(hidden), kv


def _qkv(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    attn = layer.self_attn
    return attn.q_proj, attn.k_proj, attn.v_proj


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def clip_text_model(encoder: nn.Module) -> nn.Module | None:
    """The module holding ``embeddings``, ``encoder.layers`` and ``final_layer_norm`` (CLIPTextModel itself
    in transformers 5, its ``text_model`` in 4.x and in ``CLIPTextModelWithProjection``), or None."""
    for model in (encoder, getattr(encoder, "text_model", None)):
        if model is not None and all(
            hasattr(model, a) for a in ("embeddings", "encoder", "final_layer_norm")
        ):
            embeddings = model.embeddings
            if hasattr(model.encoder, "layers") and all(
                hasattr(embeddings, a) for a in ("token_embedding", "position_embedding")
            ):
                return model
    return None
