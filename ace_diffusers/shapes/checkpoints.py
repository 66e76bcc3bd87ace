"""Resumable training state of the miniature world: safetensors tensors plus a JSON sidecar, no pickle.

A checkpoint ``name`` is two files, ``name.safetensors`` (model, EMA and optimizer tensors, prefixed
``model/``, ``ema/``, ``opt/``) and ``name.json`` (step, elapsed seconds, loss history and the
optimizer's parameter groups), both written atomically so an interrupted run resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from .._io import atomic_save_safetensors, atomic_write_text


def write_json(path: Path, obj) -> None:
    """Atomic JSON write (tuples become lists, anything else unknown becomes its ``str``)."""
    atomic_write_text(
        path, json.dumps(obj, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    )


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_save_safetensors(path, {k: v.contiguous() for k, v in tensors.items()})


def lr_at(step: int, total: int, base: float, warmup: int = 100, final_frac: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_frac * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_ckpt(path: Path, models: dict[str, torch.nn.Module | dict], opt, meta: dict) -> None:
    """Write models (modules or state dicts), the optimizer state and ``meta`` as checkpoint ``path``."""
    tensors = {}
    for name, m in models.items():
        sd = m.state_dict() if isinstance(m, torch.nn.Module) else m
        tensors.update({f"{name}/{k}": v for k, v in sd.items()})
    ot, groups = optimizer_tensors(opt)
    tensors.update({f"opt/{k}": v for k, v in ot.items()})
    save_tensors(path.with_suffix(".safetensors"), tensors)
    write_json(path.with_suffix(".json"), {**meta, "param_groups": groups})


def load_ckpt(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``({"model": state_dict, "opt": ..., ...}, meta)`` of checkpoint ``path``."""
    tensors = load_file(str(path.with_suffix(".safetensors")))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        name, rest = k.split("/", 1)
        groups.setdefault(name, {})[rest] = v
    return groups, read_json(path.with_suffix(".json"))


def has_ckpt(path: Path) -> bool:
    return path.with_suffix(".json").exists() and path.with_suffix(".safetensors").exists()
