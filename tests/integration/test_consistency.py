"""Threads: every UNet forward sees one whole adapter state, whatever another thread changes meanwhile."""

import copy
import threading

import torch

from ace_diffusers.integration.attach import attach_adapter, detach_adapter, set_active_adapters
from ace_diffusers.integration.consistency import StateLock, changing_state
from ace_diffusers.testing import random_adapter

ROUNDS = 12


def _inputs(unet):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    context = torch.randn(1, 6, unet.config.cross_attention_dim, generator=g)
    return sample, context


def _forward(unet, sample, context):
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def _race(unet, change, rounds=ROUNDS):
    """Outputs of forwards run in a loop while ``change(i)`` runs in another thread; errors re-raised."""
    sample, context = _inputs(unet)
    outputs, errors, done = [], [], threading.Event()

    def changer():
        try:
            for i in range(rounds * 4):
                change(i)
        except Exception as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=changer)
    thread.start()
    try:
        while not done.is_set() or len(outputs) < rounds:
            outputs.append(_forward(unet, sample, context))
    except Exception as err:  # noqa: BLE001
        errors.append(err)
    thread.join()
    if errors:
        raise errors[0]
    return outputs


def _matches_one_of(output, states):
    return any(torch.equal(output, s) for s in states)


def test_scale_changes_never_mix_within_one_forward(sd_pipe):
    unet = sd_pipe.unet
    attach_adapter(unet, random_adapter(unet, magnitude=2.0, gate_bias=4.0), "a")
    sample, context = _inputs(unet)
    set_active_adapters(unet, ["a"], 0.0)
    off = _forward(unet, sample, context)
    set_active_adapters(unet, ["a"], 1.0)
    on = _forward(unet, sample, context)
    assert not torch.equal(on, off)
    outputs = _race(unet, lambda i: set_active_adapters(unet, ["a"], float(i % 2)))
    assert all(_matches_one_of(out, (on, off)) for out in outputs)


def test_loading_and_unloading_during_forwards_is_safe_and_whole(sd_pipe):
    unet = sd_pipe.unet
    adapter = random_adapter(unet, magnitude=2.0, gate_bias=4.0)
    sample, context = _inputs(unet)
    attach_adapter(unet, adapter, "keep")  # the lock exists from the first adapter on
    detach_adapter(unet, "keep")
    stock = _forward(unet, sample, context)
    attach_adapter(unet, adapter, "a")
    erased = _forward(unet, sample, context)
    detach_adapter(unet, "a")

    def toggle(i):
        if i % 2 == 0:
            attach_adapter(unet, adapter, "a")
        else:
            detach_adapter(unet, "a")

    outputs = _race(unet, toggle)
    assert all(_matches_one_of(out, (stock, erased)) for out in outputs)


def test_the_lock_is_reentrant_and_writers_wait_for_readers():
    lock = StateLock()
    lock.acquire_read()
    lock.acquire_read()  # nested forward on the same thread
    with lock.writing():  # the same thread may change state inside its own forward
        with lock.writing():
            lock.acquire_read()  # and run a forward while writing
            lock.release_read()
    entered = threading.Event()

    def writer():
        with lock.writing():
            entered.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert not entered.wait(0.2)  # another thread's change waits for this thread's forward
    lock.release_read()
    lock.release_read()
    assert entered.wait(5)
    thread.join()


def test_a_deepcopied_unet_gets_its_own_lock(sd_pipe):
    unet = sd_pipe.unet
    with changing_state(unet):
        twin = copy.deepcopy(unet)  # the original's lock is held; the copy's is free
    sample, context = _inputs(unet)
    _forward(twin, sample, context)
