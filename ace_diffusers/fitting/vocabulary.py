"""The text encoder's vocabulary words, each encoded alone: the table the neighbour miner reads.

The miner compares the concept with every candidate word *as the UNet reads it* — the encoder's output
token(s) of the word, projected by the cross-attention ``to_k``/``to_v`` (:mod:`.mining`). Encoding a
thousand candidates costs a CPU seconds at SD1.5 size, and they are the same words for every concept,
so each word's encoded token (mean over its pieces, the word encoded alone with no padding) is kept per
text encoder: rows encoded on demand are kept in memory; :func:`prepare_vocabulary` encodes all of them
once and stores the table on disk with the embedding cache (one safetensors file, float16, a checksum in
its metadata), so a new process reads it instead.

A tokenizer holds whole words only where they are one token. WordPiece (BERT) and sentencepiece (T5) spell
many words with several pieces — "rhombus" is ``r ##hom ##bus`` — so :func:`dictionary_words` adds the
most frequent English words (wordfreq's list, a general dictionary, the same for every model) that the
tokenizer splits; ``prepare_vocabulary(embedder, dictionary=True)`` encodes and stores them with the rest.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm
from wordfreq import top_n_list

from .._io import atomic_save_safetensors, tensors_checksum
from .embedding_cache import EMBEDDINGS, cache_root, read_verified
from .text import TextEmbedder

BATCH = 512
DICTIONARY_SIZE = 100_000  # the most frequent English words: about every word used once per 10⁸ words


SENTENCEPIECE_SPACE = "\u2581"  # "▁": a sentencepiece piece that starts a word


def vocabulary_words(embedder: TextEmbedder) -> dict[str, int]:
    """Whole alphabetic words (> 2 letters) of the first tokenizer's vocabulary, with their token ids.

    Word pieces are told apart by each family's mark: CLIP's BPE ends words with ``</w>``, WordPiece
    (BERT) starts continuations with ``##``, sentencepiece (T5) starts words with ``▁``."""
    tokenizer, encoder = embedder.encoders[0]
    rows = encoder.get_input_embeddings().weight.shape[0]
    vocab = tokenizer.get_vocab()
    clip_style = any(token.endswith("</w>") for token in vocab)
    piece_style = not clip_style and any(token.startswith(SENTENCEPIECE_SPACE) for token in vocab)
    words = {}
    for token, index in vocab.items():
        if clip_style != token.endswith("</w>") or token.startswith("##") or index >= rows:
            continue
        if piece_style and not token.startswith(SENTENCEPIECE_SPACE):
            continue
        word = token[:-4] if clip_style else token.removeprefix(SENTENCEPIECE_SPACE)
        if word.isalpha() and len(word) > 2:
            words[word.lower()] = index
    return words


@functools.lru_cache(maxsize=1)
def english_words(count: int = DICTIONARY_SIZE) -> tuple[str, ...]:
    """The ``count`` most frequent English words (wordfreq), alphabetic and longer than two letters."""
    return tuple(w for w in top_n_list("en", count, wordlist="large") if w.isalpha() and len(w) > 2)


def dictionary_words(embedder: TextEmbedder) -> list[str]:
    """The English words of :func:`english_words` that the first tokenizer spells with several pieces
    (those it holds as one token are :func:`vocabulary_words` already)."""
    single = vocabulary_words(embedder)
    return [w for w in english_words() if w not in single]


@dataclass
class VocabularyTable:
    """Encoded tokens of vocabulary words, filled on demand (``complete`` once every word is in;
    ``dictionary`` once :func:`dictionary_words` are in too)."""

    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    complete: bool = False
    dictionary: bool = False


def encode_words(embedder: TextEmbedder, words: list[str], *, desc: str | None = None) -> torch.Tensor:
    """``(len(words), d)``: each word encoded alone, the mean of its output tokens (float32); ``desc``: a
    progress bar's label (shown on a terminal only)."""
    table = _table(embedder)
    missing = [w for w in dict.fromkeys(words) if w not in table.rows]
    starts = range(0, len(missing), BATCH)
    for start in tqdm(starts, desc=desc, disable=None if desc else True, leave=False):
        chunk = missing[start : start + BATCH]
        encoded = embedder.encode(
            chunk, [(0, len(w)) for w in chunk], extra_pad_tokens=0, batch_size=BATCH, approximate=True
        )
        for word, enc in zip(chunk, encoded, strict=True):
            # rounded as the stored table is, so a new process mines exactly what this one does
            table.rows[word] = enc.embeddings[enc.span[0] : enc.span[1]].mean(0).half().float().cpu()
    return torch.stack([table.rows[w] for w in words]) if words else torch.zeros(0)


def prepare_vocabulary(embedder: TextEmbedder, *, dictionary: bool = False) -> int:
    """Encode every vocabulary word once (read from disk if stored there) and, with ``dictionary``, the
    :func:`dictionary_words` too; returns the number of words in the table."""
    table = _table(embedder)
    if table.complete and (table.dictionary or not dictionary):
        return len(table.rows)
    words = list(vocabulary_words(embedder)) + (dictionary_words(embedder) if dictionary else [])
    encode_words(embedder, words, desc="ACE: encoding the vocabulary once (stored for later fits)")
    table.complete, table.dictionary = True, table.dictionary or dictionary
    _save(embedder, table)
    return len(table.rows)


def _table(embedder: TextEmbedder) -> VocabularyTable:
    memory = EMBEDDINGS.memory(embedder)
    if memory.vocabulary is None:
        memory.vocabulary = _load(embedder) or VocabularyTable()
    return memory.vocabulary


def _path(embedder: TextEmbedder) -> Path | None:
    root = cache_root()
    return None if root is None else root / "vocabulary" / f"{EMBEDDINGS.disk_key(embedder)}.safetensors"


def _load(embedder: TextEmbedder) -> VocabularyTable | None:
    path = _path(embedder)
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            words = json.loads(meta["words"])
            tokens = read_verified(fh, ["tokens"])["tokens"].float()
        if tokens.ndim != 2 or len(words) != tokens.shape[0]:
            raise ValueError(f"{len(words)} words for a table of shape {tuple(tokens.shape)}")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        warnings.warn(f"Ignoring an unreadable or altered vocabulary table {path} ({error}).", stacklevel=4)
        return None
    rows = dict(zip(words, tokens, strict=True))
    return VocabularyTable(rows, complete=True, dictionary=meta.get("dictionary") == str(DICTIONARY_SIZE))


def _save(embedder: TextEmbedder, table: VocabularyTable) -> None:
    path = _path(embedder)
    if path is None:
        return
    words = list(table.rows)
    tensors = {"tokens": torch.stack([table.rows[w] for w in words]).half().contiguous()}
    meta = {"words": json.dumps(words), "sha256": tensors_checksum(tensors)}
    if table.dictionary:
        meta["dictionary"] = str(DICTIONARY_SIZE)
    try:
        atomic_save_safetensors(path, tensors, meta)
    except OSError as error:
        warnings.warn(f"Could not write the vocabulary table {path} ({error}).", stacklevel=3)
