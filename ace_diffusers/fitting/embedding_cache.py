"""On-disk cache of the preset prompts' token embeddings, so a new process does not re-encode them.

Every closed-form fit also encodes prompts that do not depend on the concept: the neutral anchor in
the templates, the preservation set and the unrelated prompts of its kind, about 50 prompts for a
preset kind, a few of them full-length (for ``explicit`` also the prompts of the kind's own nudity
terms). On a CPU that costs more than the rest of a one-concept fit (``bench closed-form`` times it as
the preparation). Each is stored once per text encoder as a small safetensors file (no
pickle) with its prompt in the metadata, written atomically.

The key is a *fingerprint* of the text encoder(s) and tokenizer(s): class, config, vocabulary size,
special tokens, every parameter's shape and a strided sample of its values (about 4096 per tensor).
Fine-tuning, a fused LoRA and textual inversion all change sampled values or shapes; an edit that
touches only unsampled entries would not be noticed, so such edits should turn the cache off:
``ACE_DIFFUSERS_CACHE=off``. ``ACE_DIFFUSERS_CACHE=<dir>`` moves it (default
``$XDG_CACHE_HOME/ace_diffusers`` or ``~/.cache/ace_diffusers``).

The templates' shared prefixes (``"a painting in the style of"``) are kept the same way, as each
encoder layer's keys and values
(:func:`ace_diffusers.fitting.clip_packing.encode_with_shared_prefixes`), so a new process does not
re-run them for every concept prompt either (~75 KB per prefix token at CLIP-L size). So is the
second moment of all of a kind's other tokens (:func:`save_moment`, d x d float32: 2.4 MB at SD1.5's
768, 16 MB at SDXL's 2048), which the solve needs whole and a new process would otherwise recompute.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .._io import atomic_save_safetensors, tensors_checksum
from .clip_packing import PrefixStore
from .text import EncodedPrompt, TextEmbedder

SAMPLES_PER_TENSOR = 4096
FORMAT = 2  # 2: every file carries a checksum of its tensors
Job = tuple  # (prompt, phrase's character span or None, padding tokens kept after EOS or None for all)


def cache_root() -> Path | None:
    """Where embeddings are cached, or None when caching is turned off."""
    setting = os.environ.get("ACE_DIFFUSERS_CACHE", "").strip()
    if setting.lower() in {"0", "off", "false", "no", "none"}:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ace_diffusers"


@torch.no_grad()
def fingerprint(embedder: TextEmbedder) -> str:
    """A digest of everything that decides the embeddings: tokenizers, encoder configs and weights."""
    digest = hashlib.sha256(f"ace-embeddings-v{FORMAT} {embedder.layout}".encode())
    if embedder.context_map is not None:  # a transformer's caption projection: part of what is cached
        _digest_weights(digest, "context", embedder.context_map)
    for tokenizer, encoder in embedder.encoders:
        special = (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )  # padding decides far tokens
        digest.update(
            f"{type(tokenizer).__name__} {len(tokenizer)} {tokenizer.model_max_length} {special}".encode()
        )
        config = encoder.config.to_json_string(use_diff=False)
        _digest_weights(digest, f"{type(encoder).__name__} {config}", encoder)
    return digest.hexdigest()[:32]


def _digest_weights(digest: Any, header: str, module: torch.nn.Module) -> None:
    """Feed ``header`` and every tensor's name, shape, dtype and strided sample of values to ``digest``."""
    digest.update(header.encode())
    for name, param in module.state_dict().items():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        digest.update(f"{name} {tuple(param.shape)} {param.dtype}".encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())


def _digest(value: Any) -> str:
    """A file name for a JSON-able key (the key itself goes into the file's metadata, against collisions)."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:32]


def _warn_unreadable(bad: list[tuple[Path, Exception]]) -> None:
    """One warning for every file a load skipped (each is recomputed and rewritten by the fit)."""
    if bad:
        path, error = bad[0]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        warnings.warn(
            f"Ignoring an unreadable or altered embedding cache file {path} ({error}){more}; it is "
            "recomputed and rewritten. Set ACE_DIFFUSERS_CACHE=off to bypass the cache.",
            stacklevel=4,
        )


def read_verified(fh: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of an open cache file, checked against the checksum in its metadata."""
    tensors = {name: fh.get_tensor(name) for name in names}
    recorded = (fh.metadata() or {}).get("sha256")
    if recorded != tensors_checksum(tensors):
        raise ValueError("its contents do not match the checksum written with it")
    return tensors


def _with_checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {**meta, "sha256": tensors_checksum(tensors)}


def _warn_unwritable(root: Path, error: Exception) -> None:
    warnings.warn(
        f"Could not write the embedding cache under {root} ({error}); set ACE_DIFFUSERS_CACHE.", stacklevel=4
    )


def _file(root: Path, key: str, job: Job) -> Path:
    return root / "embeddings" / key / f"{_digest(list(job))}.safetensors"


def load(embedder_key: str, jobs: list[Job], device: torch.device | str = "cpu") -> dict[Job, EncodedPrompt]:
    """The cached embeddings of those ``jobs`` that are on disk (unreadable files are skipped, with a "
    "warning)."""
    root = cache_root()
    out: dict[Job, EncodedPrompt] = {}
    if root is None:
        return out
    bad: list[tuple[Path, Exception]] = []
    for job in jobs:
        path = _file(root, embedder_key, job)
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata()
                if json.loads(meta["job"]) != json.loads(json.dumps(list(job))):
                    continue  # a hash collision: never serve another prompt's embeddings
                span = json.loads(meta["span"])
                embeddings = read_verified(fh, ["embeddings"])["embeddings"]
                length = int(meta["length"])
                if embeddings.ndim != 2 or not 0 < length <= embeddings.shape[0]:
                    raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} for {length} tokens")
                out[job] = EncodedPrompt(
                    job[0], embeddings.to(device), tuple(span) if span is not None else None, length
                )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            bad.append((path, error))
    _warn_unreadable(bad)
    return out


def save(embedder_key: str, encoded: dict[Job, EncodedPrompt]) -> int:
    """Store each job's embeddings as its own file (atomic: a temporary file renamed into place); returns
    how many were written. A cache that cannot be written only warns: erasure never depends on it."""
    root = cache_root()
    if root is None or not encoded:
        return 0
    written = 0
    try:
        for job, enc in encoded.items():
            path = _file(root, embedder_key, job)
            meta = {
                "job": json.dumps(list(job)),
                "span": json.dumps(list(enc.span) if enc.span is not None else None),
                "length": str(enc.length),
                "format": str(FORMAT),
            }
            tensors = {"embeddings": enc.embeddings.detach().float().cpu().contiguous()}
            atomic_save_safetensors(path, tensors, _with_checksum(meta, tensors))
            written += 1
    except OSError as error:
        _warn_unwritable(root, error)
    return written


def _prefix_file(root: Path, key: str, encoder_index: int, prefix: tuple) -> Path:
    return root / "prefixes" / key / f"{encoder_index}-{_digest([encoder_index, *prefix])}.safetensors"


def load_prefixes(embedder_key: str, like: list[torch.Tensor]) -> list[PrefixStore]:
    """Every stored template prefix of this text encoder fingerprint, one store per encoder, each on the
    dtype and device of its encoder (``like``: one parameter of each)."""
    n_encoders = len(like)
    stores: list[PrefixStore] = [{} for _ in range(n_encoders)]
    root = cache_root()
    folder = None if root is None else root / "prefixes" / embedder_key
    if folder is None or not folder.is_dir():
        return stores
    bad: list[tuple[Path, Exception]] = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata()
                index, prefix = int(meta["encoder"]), tuple(json.loads(meta["prefix"]))
                if not 0 <= index < n_encoders or path != _prefix_file(root, embedder_key, index, prefix):
                    continue
                ref = like[index]
                t = read_verified(fh, ["keys", "values", "output"])
                if t["keys"].shape != t["values"].shape or t["keys"].ndim < 2:
                    raise ValueError(f"keys {tuple(t['keys'].shape)} and values {tuple(t['values'].shape)}")
                keys, values, output = (t[n].to(ref.device, ref.dtype) for n in ("keys", "values", "output"))
            stores[index][prefix] = (output, list(zip(keys.unbind(0), values.unbind(0), strict=True)))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
            bad.append((path, error))
    _warn_unreadable(bad)
    return stores


def save_prefixes(embedder_key: str, new: list[PrefixStore]) -> int:
    """Store each new prefix's per-layer keys/values and output (atomic, like :func:`save`)."""
    root = cache_root()
    if root is None or not any(new):
        return 0
    written = 0
    try:
        for index, store in enumerate(new):
            for prefix, (output, layer_kv) in store.items():
                path = _prefix_file(root, embedder_key, index, prefix)
                tensors = {
                    "output": output.detach().float().cpu().contiguous(),
                    "keys": torch.stack([k for k, _ in layer_kv]).detach().cpu().contiguous(),
                    "values": torch.stack([v for _, v in layer_kv]).detach().cpu().contiguous(),
                }
                meta = {"encoder": str(index), "prefix": json.dumps(list(prefix)), "format": str(FORMAT)}
                atomic_save_safetensors(path, tensors, _with_checksum(meta, tensors))
                written += 1
    except OSError as error:
        _warn_unwritable(root, error)
    return written


MOMENT_FORMAT = 2  # bump when the tokens that make up the moment change (2: with a checksum)


def _moment_file(root: Path, key: str, jobs: list) -> Path:
    return root / "moments" / key / f"{_digest([f'moment-v{MOMENT_FORMAT}', *jobs])}.safetensors"


def load_moment(embedder_key: str, jobs: list) -> torch.Tensor | None:
    """The stored second moment of the tokens of exactly these ``jobs`` (float32, CPU), or None."""
    root = cache_root()
    if root is None:
        return None
    path = _moment_file(root, embedder_key, jobs)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            if meta.get("format") != str(MOMENT_FORMAT) or json.loads(meta["jobs"]) != json.loads(
                json.dumps(jobs)
            ):
                return None  # another format, or a hash collision: never serve another job set's moment
            return read_verified(fh, ["moment"])["moment"]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        _warn_unreadable([(path, error)])
        return None


def save_moment(embedder_key: str, jobs: list, moment: torch.Tensor) -> bool:
    """Store the second moment of the tokens of ``jobs`` (atomic, like :func:`save`); whether it was "
    "written."""
    root = cache_root()
    if root is None:
        return False
    try:
        tensors = {"moment": moment.detach().float().cpu().contiguous()}
        meta = {"jobs": json.dumps(jobs), "format": str(MOMENT_FORMAT)}
        path = _moment_file(root, embedder_key, jobs)
        atomic_save_safetensors(path, tensors, _with_checksum(meta, tensors))
    except OSError as error:
        _warn_unwritable(root, error)
        return False
    return True


# ---------------------------------------------------------------------- in memory
MAX_KEPT_PROMPTS = 4096  # per text encoder
MAX_KEPT_MOMENTS = 4  # per text encoder; d x d float64 each (32 MB at SDXL's 2048)


@dataclass
class EncoderMemory:
    """What one text encoder's fits keep in memory, valid while its weights stay as they were."""

    signature: tuple  # weight versions, parameter count, dtype and device of every encoder
    prompts: dict[Job, EncodedPrompt] = field(default_factory=dict)
    fingerprint: str | None = None  # the disk key, computed once per weight version
    prefixes: list[PrefixStore] | None = None  # the templates' prefixes, per encoder
    moments: dict[tuple, torch.Tensor] = field(default_factory=dict)  # the other tokens' second moments
    vocabulary: Any = None  # the encoded vocabulary words (:mod:`.vocabulary`)


def _signature(embedder: TextEmbedder) -> tuple:
    """In-place edits bump parameter versions; ``.to(dtype/device)`` does not, so those are part of it."""
    modules = [(len(tok), enc) for tok, enc in embedder.encoders]
    if embedder.context_map is not None:
        modules.append((-1, embedder.context_map))
    return (embedder.max_length,) + tuple(
        (
            size,
            sum(p._version for p in module.parameters()),
            sum(1 for _ in module.parameters()),
            str(next(module.parameters()).dtype),
            str(next(module.parameters()).device),
        )
        for size, module in modules
    )


class EmbeddingCache:
    """Encoded prompts, template prefixes and token moments per text encoder, in memory and on disk.

    Every fit on a pipeline encodes the same concept-independent prompts (neutral anchor, preservation
    and unrelated prompts); this keeps them per text encoder (forgotten when any encoder weight changes
    in place) and, for the jobs marked *persistent*, on disk across processes (:func:`cache_root`).
    """

    def __init__(self) -> None:
        self._memory: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def clear(self) -> None:
        """Forget everything kept in memory (the disk cache stays)."""
        self._memory.clear()

    def memory(self, embedder: TextEmbedder) -> EncoderMemory:
        """The memory of ``embedder``'s first text encoder, new if its weights changed."""
        encoder = embedder.encoders[0][1]
        signature = _signature(embedder)
        entry = self._memory.get(encoder)
        if entry is None or entry.signature != signature:
            entry = EncoderMemory(signature)
            self._memory[encoder] = entry
        return entry

    def disk_key(self, embedder: TextEmbedder) -> str:
        entry = self.memory(embedder)
        if entry.fingerprint is None:
            entry.fingerprint = fingerprint(embedder)
        return entry.fingerprint

    def encode(
        self, embedder: TextEmbedder, jobs: Sequence[Job], persistent: Sequence[Job] = ()
    ) -> list[EncodedPrompt]:
        """Encode ``(prompt, phrase span, extra padding tokens or None for all)`` jobs in one call, each
        distinct job once; ``persistent`` jobs are also read from and written to the disk cache."""
        entry = self.memory(embedder)
        store = entry.prompts
        use_disk = cache_root() is not None
        on_disk = [job for job in dict.fromkeys(persistent) if job not in store]
        if on_disk and use_disk:
            store.update(load(self.disk_key(embedder), on_disk, embedder.device))
        missing = list(
            dict.fromkeys(job for job in jobs if job not in store)
        )  # many concepts share one anchor
        if missing:
            self._encode_missing(embedder, entry, missing, set(on_disk) if use_disk else set())
        result = [store[job] for job in jobs]
        if len(store) > MAX_KEPT_PROMPTS:
            for key in list(store)[: len(store) - MAX_KEPT_PROMPTS]:
                del store[key]
        return result

    def _encode_missing(
        self, embedder: TextEmbedder, entry: EncoderMemory, missing: list[Job], to_disk: set
    ) -> None:
        use_disk = cache_root() is not None
        if entry.prefixes is None:  # the templates' prefixes, kept for every later fit (and process)
            like = [next(enc.parameters()) for _, enc in embedder.encoders]
            entry.prefixes = load_prefixes(self.disk_key(embedder), like) if use_disk else [{} for _ in like]
        known = [set(p) for p in entry.prefixes]
        encoded = embedder.encode(
            [job[0] for job in missing],
            [job[1] for job in missing],
            extra_pad_tokens=[job[2] for job in missing],
            prefix_stores=entry.prefixes,
        )
        for job, enc in zip(missing, encoded, strict=True):
            entry.prompts[job] = enc
        if use_disk:
            key = self.disk_key(embedder)
            save(key, {job: entry.prompts[job] for job in missing if job in to_disk})
            save_prefixes(
                key,
                [
                    {k: v for k, v in p.items() if k not in old}
                    for p, old in zip(entry.prefixes, known, strict=True)
                ],
            )

    def moment(self, embedder: TextEmbedder, jobs: tuple[tuple, tuple], tokens: torch.Tensor) -> torch.Tensor:
        """``tokens.T @ tokens / N`` (float64) for the tokens of ``jobs``: the same for every fit of a kind,
        so kept in memory (at most :data:`MAX_KEPT_MOMENTS`) and on disk beside the embeddings (float32, as
        accumulated)."""
        entry = self.memory(embedder)
        if jobs not in entry.moments:
            disk_key = entry.fingerprint  # known once encode() used the disk cache
            flat = [list(job) for part in jobs for job in part]
            stored = load_moment(disk_key, flat) if disk_key else None
            if stored is None or stored.shape != (tokens.shape[1],) * 2:
                stored = tokens.T @ tokens / len(tokens)
                if disk_key:
                    save_moment(disk_key, flat, stored)
            entry.moments[jobs] = stored.double()
            while len(entry.moments) > MAX_KEPT_MOMENTS:
                del entry.moments[next(iter(entry.moments))]
        return entry.moments[jobs]


EMBEDDINGS = EmbeddingCache()  # the process-wide cache every fitter uses
