"""A context switch under a full budget: the eviction and the resume are one move.

When a parked context must leave for another to come home, the core plans both and runs
them together: copies out of the GPU on one mover stream, copies into it on another, so
both directions of the link work at once. The move is all or nothing across both contexts.
Checked on simulated GPUs with exact bytes and a failure injected at every driver call.
"""

from __future__ import annotations

import random
import time

import pytest

import aqua_alloc as aq
import aqua_alloc.memory.sim as sim
from aqua_alloc.obs import events
from aqua_alloc.memory.allocator import drain_core_events
from conftest import freeze_host_pool

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


# --- switches through a small or drained pinned pool ------------------------------------------


def enable_small_pool(chunk: int) -> None:
    """One GPU whose 12 MiB budget holds one context of 12 MiB; no pinned host backing made
    ahead and none made behind the test's back (the pool changes only through its calls)."""
    aq.enable(backend="sim", sim_devices=2, sim_device_bytes=128 * MiB, sim_host_bytes=256 * MiB, chunk=chunk,
              local_budget=12 * MiB, lend=0, host_budget=64 * MiB, host_reserve=0, lend_poll_ms=0)
    freeze_host_pool()


def make_segments(tag: str, num: int, size: int, seed: int) -> list[tuple[int, bytes]]:
    return [make(tag, size, seed * 100 + k) for k in range(num)]


def park_a_for_b(num: int, size: int) -> dict[str, list[tuple[int, bytes]]]:
    """A parked and evicted whole to host by B's allocations (its host backing made for it),
    B parked on GPU 0: the start of a switch back to A."""
    a = make_segments("a", num, size, 1)
    aq.park("a")
    b = make_segments("b", num, size, 2)
    assert aq.where("a")["host"] == 12 * MiB and aq.where("b")["gpu0"] == 12 * MiB
    aq.park("b")
    return {"a": a, "b": b}


def num_moves_of(tag: str) -> int:
    return len({e.t_ns for e in drain_core_events() if e.kind == events.EventKind.MOVE_START and e.context == tag})


def test_a_resume_brings_its_context_home_whole_through_a_pool_smaller_than_it():
    # On the H200 the pool is made ahead at 1 GiB while an 8B context of 32k tokens is
    # 4 GiB. A resume runs in rounds: what one round brings home from host gives its pinned
    # backing back, and the next round's evictions take it. Here: one idle 4 MiB handle, a
    # 12 MiB context, three rounds. (Before rounds, one exchange and one eviction brought
    # 8 MiB home and left 4 MiB on host, read over PCIe at every step.)
    enable_small_pool(chunk=4 * MiB)
    ctxs = park_a_for_b(3, 4 * MiB)
    freeze_host_pool(4 * MiB)
    assert aq.stats()["tiers"]["host"]["pool_free"] == 4 * MiB
    drain_core_events()
    assert aq.resume("a") == aq.MoveResult(bytes_moved=12 * MiB, bytes_elsewhere=0)
    assert aq.where("a")["gpu0"] == 12 * MiB and aq.where("b")["host"] == 12 * MiB
    assert num_moves_of("a") == 3
    for segments in ctxs.values():
        for ptr, data in segments:
            assert sim.read(ptr, len(data)) == data


def test_the_pool_is_made_in_the_sizes_moves_ask_for():
    # Every piece here is 2 MiB, the pool's smaller class (chunk 4 MiB). Made ahead with no
    # demand seen, a 12 MiB pool would hold two 2 MiB and two 4 MiB handles; made after
    # the 2 MiB pieces were asked for, it holds six 2 MiB handles, so the switch back to A
    # is one move. (On the H200 every KV piece was 16 or 2 MiB, and the fixed split kept
    # three 16 MiB handles and 768 MiB in 64 MiB ones.)
    enable_small_pool(chunk=4 * MiB)
    ctxs = park_a_for_b(6, 2 * MiB)
    freeze_host_pool(12 * MiB)
    drain_core_events()
    assert aq.resume("a") == aq.MoveResult(bytes_moved=12 * MiB, bytes_elsewhere=0)
    assert num_moves_of("a") == 1
    assert aq.where("b")["host"] == 12 * MiB
    for segments in ctxs.values():
        for ptr, data in segments:
            assert sim.read(ptr, len(data)) == data


def test_the_pool_thread_trades_handles_nobody_asks_for_for_ones_they_do():
    # The background thread keeps the reserve in the classes asked for: a miss makes it
    # create that class, and idle handles of a class beyond its share are released. Made
    # ahead (no demand yet), 12 MiB is two 2 MiB and two 4 MiB handles; an eviction of six
    # 2 MiB pieces (pool only, all or nothing) fails until the thread has made 2 MiB
    # handles. Once A is on host the pool settles at A's 12 MiB in use and 12 MiB idle, in
    # 2 MiB handles: the 4 MiB ones were released (kept, they would make 32 MiB).
    aq.enable(backend="sim", sim_devices=2, sim_device_bytes=128 * MiB, sim_host_bytes=256 * MiB, chunk=4 * MiB,
              local_budget=12 * MiB, lend=0, host_budget=64 * MiB, host_reserve=12 * MiB, lend_poll_ms=0)
    host = aq.stats()["tiers"]["host"]
    assert host["pool_total"] == host["pool_free"] == 12 * MiB
    a = make_segments("a", 6, 2 * MiB, 1)
    aq.park("a")
    with pytest.raises(aq.CoreError, match="host has no room"):
        aq.evict("a", "host")  # nothing moved
    assert aq.where("a")["gpu0"] == 12 * MiB
    deadline = time.monotonic() + 10
    while True:
        try:
            assert aq.evict("a", "host") == 12 * MiB
            break
        except aq.CoreError:
            assert time.monotonic() < deadline, "the pool thread never made the 2 MiB handles asked for"
            time.sleep(0.01)
    while (host := aq.stats()["tiers"]["host"])["pool_total"] != 24 * MiB or host["pool_free"] != 12 * MiB:
        assert time.monotonic() < deadline, f"the pool did not settle at 24 MiB, 12 MiB idle: {host}"
        time.sleep(0.01)
    for ptr, data in a:
        assert sim.read(ptr, len(data)) == data


def test_host_backing_made_for_a_burst_stays_for_the_next_one():
    # Host backing made at allocation for a parked context's eviction is idle again once
    # that context is home. Its class is asked for: the pool keeps it (making it again
    # costs ten copies), beyond a reserve smaller than it, and the next park uses it.
    aq.enable(backend="sim", sim_devices=2, sim_device_bytes=128 * MiB, sim_host_bytes=256 * MiB, chunk=4 * MiB,
              local_budget=12 * MiB, lend=0, host_budget=64 * MiB, host_reserve=4 * MiB, lend_poll_ms=0)
    ctxs = park_a_for_b(3, 4 * MiB)  # A's 12 MiB went to host backing made for it
    aq.release("b")
    for ptr, _ in ctxs.pop("b"):
        sim.free(ptr)
    assert aq.resume("a") == aq.MoveResult(bytes_moved=12 * MiB, bytes_elsewhere=0)
    total = aq.stats()["tiers"]["host"]["pool_total"]
    assert aq.stats()["tiers"]["host"]["pool_free"] >= 12 * MiB  # A's old backing, idle
    time.sleep(0.5)  # the pool thread wakes every 50 ms
    assert aq.stats()["tiers"]["host"]["pool_total"] == total, "the pool released backing its workload asks for"
    aq.park("a")
    assert aq.evict("a", "host") == 12 * MiB  # from the pool only: the backing is still there
    for ptr, data in ctxs["a"]:
        assert sim.read(ptr, len(data)) == data


def test_a_handle_nobody_asks_for_gives_its_budget_to_one_they_do():
    # Host budget 16 MiB, all made ahead before any demand: 2 MiB and 4 MiB handles. A
    # context of 2 MiB pieces needs 12 MiB of 2 MiB handles: the 4 MiB ones are released
    # (nobody asks for them) so that the budget can make 2 MiB ones, even though the idle
    # bytes never exceed the reserve.
    aq.enable(backend="sim", sim_devices=2, sim_device_bytes=128 * MiB, sim_host_bytes=256 * MiB, chunk=4 * MiB,
              local_budget=12 * MiB, lend=0, host_budget=16 * MiB, host_reserve=16 * MiB, lend_poll_ms=0)
    assert aq.stats()["tiers"]["host"]["pool_total"] == 16 * MiB
    a = make_segments("a", 6, 2 * MiB, 1)
    aq.park("a")
    deadline = time.monotonic() + 10
    while True:
        try:
            assert aq.evict("a", "host") == 12 * MiB
            break
        except aq.CoreError as e:
            assert "host has no room" in str(e)
            assert time.monotonic() < deadline, f"no 2 MiB handles were made: {aq.stats()['tiers']['host']}"
            time.sleep(0.01)
    assert aq.stats()["tiers"]["host"]["pool_total"] <= 16 * MiB
    for ptr, data in a:
        assert sim.read(ptr, len(data)) == data
