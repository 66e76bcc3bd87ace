"""``ACEAdapter``: an erasure as data — per-layer low-rank K/V factors and gates plus metadata.

On disk an adapter is a folder with two files (and a model card when pushed to the Hub)::

    ace_adapter.safetensors   tensors "<layer>.k_down" (r, d_text), "<layer>.k_up" (d_k, r),
                              "<layer>.v_down", "<layer>.v_up", "<layer>.gate_weight" (d_text,),
                              "<layer>.gate_bias" (1,)
    ace_config.json           format version, concepts, neutral anchors, kind, rank, fit settings,
                              base model, architecture fingerprint

safetensors and JSON only: loading an adapter from a stranger never executes code.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ACEAdapterFormatError, ACEArchitectureMismatchError

WEIGHTS_NAME = "ace_adapter.safetensors"
CONFIG_NAME = "ace_config.json"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 16 * 1024 * 1024
TENSOR_KEYS = ("k_down", "k_up", "v_down", "v_up", "gate_weight", "gate_bias")


@dataclass
class LayerFactors:
    """The delta for one cross-attention layer: ``ΔK(c) = g(c)·(c A_kᵀ) B_kᵀ``, same for V."""

    k_down: torch.Tensor
    k_up: torch.Tensor
    v_down: torch.Tensor
    v_up: torch.Tensor
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(d_text, d_k, d_v)``: what the layer must look like to carry this delta."""
        return (self.k_down.shape[1], self.k_up.shape[0], self.v_up.shape[0])

    @property
    def rank(self) -> int:
        return self.k_down.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in TENSOR_KEYS}

    def to(self, *args: Any, **kwargs: Any) -> LayerFactors:
        return LayerFactors(**{k: v.to(*args, **kwargs) for k, v in self.tensors().items()})


def fingerprint_of(shapes: Mapping[str, tuple[int, int, int]]) -> dict[str, Any]:
    """Architecture fingerprint: cross-attention layer names with ``(d_text, d_k, d_v)`` and a hash."""
    layers = {name: list(shape) for name, shape in sorted(shapes.items())}
    digest = hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]
    return {"layers": layers, "hash": digest}


class ACEAdapter:
    """A frozen concept-erasure edit for the cross-attention K/V projections of one UNet architecture.

    It stores *what is applied*; how it was found (closed form, trainer) is recorded in ``fit`` only.
    """

    def __init__(
        self,
        layers: Mapping[str, LayerFactors],
        *,
        concepts: list[str],
        neutral: list[str] | None = None,
        kind: str | None = None,
        method: str = "closed-form",
        fit: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if not layers:
            raise ACEAdapterFormatError("An ACEAdapter needs at least one layer; got none.")
        self.layers: dict[str, LayerFactors] = dict(layers)
        self.concepts = list(concepts)
        self.neutral = list(neutral or [])
        self.kind = kind
        self.method = method
        self.fit = dict(fit or {})
        self.base_model = base_model
        self.extra = dict(extra or {})
        _validate_layers(self.layers)

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        return max(f.rank for f in self.layers.values())

    @property
    def fingerprint(self) -> dict[str, Any]:
        return fingerprint_of({name: f.shape for name, f in self.layers.items()})

    @property
    def config(self) -> dict[str, Any]:
        """Everything but the tensors, as written to ``ace_config.json``."""
        from . import __version__

        return {
            "format_version": FORMAT_VERSION,
            "concepts": self.concepts,
            "neutral": self.neutral,
            "kind": self.kind,
            "rank": self.rank,
            "method": self.method,
            "fit": self.fit,
            "base_model": self.base_model,
            "fingerprint": self.fingerprint,
            "created_with": f"ace-diffusers {__version__}",
            **({"extra": self.extra} if self.extra else {}),
        }

    def num_parameters(self) -> int:
        return sum(t.numel() for f in self.layers.values() for t in f.tensors().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": t for name, f in self.layers.items() for key, t in f.tensors().items()}

    def to(self, *args: Any, **kwargs: Any) -> ACEAdapter:
        """A copy with every tensor converted, e.g. ``adapter.to(torch.float16)``."""
        layers = {name: f.to(*args, **kwargs) for name, f in self.layers.items()}
        return self._with_layers(layers)

    def _with_layers(self, layers: Mapping[str, LayerFactors]) -> ACEAdapter:
        return ACEAdapter(
            layers,
            concepts=self.concepts,
            neutral=self.neutral,
            kind=self.kind,
            method=self.method,
            fit=self.fit,
            base_model=self.base_model,
            extra=self.extra,
        )

    def __repr__(self) -> str:
        return (
            f"ACEAdapter(concepts={self.concepts!r}, kind={self.kind!r}, rank={self.rank}, "
            f"layers={len(self.layers)}, method={self.method!r})"
        )

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, layer_shapes: Mapping[str, tuple[int, int, int]]) -> None:
        """Raise :class:`ACEArchitectureMismatchError` naming the first layer that does not fit."""
        for name in sorted(set(self.layers) | set(layer_shapes)):
            if name not in layer_shapes:
                raise ACEArchitectureMismatchError(
                    f"Adapter layer '{name}' does not exist in this UNet: the adapter was fitted for a "
                    f"different architecture (adapter fingerprint {self.fingerprint['hash']}). Load an adapter "
                    "fitted for this base model, or fit a new one with erase_concept()."
                )
            if name not in self.layers:
                raise ACEArchitectureMismatchError(
                    f"UNet cross-attention layer '{name}' has no entry in the adapter: the adapter was fitted "
                    f"for a different architecture (adapter fingerprint {self.fingerprint['hash']}). Load an "
                    "adapter fitted for this base model, or fit a new one with erase_concept()."
                )
            want, have = tuple(self.layers[name].shape), tuple(layer_shapes[name])
            if want != have:
                raise ACEArchitectureMismatchError(
                    f"Layer '{name}': adapter expects (text dim, key dim, value dim) = {want} but the UNet has "
                    f"{have}. The adapter was fitted for a different base model; load a matching adapter or "
                    "fit a new one on this pipeline."
                )

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``ace_adapter.safetensors`` + ``ace_config.json`` atomically.

        Both files are written into a fresh sibling folder which then replaces ``save_directory`` by
        renames, so an interrupted save leaves the previous adapter (if any) intact and loadable.
        Other files already in ``save_directory`` (e.g. a model card) are kept.
        """
        target = Path(save_directory).absolute()
        if target.exists() and not target.is_dir():
            raise ACEAdapterFormatError(f"Cannot save an adapter to '{target}': it is a file, not a folder.")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        try:
            if target.is_dir():
                for item in target.iterdir():
                    if item.name not in (WEIGHTS_NAME, CONFIG_NAME) and item.is_file():
                        shutil.copy2(item, staging / item.name)
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "ace_format_version": "1"})
            (staging / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=False) + "\n")
            _fsync_dir_files(staging)
            _swap_in(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return target

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> ACEAdapter:
        """Load from a local folder or a Hub repo id (downloaded through ``huggingface_hub``)."""
        local = Path(pretrained) / (subfolder or "")
        if local.is_dir():
            return cls.from_folder(local)
        from .hub import resolve_adapter_dir

        folder = resolve_adapter_dir(
            pretrained,
            revision=revision,
            subfolder=subfolder,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
        return cls.from_folder(folder)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> ACEAdapter:
        folder = Path(folder)
        config = read_config(folder / CONFIG_NAME)
        weights_path = folder / WEIGHTS_NAME
        if not weights_path.is_file():
            raise ACEAdapterFormatError(
                f"'{folder}' has {CONFIG_NAME} but no {WEIGHTS_NAME}: the adapter is incomplete. "
                "Re-download or re-save it."
            )
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ACEAdapterFormatError(
                f"'{weights_path}' is not a readable safetensors file ({err}). It is truncated or corrupted: "
                "re-download or re-save the adapter."
            ) from err
        layers = _layers_from_tensors(tensors, weights_path)
        adapter = cls(
            layers,
            concepts=config["concepts"],
            neutral=config.get("neutral"),
            kind=config.get("kind"),
            method=config.get("method", "closed-form"),
            fit=config.get("fit"),
            base_model=config.get("base_model"),
            extra=config.get("extra"),
        )
        recorded = config.get("fingerprint", {}).get("layers")
        if recorded is not None and recorded != adapter.fingerprint["layers"]:
            raise ACEAdapterFormatError(
                f"'{folder}': the tensors do not match the architecture fingerprint recorded in {CONFIG_NAME}; "
                "the two files come from different adapters. Re-download or re-save the adapter."
            )
        return adapter

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        eval_markdown: str | None = None,
        image_path: str | os.PathLike | None = None,
    ) -> str:
        """Publish this adapter (weights, config and a model card) to ``repo_id`` on the Hub."""
        from .hub import build_model_card, push_adapter_folder

        with tempfile.TemporaryDirectory(prefix="ace-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "adapter")
            image_relpath = None
            if image_path is not None:
                image_relpath = Path(image_path).name
                shutil.copy2(image_path, folder / image_relpath)
            card = build_model_card(self.config, eval_markdown=eval_markdown, image_relpath=image_relpath)
            return push_adapter_folder(
                folder,
                repo_id,
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message or f"Upload ACE adapter erasing {', '.join(self.concepts[:5])}",
                create_pr=create_pr,
                model_card=card,
            )


# ---------------------------------------------------------------------- helpers
def read_config(path: Path) -> dict[str, Any]:
    """Read and validate ``ace_config.json`` (size, JSON, version, required keys)."""
    if not path.is_file():
        raise ACEAdapterFormatError(
            f"'{path.parent}' is not an ACE adapter: it has no {CONFIG_NAME}. ACE adapters are folders with "
            f"{WEIGHTS_NAME} and {CONFIG_NAME}, written by ACEAdapter.save_pretrained()."
        )
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ACEAdapterFormatError(
            f"'{path}' is {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit for an adapter config; "
            "it is not a genuine ACE config."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ACEAdapterFormatError(f"'{path}' is not valid JSON ({err}); re-download or re-save the adapter.") from err
    if not isinstance(config, dict):
        raise ACEAdapterFormatError(f"'{path}' must hold a JSON object, not {type(config).__name__}.")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise ACEAdapterFormatError(f"'{path}' has no integer 'format_version'; it is not an ACE adapter config.")
    if version > FORMAT_VERSION:
        raise ACEAdapterFormatError(
            f"'{path}' uses adapter format version {version}, newer than this ace-diffusers supports "
            f"({FORMAT_VERSION}). Upgrade ace-diffusers (pip install -U ace-diffusers)."
        )
    concepts = config.get("concepts")
    if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
        raise ACEAdapterFormatError(f"'{path}': 'concepts' must be a list of strings.")
    return config


def _layers_from_tensors(tensors: Mapping[str, torch.Tensor], source: Path) -> dict[str, LayerFactors]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, tensor in tensors.items():
        layer, _, key = full_key.rpartition(".")
        if not layer or key not in TENSOR_KEYS:
            raise ACEAdapterFormatError(
                f"'{source}' holds an unexpected tensor '{full_key}'; ACE adapters hold only "
                f"'<layer>.{{{','.join(TENSOR_KEYS)}}}'."
            )
        grouped.setdefault(layer, {})[key] = tensor
    layers = {}
    for layer, group in sorted(grouped.items()):
        missing = [k for k in TENSOR_KEYS if k not in group]
        if missing:
            raise ACEAdapterFormatError(f"'{source}': layer '{layer}' is missing tensors {missing}.")
        layers[layer] = LayerFactors(**group)
    return layers


def _all_finite(t: torch.Tensor) -> bool:
    """One float64 sum on the CPU (NaN/Inf reach it; a narrower float cannot overflow it), else elementwise."""
    if t.device.type == "cpu" and t.dtype != torch.float64:
        return bool(torch.isfinite(t.sum(dtype=torch.float64)))
    return bool(torch.isfinite(t).all())


def _validate_layers(layers: Mapping[str, LayerFactors]) -> None:
    for name, f in layers.items():
        for key, t in f.tensors().items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ACEAdapterFormatError(f"Layer '{name}': tensor '{key}' must be a floating-point tensor.")
            if not _all_finite(t):
                raise ACEAdapterFormatError(
                    f"Layer '{name}': tensor '{key}' contains NaN or Inf values; the adapter is corrupted."
                )
        r, d_text = f.k_down.shape if f.k_down.ndim == 2 else (None, None)
        ok = (
            f.k_down.ndim == 2
            and f.v_down.ndim == 2
            and f.k_up.ndim == 2
            and f.v_up.ndim == 2
            and f.v_down.shape == (r, d_text)
            and f.k_up.shape[1] == r
            and f.v_up.shape[1] == r
            and f.gate_weight.shape == (d_text,)
            and f.gate_bias.numel() == 1
            and r is not None
            and r > 0
        )
        if not ok:
            raise ACEAdapterFormatError(
                f"Layer '{name}': inconsistent factor shapes k_down {tuple(f.k_down.shape)}, "
                f"k_up {tuple(f.k_up.shape)}, v_down {tuple(f.v_down.shape)}, v_up {tuple(f.v_up.shape)}, "
                f"gate_weight {tuple(f.gate_weight.shape)}, gate_bias {tuple(f.gate_bias.shape)}; expected "
                "(r, d_text), (d_k, r), (r, d_text), (d_v, r), (d_text,), (1,)."
            )


def _fsync_dir_files(folder: Path) -> None:
    for item in folder.iterdir():
        with open(item, "rb") as fh:
            os.fsync(fh.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging``. With an atomic exchange there is no instant at which
    ``target`` is missing or half-written; elsewhere two renames leave a window of microseconds."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous adapter
        return
    backup = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
