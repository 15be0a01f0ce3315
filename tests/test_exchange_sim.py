"""A context switch under a full budget: the eviction and the resume are one move.

When a parked context must leave for another to come home, the core plans both and runs
them together: copies out of the GPU on one mover stream, copies into it on another, so
both directions of the link work at once. The move is all or nothing across both contexts.
Checked on simulated GPUs with exact bytes and a failure injected at every driver call.
"""

from __future__ import annotations

import random

import pytest

import aqua_alloc as aq
import aqua_alloc.memory.sim as sim
from aqua_alloc.obs import events
from aqua_alloc.memory.allocator import drain_core_events
from conftest import reset_aqua

MiB = 1 << 20


pytestmark = pytest.mark.usefixtures("fresh_core")  # a torn-down core before and after each test


def make(tag: str, size: int, seed: int) -> tuple[int, bytes]:
    data = random.Random(seed).randbytes(size)
    with aq.context(tag, device=0):
        ptr = sim.malloc(size, 0)
    sim.write(ptr, data)
    return ptr, data


def setup_switch() -> dict[str, tuple[int, bytes]]:
    """A (16 MiB) running on GPU 0, whose 16 MiB budget it fills; B (16 MiB) parked on host."""
    aq.enable(backend="sim", sim_devices=2, sim_device_bytes=128 * MiB, sim_host_bytes=256 * MiB, chunk=4 * MiB,
              local_budget=16 * MiB, lend=0, host_budget=128 * MiB, host_reserve=128 * MiB, lend_poll_ms=0)
    b = make("b", 16 * MiB, 2)
    aq.evict("b", "host")
    a = make("a", 16 * MiB, 1)
    return {"a": a, "b": b}


def test_switch_evicts_and_resumes_in_one_move():
    ctxs = setup_switch()
    aq.park("a")
    drain_core_events()
    result = aq.resume("b")
    assert result == aq.MoveResult(bytes_moved=16 * MiB, bytes_elsewhere=0)
    assert aq.where("a")["host"] == 16 * MiB and aq.where("b")["gpu0"] == 16 * MiB
    for ptr, data in ctxs.values():
        assert sim.read(ptr, len(data)) == data
    moves = [e for e in drain_core_events() if e.kind in (events.EventKind.MOVE_START, events.EventKind.MOVE_END)]
    starts = {e.context: e.t_ns for e in moves if e.kind == events.EventKind.MOVE_START}
    ends = {(e.context, e.src, e.dst): e.bytes for e in moves if e.kind == events.EventKind.MOVE_END}
    assert starts.keys() == {"a", "b"} and len(set(starts.values())) == 1, "one move, started once for both"
    assert ends == {("a", "gpu0", "host"): 16 * MiB, ("b", "host", "gpu0"): 16 * MiB}
    stats = aq.stats()["tiers"]
    assert stats["gpu0"]["current"] == 16 * MiB <= stats["gpu0"]["budget"]


@pytest.mark.parametrize("op", [sim.Op.MAP, sim.Op.UNMAP, sim.Op.SET_ACCESS, sim.Op.COPY, sim.Op.SYNC])
def test_a_failure_anywhere_in_the_switch_rolls_both_contexts_back(op):
    ctxs = setup_switch()
    for tag in ("b", "a"):  # each comes home once: its last 2 pieces keep their staging mapping,
        aq.park("a" if tag == "b" else "b")  # as every switch after the first finds them
        aq.resume(tag)
    aq.park("a")
    before = sim.op_count(op)
    aq.resume("b")  # a clean switch, to count the op's calls
    calls = sim.op_count(op) - before
    aq.park("b")
    aq.resume("a")  # and back: a on GPU 0, b on host
    assert calls > 0
    for nth in range(calls):
        where = {tag: aq.where(tag) for tag in ctxs}
        aq.park("a")
        sim.fail_nth(op, nth, 1)
        with pytest.raises(aq.CoreError, match="rolled back, bytes intact"):
            aq.resume("b")
        sim.fail_clear()
        assert {tag: aq.where(tag) for tag in ctxs} == where, (op, nth)
        for ptr, data in ctxs.values():
            assert sim.read(ptr, len(data)) == data, (op, nth)
        stats = aq.stats()["tiers"]
        assert stats["gpu0"]["current"] == 16 * MiB and stats["host"]["current"] == 16 * MiB
        aq.resume("a")  # a runs again, as before the failed switch


def test_a_switch_maps_every_staging_before_its_first_copy():
    # On a GPU, a set-access of device memory waits about 1 ms while a copy out of the device
    # runs (benchmarks/probe_park_copy.py), so a move with copies out stages every piece
    # coming home before it issues any copy. B's 4 pieces of 4 MiB each need a staging map
    # (A's go to pre-mapped host backings, its last 2 through a second mapping): all 6 maps
    # and their set-access calls are made when the first copy fails.
    ctxs = setup_switch()
    aq.park("a")
    maps, grants = sim.op_count(sim.Op.MAP), sim.op_count(sim.Op.SET_ACCESS)
    sim.fail_nth(sim.Op.COPY, 0, 1)
    with pytest.raises(aq.CoreError, match="rolled back, bytes intact"):
        aq.resume("b")
    sim.fail_clear()
    assert sim.op_count(sim.Op.MAP) - maps == 4 + 2
    assert sim.op_count(sim.Op.SET_ACCESS) - grants == 4 + 2
    assert aq.where("a")["gpu0"] == 16 * MiB and aq.where("b")["host"] == 16 * MiB  # rolled back
    for ptr, data in ctxs.values():
        assert sim.read(ptr, len(data)) == data
    assert aq.resume("b").bytes_moved == 16 * MiB  # the switch then goes through
    for ptr, data in ctxs.values():
        assert sim.read(ptr, len(data)) == data
