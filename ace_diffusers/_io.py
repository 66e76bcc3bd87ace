"""The one atomic writer: files and folders appear whole or not at all.

Every file ace-diffusers writes (adapters, caches, LoRA exports, reports, figures) goes through here, so a
crash, a full disk or a concurrent reader never meets half a file and nothing is left behind:

* a file is written to a hidden temporary name beside its target and renamed over it (``os.replace`` is
  atomic on POSIX and Windows); the temporary file is removed on any failure;
* a folder (an adapter) is written into a fresh sibling folder which then *replaces* the target — on Linux
  by one atomic ``renameat2(RENAME_EXCHANGE)``, elsewhere by two renames microseconds apart.

safetensors and JSON only: nothing here can write a pickle.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order.

    Adapters record it as ``weights_sha256`` in their config and the embedding cache in each file's
    metadata; both check it on load, so data bytes altered under an intact safetensors header are refused
    (adapters) or recomputed (cache) instead of used.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed into place; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=False, allow_nan=True) + "\n")


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """``tensors`` (moved to the CPU, made contiguous) as one safetensors file, written atomically."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return atomic_write_bytes(path, safetensors_bytes(cpu, metadata=dict(metadata) if metadata else None))


# ---------------------------------------------------------------------- folders
@contextlib.contextmanager
def staged_directory(
    target: str | os.PathLike, *, carry_over: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block succeeds it replaces ``target``.

    ``carry_over(item)`` picks files of an existing ``target`` to copy into the staging folder first (e.g.
    a model card next to the adapter files). On any error ``target`` is left exactly as it was and the
    staging folder is removed. A symlink ``target`` is written through (the folder it points to is
    replaced, the link stays). Staging folders left by a process that was killed mid-save are swept;
    the new folder gets the permissions the umask gives a new folder, like ``os.makedirs``.
    """
    target = Path(target).absolute()
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(target)}{os.getpid()}-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        if carry_over is not None and target.is_dir():
            for item in target.iterdir():
                if item.is_file() and carry_over(item):
                    shutil.copy2(item, staging / item.name)
        yield staging
        _fsync_files(staging)
        _replace_directory(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.saving-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sweep_stale_staging(target: Path) -> None:
    """Remove staging folders of ``target`` whose writer process no longer exists (killed mid-save)."""
    prefix = _staging_prefix(target)
    for item in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid = item.name[len(prefix) :].split("-", 1)[0]
        if item.is_dir() and not item.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(item, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _fsync_files(folder: Path) -> None:
    for item in folder.iterdir():
        if item.is_file():
            with open(item, "rb") as fh:
                os.fsync(fh.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace_directory(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging``. With an atomic exchange there is no instant at which ``target`` is
    missing or half-written; elsewhere two renames leave a window of microseconds."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous folder
        return
    backup = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
