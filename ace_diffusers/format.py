"""The adapter file format: file names, version, the tensor naming scheme and the config reader.

An ACE adapter on disk is a folder with two files (and a model card when pushed to the Hub)::

    ace_adapter.safetensors   tensors "<layer>.k_down" (r, d_text), "<layer>.k_up" (d_k, r),
                              "<layer>.v_down", "<layer>.v_up", "<layer>.gate_weight" (d_text,),
                              "<layer>.gate_bias" (1,); format 2 may add the pooled-embedding
                              edit "pooled.p_down" (r, d_pool), "pooled.p_up" (d_pool, r),
                              "pooled.gate_weight" (d_pool,), "pooled.gate_bias" (1,)
                              format 3, "storage": "text_space" (a closed form where every layer
                              reads one text): instead of the layers' six tensors "text_space.basis"
                              (d_text, k), "text_space.down_basis" (k, d_text), "text_space.gate_weight",
                              "text_space.gate_bias" and per layer "<layer>.k_right", "<layer>.v_right"
                              (k, r); the factors are rebuilt from the model's K/V weights
                              (:mod:`ace_diffusers.core.text_space`)
    ace_config.json           format version, concepts, neutral anchors, kind, rank, fit settings,
                              base model, architecture fingerprint (the layer shapes), weights checksum,
                              "storage" (format 3)

safetensors and JSON only: loading an adapter from a stranger never executes code. This module knows the
layout but not the :class:`~ace_diffusers.core.adapter.ACEAdapter` class, so the Hub code can check a
folder without importing the adapter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import ACEAdapterFormatError

WEIGHTS_NAME = "ace_adapter.safetensors"
CONFIG_NAME = "ace_config.json"
FORMAT_VERSION = 3  # the newest this package reads; an adapter is written with the oldest that holds it
POOLED_FORMAT_VERSION = 2  # the first version with a pooled-embedding edit (SDXL's ``text_embeds``)
TEXT_SPACE_FORMAT_VERSION = 3  # the first version storing a closed-form edit as one text map
TEXT_SPACE_STORAGE = "text_space"  # ``ace_config.json`` "storage": how the K/V edit is stored
MAX_CONFIG_BYTES = 16 * 1024 * 1024
TENSOR_KEYS = ("k_down", "k_up", "v_down", "v_up", "gate_weight", "gate_bias")
POOLED_NAME = "pooled"  # the tensor-name prefix of the pooled-embedding edit (no UNet module has this name)
POOLED_KEYS = ("p_down", "p_up", "gate_weight", "gate_bias")


def format_version_for(has_pooled: bool) -> int:
    """The oldest format that holds an adapter: 1 (K/V only, readable by every release) or 2 (pooled)."""
    return POOLED_FORMAT_VERSION if has_pooled else 1


def weights_metadata(version: int) -> dict[str, str]:
    """The safetensors header metadata of a weights file of format ``version``."""
    return {"format": "pt", "ace_format_version": str(version)}


def check_not_special(path: Path) -> None:
    """Refuse an adapter file that exists but is no regular file (a link to a device, a FIFO, a folder):
    reading ``/dev/zero`` or a pipe would never end."""
    if (path.exists() or path.is_symlink()) and not path.is_file():
        target = path.resolve() if path.is_symlink() else path
        what = "a broken link"
        if target.is_dir():
            what = "a folder"
        elif target.exists():
            what = "a device, pipe or socket"
        raise ACEAdapterFormatError(
            f"'{path}' is {what} ({target}), not a regular file; an ACE adapter file must be a regular "
            "file. Re-save or re-download the adapter."
        )


def read_config(path: Path) -> dict[str, Any]:
    """Read and validate ``ace_config.json`` (size, JSON, version, required keys)."""
    check_not_special(path)
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
        raise ACEAdapterFormatError(
            f"'{path}' is not valid JSON ({err}); re-download or re-save the adapter."
        ) from err
    except RecursionError as err:  # absurdly nested JSON
        raise ACEAdapterFormatError(f"'{path}' nests JSON too deeply to be an adapter config.") from err
    if not isinstance(config, dict):
        raise ACEAdapterFormatError(f"'{path}' must hold a JSON object, not {type(config).__name__}.")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ACEAdapterFormatError(
            f"'{path}' has no integer 'format_version'; it is not an ACE adapter config."
        )
    if version > FORMAT_VERSION:
        raise ACEAdapterFormatError(
            f"'{path}' uses adapter format version {version}, newer than this ace-diffusers supports "
            f"({FORMAT_VERSION}). Upgrade ace-diffusers (pip install -U ace-diffusers)."
        )
    concepts = config.get("concepts")
    if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
        raise ACEAdapterFormatError(f"'{path}': 'concepts' must be a list of strings.")
    for key, (kinds, what) in OPTIONAL_FIELDS.items():
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise ACEAdapterFormatError(
                f"'{path}': '{key}' must be {what}, got {type(value).__name__}; re-download or re-save "
                "the adapter."
            )
    if isinstance(config.get("neutral"), list) and not all(isinstance(n, str) for n in config["neutral"]):
        raise ACEAdapterFormatError(f"'{path}': 'neutral' must be a list of strings.")
    if not isinstance((config.get("fingerprint") or {}).get("layers", {}), dict):
        raise ACEAdapterFormatError(f"'{path}': 'fingerprint.layers' must be a JSON object.")
    return config


# Optional config fields: the JSON types each may have (``null`` / absent is always allowed).
OPTIONAL_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "neutral": ((list,), "a list of strings"),
    "kind": ((str,), "a string"),
    "method": ((str,), "a string"),
    "base_model": ((str,), "a string"),
    "created_with": ((str,), "a string"),
    "rank": ((int,), "an integer"),
    "fit": ((dict,), "a JSON object"),
    "extra": ((dict,), "a JSON object"),
    "fingerprint": ((dict,), "a JSON object"),
    "weights_sha256": ((str,), "a hex string"),
    "storage": ((str,), "a string"),
}


def text_space_shapes(config: Mapping[str, Any], source: Path) -> dict[str, tuple[int, int, int]]:
    """The layer shapes a text-space adapter records (its factors are rebuilt from the model's weights,
    so the file holds no per-layer shape of its own): ``fingerprint.layers``, checked."""
    if config.get("storage") != TEXT_SPACE_STORAGE:
        raise ACEAdapterFormatError(
            f"'{source}': unknown storage {config.get('storage')!r}; this ace-diffusers reads "
            f"'{TEXT_SPACE_STORAGE}' (or none). Upgrade ace-diffusers."
        )
    layers = (config.get("fingerprint") or {}).get("layers") or {}
    shapes = {}
    for name, shape in layers.items():
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and v > 0 for v in shape)):
            raise ACEAdapterFormatError(f"'{source}': fingerprint layer '{name}' has no (d_text, d_k, d_v).")
        shapes[name] = tuple(shape)
    if not shapes:
        raise ACEAdapterFormatError(
            f"'{source}': a text-space adapter must list its layers in 'fingerprint'."
        )
    return shapes


def split_pooled_tensors(
    tensors: Mapping[str, torch.Tensor], source: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(layer tensors, {key: tensor} of the pooled edit or None)``; the pooled group checked complete."""
    pooled = {k.partition(".")[2]: t for k, t in tensors.items() if k.startswith(POOLED_NAME + ".")}
    if not pooled:
        return dict(tensors), None
    unknown = sorted(set(pooled) - set(POOLED_KEYS))
    missing = [k for k in POOLED_KEYS if k not in pooled]
    if unknown or missing:
        raise ACEAdapterFormatError(
            f"'{source}': the pooled-embedding edit has tensors {sorted(pooled)}; expected exactly "
            f"{[f'{POOLED_NAME}.{k}' for k in POOLED_KEYS]}. Re-download or re-save the adapter."
        )
    rest = {k: t for k, t in tensors.items() if not k.startswith(POOLED_NAME + ".")}
    return rest, pooled


def group_layer_tensors(
    tensors: Mapping[str, torch.Tensor], source: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {key: tensor}}`` from the flat ``"<layer>.<key>"`` names of a weights file (without the
    pooled edit: :func:`split_pooled_tensors`), checked complete; layers sorted by name."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, tensor in tensors.items():
        layer, _, key = full_key.rpartition(".")
        if not layer or layer == POOLED_NAME or key not in TENSOR_KEYS:
            raise ACEAdapterFormatError(
                f"'{source}' holds an unexpected tensor '{full_key}'; ACE adapters hold only "
                f"'<layer>.{{{','.join(TENSOR_KEYS)}}}'."
            )
        grouped.setdefault(layer, {})[key] = tensor
    for layer, group in sorted(grouped.items()):
        missing = [k for k in TENSOR_KEYS if k not in group]
        if missing:
            raise ACEAdapterFormatError(f"'{source}': layer '{layer}' is missing tensors {missing}.")
    return dict(sorted(grouped.items()))


def fingerprint_of(
    shapes: Mapping[str, tuple[int, int, int]], pooled_dim: int | None = None
) -> dict[str, Any]:
    """Architecture fingerprint: cross-attention layer names with ``(d_text, d_k, d_v)`` and a hash;
    with a pooled edit also its width (an adapter without one hashes as in format 1)."""
    layers = {name: list(shape) for name, shape in sorted(shapes.items())}
    hashed: dict[str, Any] = layers if pooled_dim is None else {"layers": layers, POOLED_NAME: pooled_dim}
    digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]
    return {"layers": layers, **({POOLED_NAME: pooled_dim} if pooled_dim is not None else {}), "hash": digest}

