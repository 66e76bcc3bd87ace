"""One consistent adapter state per UNet forward, across threads.

A UNet forward reads each cross-attention layer's adapter store (the adapters and their multipliers) when
it reaches that layer. Without coordination, a thread that changes scales or loads an adapter while
another thread runs the UNet produces an image in which some layers are erased and some are not, and an
unload can break the forward ("dictionary changed size during iteration").

Every UNet that has carried an ACE adapter therefore holds a :class:`StateLock`, a readers-writer lock:

* a **forward** is a reader (a pre-hook acquires, an always-called post-hook releases). Any number of
  forwards run together, and each sees the state that held when it started;
* every **state change** (attach, detach, scales, the active set, the on/off switch, fusing) is a
  writer. It waits for running forwards to finish and blocks new ones until it is done. Writers go first
  (new forwards wait while one is waiting), so a steady stream of forwards cannot starve a change.

Both sides are re-entrant per thread: a writer may run forwards (fitting, fusing checks) and a forward's
thread may nest forwards. Changing adapters from *inside* a forward on the same thread is allowed and
is the one case that is not isolated.

Scope: the state is consistent per UNet *forward*, i.e. per denoising step. A change made between two
steps of one pipeline call applies from the next step on, as diffusers' own ``set_adapters`` does.
A ``torch.compile``-d UNet cannot take a lock inside its graph; the verbs install the same hooks on the
compile wrapper (outside the graph) the first time they see it, so set scales through ``pipe`` or the
wrapper once before generating from several threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .modules import unwrap_model

_LOCK_ATTR = "_ace_state_lock"  # on the unwrapped UNet's __dict__
_HOOKED_ATTR = "_ace_lock_hooked"  # on any module (UNet or its compile wrapper) that carries the hooks


class StateLock:
    """A re-entrant readers-writer lock with writer preference (forwards read, verbs write)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}  # thread id -> nesting depth
        self._writer: int | None = None
        self._writer_depth = 0
        self._writers_waiting = 0

    def __deepcopy__(self, memo: dict) -> StateLock:  # a copied UNet gets its own, unheld lock
        return StateLock()

    def acquire_read(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me or me in self._readers:
                self._readers[me] = self._readers.get(me, 0) + 1
                return
            while self._writer is not None or self._writers_waiting:
                self._cond.wait()
            self._readers[me] = 1

    def release_read(self) -> None:
        me = threading.get_ident()
        with self._cond:
            depth = self._readers.get(me, 0)
            if depth <= 1:
                self._readers.pop(me, None)
                self._cond.notify_all()
            else:
                self._readers[me] = depth - 1

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Exclusive access: no other thread's forward runs inside this block."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                self._writers_waiting += 1
                try:
                    while self._writer is not None or any(t != me for t in self._readers):
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if self._writer_depth == 0:
                    self._writer = None
                    self._cond.notify_all()


def _lock_of(module: nn.Module) -> StateLock:
    inner = unwrap_model(module)
    lock = inner.__dict__.get(_LOCK_ATTR)
    if lock is None:
        lock = inner.__dict__[_LOCK_ATTR] = StateLock()
    return lock


def _before_forward(module: nn.Module, args: Any) -> None:
    if not torch.compiler.is_compiling():  # inside a compiled graph the wrapper's hooks hold the lock
        _lock_of(module).acquire_read()


def _after_forward(module: nn.Module, args: Any, output: Any) -> None:
    if not torch.compiler.is_compiling():
        _lock_of(module).release_read()


def _hook(module: nn.Module) -> None:
    if not module.__dict__.get(_HOOKED_ATTR):
        module.register_forward_pre_hook(_before_forward)
        module.register_forward_hook(_after_forward, always_call=True)
        module.__dict__[_HOOKED_ATTR] = True


@contextmanager
def changing_state(unet: nn.Module) -> Iterator[None]:
    """Hold ``unet``'s state lock for writing (and make its forwards readers from now on).

    ``unet`` may be a compile wrapper: both it and the module behind it get the hooks. The hooks stay for
    the module's lifetime (two cheap calls per forward), so forwards stay readers after the last unload.
    """
    _hook(unwrap_model(unet))
    if unet is not unwrap_model(unet):
        _hook(unet)
    with _lock_of(unet).writing():
        yield
