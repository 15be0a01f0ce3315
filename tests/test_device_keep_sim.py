"""Device keep (AQUA_DEVICE_KEEP) on simulated GPUs: a GPU keeps the backings of moves mapped
at their own address and reuses them, as the host pool does, so that a park to a peer and
the resume from it make no backing, map nothing to stage and grant no access. Checked with
exact driver-call counts, exact bytes, a failure at each driver call rolled back, and the
kept memory given back when the lender or the GPU needs it.
"""

from __future__ import annotations

import ctypes
import random
import time

import pytest

import aqua_alloc as aq
import aqua_alloc.memory.sim as sim
from aqua_alloc.memory import native
from conftest import flush_releases

MiB = 1 << 20
KEEP = 64 * MiB

pytestmark = pytest.mark.usefixtures("fresh_core")  # a torn-down core before and after each test


def enable(keep: int, lend: int = 64 * MiB) -> None:
    aq.enable(backend="sim", sim_devices=2, sim_device_bytes=128 * MiB, sim_host_bytes=256 * MiB, chunk=4 * MiB,
              local_budget={0: 64 * MiB, 1: 128 * MiB}, lend={0: 0, 1: lend}, host_budget=128 * MiB, host_reserve=64 * MiB,
              lend_poll_ms=0, device_keep=keep)


def make_a() -> tuple[int, bytes]:
    """Context 'a' on GPU 0: one 16 MiB segment (four 4 MiB pieces), parked."""
    data = random.Random(3).randbytes(16 * MiB)
    with aq.context("a", device=0):
        ptr = sim.malloc(16 * MiB, 0)
    sim.write(ptr, data)
    aq.park("a")
    return ptr, data


def calls_of(fn, flush: bool) -> dict[sim.Op, int]:
    """Driver calls made by fn() (deferred releases flushed first when `flush`, so that every
    backing a move needs is made, not reused within the release delay)."""
    if flush:
        flush_releases()
    before = {op: sim.op_count(op) for op in sim.Op}
    fn()
    return {op: sim.op_count(op) - n for op, n in before.items()}


def round_trip() -> None:
    """To the peer and back: the first trip makes the backings, kept or not."""
    aq.evict("a", "gpu1")
    aq.resume("a")
    aq.park("a")


@pytest.mark.parametrize("keep", [0, KEEP], ids=["released", "kept"])
def test_a_kept_backing_costs_no_create_no_staging_and_no_grant(keep):
    enable(keep)
    ptr, data = make_a()
    round_trip()
    park = calls_of(lambda: aq.evict("a", "gpu1"), flush=True)
    assert sim.read(ptr, len(data)) == data and aq.where("a")["gpu1"] == 16 * MiB
    resume = calls_of(lambda: aq.resume("a"), flush=True)
    assert sim.read(ptr, len(data)) == data and aq.where("a")["gpu0"] == 16 * MiB
    for calls in (park, resume):
        assert calls[sim.Op.COPY] == 4, calls
    # A resume makes its home backings, stages each (map and grant at the shadow), unstages
    # it and remaps home; it keeps the staging of the context's last 2 pieces, which the
    # park after it drops (2 unmaps). Kept or not, the same calls: a kept source only lets
    # the home remaps run while the copies do.
    assert resume[sim.Op.CREATE] == 4
    assert resume[sim.Op.MAP] == resume[sim.Op.SET_ACCESS] == 8 and resume[sim.Op.UNMAP] == 6, resume
    if keep:
        # The park into kept peer backings: per piece only the home remap (unmap, map, grant).
        assert park[sim.Op.CREATE] == 0, park
        assert park[sim.Op.MAP] == park[sim.Op.SET_ACCESS] == 4 and park[sim.Op.UNMAP] == 4 + 2, park
    else:
        # Per piece: a backing made on the peer, staged, unstaged, and the home remap.
        assert park[sim.Op.CREATE] == 4, park
        assert park[sim.Op.MAP] == park[sim.Op.SET_ACCESS] == 8 and park[sim.Op.UNMAP] == 8 + 2, park


@pytest.mark.parametrize("direction", ["park", "resume"])
def test_a_failure_at_each_driver_call_of_a_kept_move_rolls_back(direction):
    enable(KEEP)
    ptr, data = make_a()
    round_trip()  # kept backings on both GPUs, with access granted

    def to_start() -> None:
        if direction == "park":
            if aq.where("a")["gpu1"]:
                aq.resume("a")
            aq.park("a")
        else:
            aq.park("a")
            if aq.where("a")["gpu0"]:
                aq.evict("a", "gpu1")

    def run():
        return aq.evict("a", "gpu1") if direction == "park" else aq.resume("a")

    to_start()
    calls = calls_of(run, flush=False)
    assert calls[sim.Op.CREATE] == 0
    num_rolled_back = 0
    for op in (sim.Op.MAP, sim.Op.UNMAP, sim.Op.SET_ACCESS, sim.Op.COPY, sim.Op.SYNC):
        for nth in range(calls[op]):
            to_start()
            where = aq.where("a")
            tiers = {t: (s["current"], s["lent"]) for t, s in aq.stats()["tiers"].items()}
            sim.fail_nth(op, nth, 1)
            with pytest.raises(aq.CoreError, match="rolled back, bytes intact"):
                run()
            sim.fail_clear()
            num_rolled_back += 1
            assert aq.where("a") == where, (op.name, nth)
            assert {t: (s["current"], s["lent"]) for t, s in aq.stats()["tiers"].items()} == tiers, (op.name, nth)
            assert sim.read(ptr, len(data)) == data, (op.name, nth)
            run()  # the same move now goes through
            assert sim.read(ptr, len(data)) == data, (op.name, nth)
    assert num_rolled_back == sum(calls[op] for op in (sim.Op.MAP, sim.Op.UNMAP, sim.Op.SET_ACCESS, sim.Op.COPY,
                                                       sim.Op.SYNC)) > 0


def test_kept_memory_stays_within_the_lend_budget_and_goes_back_when_asked():
    enable(KEEP)
    ptr, data = make_a()
    round_trip()  # GPU 1 keeps the 16 MiB of backings the resume gave back, mapped and idle
    assert aq.stats()["tiers"]["gpu1"]["lent"] == 0
    assert sim.usage("gpu1")[0] == 16 * MiB
    assert sim.usage("gpu0")[0] == 16 * MiB, "GPU 0 keeps nothing: it lends nothing"
    assert aq.reclaim(1).pending_bytes == 0
    assert sim.usage("gpu1")[0] == 0, "a reclaim releases what the lender keeps idle"
    aq.lend(1, 64 * MiB)
    round_trip()
    assert sim.usage("gpu1")[0] == 16 * MiB
    aq.lend(1, 8 * MiB)  # a lower lend budget: kept memory beyond it goes back
    assert sim.usage("gpu1")[0] == 8 * MiB
    aq.lend(1, 64 * MiB)
    aq.evict("a", "gpu1")  # 8 MiB kept, 8 MiB made
    aq.lend(1, 0)  # the borrower is parked there: it moves to host, nothing is kept
    assert aq.where("a")["host"] == 16 * MiB and sim.usage("gpu1")[0] == 0
    aq.lend(1, 64 * MiB)
    aq.resume("a")
    round_trip()
    assert sim.usage("gpu1")[0] == 16 * MiB
    native.check(native.lib().aqua_set_device_keep(0), "device keep off")
    assert sim.usage("gpu1")[0] == 0
    assert sim.read(ptr, len(data)) == data


def test_an_elastic_lender_keeps_what_its_free_memory_allows():
    # Elastic lending (the default with two GPUs): the budget is the lender's free memory
    # less its margin, re-read every 10 ms here. Kept backings count as used memory, so the
    # budget drops by what the lender keeps, but stays above lent plus kept: nothing goes.
    aq.enable(backend="sim", sim_devices=2, sim_device_bytes=128 * MiB, sim_host_bytes=256 * MiB, chunk=4 * MiB,
              local_budget={0: 64 * MiB, 1: 128 * MiB}, lend={0: 0}, lend_margin=16 * MiB, host_budget=128 * MiB,
              host_reserve=64 * MiB, lend_poll_ms=10, device_keep=KEEP)
    ptr, data = make_a()
    round_trip()
    time.sleep(0.2)
    assert sim.usage("gpu1")[0] == 16 * MiB
    park = calls_of(lambda: aq.evict("a", "gpu1"), flush=True)
    assert park[sim.Op.CREATE] == 0, park
    assert sim.read(ptr, len(data)) == data


def test_disable_with_live_tensors_gives_kept_memory_back():
    enable(KEEP)
    ptr, data = make_a()
    round_trip()
    assert sim.usage("gpu1")[0] == 16 * MiB
    aq.disable()  # the tensor stays alive: the core stays up to serve its free later
    held, num_maps = ctypes.c_uint64(), ctypes.c_uint64()
    native.check(native.lib().aqua_sim_usage(1, ctypes.byref(held), ctypes.byref(num_maps)), "GPU 1's usage")
    assert held.value == 0, "kept backings outlived disable()"
    assert ctypes.string_at(ptr, len(data)) == data  # home, intact


def test_a_gpu_short_of_memory_releases_what_it_keeps_before_failing():
    # GPU 1 (128 MiB) keeps 16 MiB idle; its own context then needs all 128 MiB: the kept
    # backings are released and the allocation made, not spilled.
    enable(KEEP, lend=64 * MiB)
    ptr, data = make_a()
    round_trip()
    assert sim.usage("gpu1")[0] == 16 * MiB
    with aq.context("big", device=1):
        big = [sim.malloc(64 * MiB, 1), sim.malloc(64 * MiB, 1)]
    assert aq.where("big")["gpu1"] == 128 * MiB
    for p in big:
        sim.free(p)
    assert sim.read(ptr, len(data)) == data
