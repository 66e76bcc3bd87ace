"""``ACEAdapter``: an erasure as data — per-layer low-rank K/V factors and gates plus metadata.

The on-disk layout (two files, safetensors + JSON) is :mod:`ace_diffusers.format`'s; the math of one
layer is :class:`~ace_diffusers.core.factors.LayerFactors`'. Loading an adapter from a stranger never
executes code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._io import atomic_save_safetensors, atomic_write_text, staged_directory, tensors_checksum
from ..errors import ACEAdapterFormatError, ACEArchitectureMismatchError
from ..format import (
    CONFIG_NAME,
    POOLED_NAME,
    TENSOR_KEYS,
    WEIGHTS_NAME,
    check_not_special,
    fingerprint_of,
    format_version_for,
    group_layer_tensors,
    read_config,
    split_pooled_tensors,
    weights_metadata,
)
from ..hub.card import base_model_license, build_model_card
from ..hub.download import clean_subfolder, resolve_adapter_dir
from ..hub.push import push_adapter_folder
from ..version import __version__
from .factors import LayerFactors, PooledFactors, all_finite


class ACEAdapter:
    """A frozen concept-erasure edit for the cross-attention K/V projections of one UNet architecture.

    It stores *what is applied*; how it was found (closed form, trainer) is recorded in ``fit`` only.
    ``pooled``: the edit of the pooled text embedding, for UNets that also read one (SDXL's
    ``text_embeds``); ``None`` for SD 1.x/2.x.
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
        pooled: PooledFactors | None = None,
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
        self.pooled = pooled
        _validate_layers(self.layers)
        _validate_pooled(pooled)

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        return max(f.rank for f in self.layers.values())

    @property
    def fingerprint(self) -> dict[str, Any]:
        pooled_dim = self.pooled.dim if self.pooled is not None else None
        return fingerprint_of({name: f.shape for name, f in self.layers.items()}, pooled_dim)

    @property
    def format_version(self) -> int:
        """The adapter-file format this adapter is written in (the oldest that holds it)."""
        return format_version_for(self.pooled is not None)

    @property
    def config(self) -> dict[str, Any]:
        """Everything but the tensors, as written to ``ace_config.json``."""
        return {
            "format_version": self.format_version,
            "concepts": self.concepts,
            "neutral": self.neutral,
            "kind": self.kind,
            "rank": self.rank,
            "method": self.method,
            "fit": self.fit,
            "base_model": self.base_model,
            "fingerprint": self.fingerprint,
            "weights_sha256": tensors_checksum(self.state_dict()),
            "created_with": f"ace-diffusers {__version__}",
            **({"extra": self.extra} if self.extra else {}),
        }

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_dict().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.{key}": t for name, f in self.layers.items() for key, t in f.tensors().items()}
        if self.pooled is not None:
            tensors.update({f"{POOLED_NAME}.{key}": t for key, t in self.pooled.tensors().items()})
        return tensors

    def to(self, *args: Any, **kwargs: Any) -> ACEAdapter:
        """A copy with every tensor converted, e.g. ``adapter.to(torch.float16)``."""
        layers = {name: f.to(*args, **kwargs) for name, f in self.layers.items()}
        pooled = self.pooled.to(*args, **kwargs) if self.pooled is not None else None
        return self._with_layers(layers, pooled=pooled)

    def restricted(self, layer_shapes: Mapping[str, tuple[int, int, int]]) -> ACEAdapter:
        """The same edit on a subset of the layers: those of a model that shares some of the UNet's
        layers (a ControlNet copies its down and mid blocks). Every requested layer must be in the
        adapter with the same shape."""
        missing = sorted(set(layer_shapes) - set(self.layers))
        if missing:
            raise ACEArchitectureMismatchError(
                f"Layer '{missing[0]}' (and {len(missing) - 1} more) has no entry in the adapter: this model "
                "does not share its cross-attention layers with the UNet the adapter was fitted for."
            )
        part = {name: self.layers[name] for name in sorted(layer_shapes)}
        adapter = self._with_layers(part)
        adapter.check_compatible(layer_shapes)
        return adapter

    def _with_layers(self, layers: Mapping[str, LayerFactors], **changes: Any) -> ACEAdapter:
        return ACEAdapter(
            layers,
            concepts=self.concepts,
            neutral=self.neutral,
            kind=self.kind,
            method=self.method,
            fit=self.fit,
            base_model=self.base_model,
            extra=self.extra,
            pooled=changes.get("pooled", self.pooled),
        )

    def __repr__(self) -> str:
        return (
            f"ACEAdapter(concepts={self.concepts!r}, kind={self.kind!r}, rank={self.rank}, "
            f"layers={len(self.layers)}, method={self.method!r}"
            f"{', pooled=True' if self.pooled is not None else ''})"
        )

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, layer_shapes: Mapping[str, tuple[int, int, int]]) -> None:
        """Raise :class:`ACEArchitectureMismatchError` naming the first layer that does not fit."""
        for name in sorted(set(self.layers) | set(layer_shapes)):
            if name not in layer_shapes:
                raise ACEArchitectureMismatchError(
                    f"Adapter layer '{name}' does not exist in this UNet: the adapter was fitted for a "
                    f"different architecture (adapter fingerprint {self.fingerprint['hash']}). Load an "
                    f"adapter "
                    "fitted for this base model, or fit a new one with erase_concept()."
                )
            if name not in self.layers:
                raise ACEArchitectureMismatchError(
                    f"UNet cross-attention layer '{name}' has no entry in the adapter: the adapter was "
                    "fitted "
                    f"for a different architecture (adapter fingerprint {self.fingerprint['hash']}). Load an "
                    "adapter fitted for this base model, or fit a new one with erase_concept()."
                )
            want, have = tuple(self.layers[name].shape), tuple(layer_shapes[name])
            if want != have:
                raise ACEArchitectureMismatchError(
                    f"Layer '{name}': adapter expects (text dim, key dim, value dim) = {want} but the UNet "
                    f"has "
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
        with staged_directory(
            target, carry_over=lambda item: item.name not in (WEIGHTS_NAME, CONFIG_NAME)
        ) as staging:
            atomic_save_safetensors(
                staging / WEIGHTS_NAME, self.state_dict(), weights_metadata(self.format_version)
            )
            atomic_write_text(
                staging / CONFIG_NAME, json.dumps(self.config, indent=2, sort_keys=False) + "\n"
            )
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
        local = Path(pretrained) / clean_subfolder(subfolder)
        if local.is_dir():
            return cls.from_folder(local)
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
        check_not_special(weights_path)
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
        layer_tensors, pooled = split_pooled_tensors(tensors, weights_path)
        layers = {
            name: LayerFactors(**group)
            for name, group in group_layer_tensors(layer_tensors, weights_path).items()
        }
        adapter = cls(
            layers,
            concepts=config["concepts"],
            neutral=config.get("neutral"),
            kind=config.get("kind"),
            method=config.get("method", "closed-form"),
            fit=config.get("fit"),
            base_model=config.get("base_model"),
            extra=config.get("extra"),
            pooled=PooledFactors(**pooled) if pooled is not None else None,
        )
        if pooled is not None and config["format_version"] < adapter.format_version:
            raise ACEAdapterFormatError(
                f"'{folder}': {CONFIG_NAME} says format version {config['format_version']} but the weights "
                "hold a pooled-embedding edit (format 2); the two files come from different adapters."
            )
        recorded_print = config.get("fingerprint") or {}
        recorded = recorded_print.get("layers")
        if recorded is not None and (
            recorded != adapter.fingerprint["layers"]
            or recorded_print.get(POOLED_NAME) != adapter.fingerprint.get(POOLED_NAME)
        ):
            raise ACEAdapterFormatError(
                f"'{folder}': the tensors do not match the architecture fingerprint recorded in "
                f"{CONFIG_NAME}; "
                "the two files come from different adapters. Re-download or re-save the adapter."
            )
        recorded_sum = config.get("weights_sha256")
        if recorded_sum is not None and recorded_sum != tensors_checksum(tensors):
            raise ACEAdapterFormatError(
                f"'{weights_path}' does not match the weights checksum recorded in {CONFIG_NAME}: its data "
                "was altered or corrupted after saving. Re-download or re-save the adapter."
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
        license: str | None = None,
        eval_results: Mapping[str, float] | None = None,
    ) -> str:
        """Publish this adapter (weights, config and a model card) to ``repo_id`` on the Hub.

        ``license``: the card's Hub license id; default the base model card's license when the base
        model is on the Hub and its card names one. ``eval_results``: ``{metric: value}`` for the card's
        ``model-index``; ``eval_markdown`` a Markdown report shown in the card.
        """
        if license is None:
            license = base_model_license(self.base_model, token=token)
        with tempfile.TemporaryDirectory(prefix="ace-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "adapter")
            image_relpath = None
            if image_path is not None:
                image_relpath = Path(image_path).name
                shutil.copy2(image_path, folder / image_relpath)
            card = build_model_card(
                self.config,
                eval_markdown=eval_markdown,
                image_relpath=image_relpath,
                license=license,
                eval_results=eval_results,
            )
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
def _validate_layers(layers: Mapping[str, LayerFactors]) -> None:
    for name, f in layers.items():
        if not isinstance(f, LayerFactors):
            raise ACEAdapterFormatError(
                f"Layer '{name}': expected a LayerFactors (six tensors: {', '.join(TENSOR_KEYS)}), got "
                f"{type(f).__name__}."
            )
        for key, t in f.tensors().items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ACEAdapterFormatError(
                    f"Layer '{name}': tensor '{key}' must be a floating-point tensor."
                )
            if not all_finite(t):
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


def _validate_pooled(pooled: PooledFactors | None) -> None:
    if pooled is None:
        return
    if not isinstance(pooled, PooledFactors):
        raise ACEAdapterFormatError(
            f"pooled: expected a PooledFactors (p_down, p_up, gate_weight, gate_bias) or None, got "
            f"{type(pooled).__name__}."
        )
    problem = pooled.problems()
    if problem is not None:
        raise ACEAdapterFormatError(f"The pooled-embedding edit is corrupted: {problem}.")
