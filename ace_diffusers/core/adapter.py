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
    TEXT_SPACE_FORMAT_VERSION,
    TEXT_SPACE_STORAGE,
    WEIGHTS_NAME,
    check_not_special,
    fingerprint_of,
    format_version_for,
    group_layer_tensors,
    read_config,
    split_pooled_tensors,
    text_space_shapes,
    weights_metadata,
)
from ..hub.card import base_model_license, build_model_card
from ..hub.download import clean_subfolder, resolve_adapter_dir
from ..hub.push import push_adapter_folder
from ..version import __version__
from .factors import LayerFactors, PooledFactors, validate_layers, validate_pooled
from .text_space import TextSpaceEdit

PENDING = (
    "This adapter was read from a file that stores its closed-form edit as a text map (the text-space "
    "form): its per-layer factors are rebuilt from the K/V weights of the model it is loaded onto. Load it "
    "onto the pipeline (pipe.load_ace_adapter(...)), or rebuild them with "
    "ace_diffusers.integration.attach.materialized(adapter, pipe.unet)."
)


class ACEAdapter:
    """A frozen concept-erasure edit for the cross-attention K/V projections of one UNet architecture.

    It stores *what is applied*; how it was found (closed form, trainer) is recorded in ``fit`` only.
    ``pooled``: the edit of the pooled text embedding, for UNets that also read one (SDXL's
    ``text_embeds``); ``None`` for SD 1.x/2.x. ``text_space``: the same K/V edit as one text map shared
    by every layer (:mod:`.text_space`), which is what gets saved when present. An adapter read from such
    a file is *pending* (``layers is None`` given, ``layer_shapes`` from the file) until
    :meth:`materialized` rebuilds its factors from a model's weights.
    """

    def __init__(
        self,
        layers: Mapping[str, LayerFactors] | None,
        *,
        concepts: list[str],
        neutral: list[str] | None = None,
        kind: str | None = None,
        method: str = "closed-form",
        fit: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        extra: Mapping[str, Any] | None = None,
        pooled: PooledFactors | None = None,
        text_space: TextSpaceEdit | None = None,
        layer_shapes: Mapping[str, tuple[int, int, int]] | None = None,
    ) -> None:
        if layers is None and (text_space is None or not layer_shapes):
            raise ACEAdapterFormatError(
                "An ACEAdapter without layers needs its text-space edit and the layer shapes."
            )
        if layers is not None and not layers:
            raise ACEAdapterFormatError("An ACEAdapter needs at least one layer; got none.")
        self._layers: dict[str, LayerFactors] | None = None if layers is None else dict(layers)
        if self._layers is not None:
            validate_layers(self._layers)
            layer_shapes = {name: f.shape for name, f in self._layers.items()}
        self.shapes = {name: tuple(shape) for name, shape in sorted(layer_shapes.items())}
        if text_space is not None and (
            set(text_space.rights) != set(self.shapes)
            or any(shape[0] != text_space.basis.shape[0] for shape in self.shapes.values())
        ):
            raise ACEAdapterFormatError(
                "The text-space edit's layers or text width do not match the adapter's layers; the adapter "
                "is corrupted. Re-download or re-save it."
            )
        self.text_space = text_space
        self.concepts = list(concepts)
        self.neutral = list(neutral or [])
        self.kind = kind
        self.method = method
        self.fit = dict(fit or {})
        self.base_model = base_model
        self.extra = dict(extra or {})
        self.pooled = pooled
        validate_pooled(pooled)

    # ------------------------------------------------------------------ properties
    @property
    def layers(self) -> dict[str, LayerFactors]:
        """Per cross-attention layer, the factors applied (raises for a :attr:`pending` adapter)."""
        if self._layers is None:
            raise ACEAdapterFormatError(PENDING)
        return self._layers

    @property
    def pending(self) -> bool:
        """Whether the factors still have to be rebuilt from a model's weights (:meth:`materialized`)."""
        return self._layers is None

    def materialized(self, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> ACEAdapter:
        """This adapter with its factors rebuilt from ``{layer: (W_k, W_v)}`` of the model it goes on
        (itself if it is not pending)."""
        if not self.pending:
            return self
        return self._with_layers(self.text_space.layer_factors(weights))

    @property
    def rank(self) -> int:
        if self.pending:
            return self.text_space.rank
        return max(f.rank for f in self.layers.values())

    @property
    def fingerprint(self) -> dict[str, Any]:
        pooled_dim = self.pooled.dim if self.pooled is not None else None
        return fingerprint_of(self.shapes, pooled_dim)

    @property
    def format_version(self) -> int:
        """The adapter-file format this adapter is written in (the oldest that holds it)."""
        if self.text_space is not None:
            return TEXT_SPACE_FORMAT_VERSION
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
            **({"storage": TEXT_SPACE_STORAGE} if self.text_space is not None else {}),
            "weights_sha256": tensors_checksum(self.state_dict()),
            "created_with": f"ace-diffusers {__version__}",
            **({"extra": self.extra} if self.extra else {}),
        }

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_dict().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors written to the weights file: the text-space edit when there is one, else every
        layer's factors; then the pooled edit."""
        if self.text_space is not None:
            tensors = dict(self.text_space.tensors())
        else:
            tensors = {f"{n}.{key}": t for n, f in self.layers.items() for key, t in f.tensors().items()}
        if self.pooled is not None:
            tensors.update({f"{POOLED_NAME}.{key}": t for key, t in self.pooled.tensors().items()})
        return tensors

    def to(self, *args: Any, **kwargs: Any) -> ACEAdapter:
        """A copy with every tensor converted, e.g. ``adapter.to(torch.float16)``."""
        layers = None if self.pending else {name: f.to(*args, **kwargs) for name, f in self.layers.items()}
        pooled = self.pooled.to(*args, **kwargs) if self.pooled is not None else None
        text_space = self.text_space.to(*args, **kwargs) if self.text_space is not None else None
        return self._with_layers(layers, pooled=pooled, text_space=text_space)

    def restricted(self, layer_shapes: Mapping[str, tuple[int, int, int]]) -> ACEAdapter:
        """The same edit on a subset of the layers: those of a model that shares some of the UNet's
        layers (a ControlNet copies its down and mid blocks). Every requested layer must be in the
        adapter with the same shape."""
        missing = sorted(set(layer_shapes) - set(self.shapes))
        if missing:
            raise ACEArchitectureMismatchError(
                f"Layer '{missing[0]}' (and {len(missing) - 1} more) has no entry in the adapter: this model "
                "does not share its cross-attention layers with the UNet the adapter was fitted for."
            )
        part = {name: self.layers[name] for name in sorted(layer_shapes)}
        adapter = self._with_layers(part)
        adapter.check_compatible(layer_shapes)
        return adapter

    def _with_layers(self, layers: Mapping[str, LayerFactors] | None, **changes: Any) -> ACEAdapter:
        text_space = changes.get("text_space", self.text_space)
        if text_space is not None and layers is not None and set(layers) != set(text_space.rights):
            text_space = None  # a part of the layers (a ControlNet's): kept in memory only, never saved
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
            text_space=text_space,
            layer_shapes=self.shapes,
        )

    def __repr__(self) -> str:
        return (
            f"ACEAdapter(concepts={self.concepts!r}, kind={self.kind!r}, rank={self.rank}, "
            f"layers={len(self.shapes)}, method={self.method!r}"
            f"{', pooled=True' if self.pooled is not None else ''})"
        )

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, layer_shapes: Mapping[str, tuple[int, int, int]]) -> None:
        """Raise :class:`ACEArchitectureMismatchError` naming the first layer that does not fit."""
        for name in sorted(set(self.shapes) | set(layer_shapes)):
            if name not in layer_shapes:
                raise ACEArchitectureMismatchError(
                    f"Adapter layer '{name}' does not exist in this UNet: the adapter was fitted for a "
                    f"different architecture (adapter fingerprint {self.fingerprint['hash']}). Load an "
                    f"adapter "
                    "fitted for this base model, or fit a new one with erase_concept()."
                )
            if name not in self.shapes:
                raise ACEArchitectureMismatchError(
                    f"UNet cross-attention layer '{name}' has no entry in the adapter: the adapter was "
                    "fitted "
                    f"for a different architecture (adapter fingerprint {self.fingerprint['hash']}). Load an "
                    "adapter fitted for this base model, or fit a new one with erase_concept()."
                )
            want, have = tuple(self.shapes[name]), tuple(layer_shapes[name])
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
        layers, text_space, shapes = _read_edit(config, layer_tensors, folder, weights_path)
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
            text_space=text_space,
            layer_shapes=shapes,
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


def _read_edit(config: dict, tensors: dict, folder: Path, weights_path: Path) -> tuple:
    """``(layers, text space, layer shapes)`` of a weights file: every layer's factors, or (format 3,
    ``"storage": "text_space"``) the text-space edit with the shapes its config records."""
    if "storage" in config:
        shapes = text_space_shapes(config, folder / CONFIG_NAME)
        return None, TextSpaceEdit.from_tensors(tensors, weights_path), shapes
    grouped = group_layer_tensors(tensors, weights_path)
    return {name: LayerFactors(**group) for name, group in grouped.items()}, None, None
