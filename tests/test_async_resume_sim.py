"""Asynchronous resume on simulated GPUs: prefetch(), resume(wait=False), wait_on_stream().

The move runs on the core's worker; the caller's later work waits for it on its stream (in
the simulation streams are synchronous, so that wait blocks the calling thread until the
move is done, which is what queued GPU work would see). Exact bytes; failures roll back and
still release the waiters.
"""

from __future__ import annotations

import random

import pytest

import aqua_alloc as aq
import aqua_alloc.memory.sim as sim
from conftest import reset_aqua

MiB = 1 << 20


@pytest.fixture(autouse=True)
def clean():
    reset_aqua()
    aq.enable(backend="sim", sim_devices=2, sim_device_bytes=128 * MiB, sim_host_bytes=256 * MiB, chunk=4 * MiB,
              local_budget=32 * MiB, lend=0, host_budget=128 * MiB, host_reserve=128 * MiB, lend_poll_ms=0)
    yield
    sim.fail_clear()
    reset_aqua()


def parked_on_host(tag: str, size: int, seed: int) -> tuple[int, bytes]:
    data = random.Random(seed).randbytes(size)
    with aq.context(tag, device=0):
        ptr = sim.malloc(size, 0)
    sim.write(ptr, data)
    aq.evict(tag, "host")
    return ptr, data


def test_resume_without_waiting_returns_a_future_and_the_stream_waits_for_the_move():
    ptr, data = parked_on_host("a", 16 * MiB, 1)
    future = aq.resume("a", wait=False)
    # resume(wait=False) queued the wait on the caller's stream: what follows sees the move done.
    assert aq.where("a")["gpu0"] == 16 * MiB
    assert future.result(timeout=10) == aq.MoveResult(bytes_moved=16 * MiB, bytes_elsewhere=0)
    assert sim.read(ptr, len(data)) == data


def test_prefetch_then_wait_on_stream():
    ptr, data = parked_on_host("a", 12 * MiB, 2)
    future = aq.prefetch("a")
    assert aq.wait_on_stream(future) is True
    assert aq.where("a")["gpu0"] == 12 * MiB
    assert future.result(timeout=10).bytes_moved == 12 * MiB
    assert sim.read(ptr, len(data)) == data
    with pytest.raises(ValueError, match="wait_on_stream"):
        aq.wait_on_stream(object())


def test_prefetches_complete_in_order_and_a_park_waits_for_its_own():
    ctxs = {f"c{i}": parked_on_host(f"c{i}", 8 * MiB, i) for i in range(6)}
    futures = [aq.prefetch(tag) for tag in ctxs]  # 48 MiB of contexts for a 32 MiB budget
    aq.park("c0")  # waits for c0's own resume first, then parks it
    results = [f.result(timeout=10) for f in futures]
    assert sum(r.bytes_moved for r in results) >= 32 * MiB
    for tag, (ptr, data) in ctxs.items():
        assert sim.read(ptr, len(data)) == data, tag
    assert aq.stats()["tiers"]["gpu0"]["current"] <= 32 * MiB


def test_a_failed_asynchronous_resume_rolls_back_and_releases_the_waiters():
    ptr, data = parked_on_host("a", 16 * MiB, 3)
    sim.fail_nth(sim.Op.COPY, 1, 1)
    future = aq.prefetch("a")
    assert aq.wait_on_stream(future) is True  # released although the move failed
    with pytest.raises(aq.CoreError, match="rolled back, bytes intact"):
        future.result(timeout=10)
    sim.fail_clear()
    assert aq.where("a")["host"] == 16 * MiB
    assert sim.read(ptr, len(data)) == data
    assert aq.resume("a").bytes_moved == 16 * MiB  # and it can be resumed again


def test_prefetch_of_an_unknown_context_names_it():
    with pytest.raises(aq.ContextError, match="'nope'"):
        aq.prefetch("nope")
