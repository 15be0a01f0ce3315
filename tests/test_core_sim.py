"""The C++ core over simulated devices: every rule checked with exact bytes and counts.

The simulated backend makes each GPU and the host out of host memory, with real
pointers: a segment's bytes are read and written through its address wherever they live,
and an unmapped range faults instead of returning stale data. So these tests hold the core
to its contract with no GPU:

- a seeded random walk over 8 GPUs and the host checks, after every step, every byte of
  every live segment, every budget, where() against the tier counters, and that contexts
  the step did not target never move the wrong way (a running context never moves);
- a failure injected at each driver call of a move rolls the move back completely;
- eviction under pressure (least recently run first), spilling, out of memory;
- GPUs without peer access are never lenders;
- threads allocating and moving at once;
- bad input gives an error that names what was wrong, and loses nothing;
- the core's event ring.

Each test starts from a torn-down core (fixture `clean`). Sizes are bytes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import random
import threading
import time

import pytest

import aqua_alloc as aq
import aqua_alloc.memory.sim as sim
from aqua_alloc.memory import native as _native
from aqua_alloc.memory.allocator import drain_core_events, num_core_events_dropped
from conftest import flush_releases, freeze_host_pool, reset_aqua

MiB = 1 << 20
GRANULARITY = 2 * MiB  # the simulated mapping granularity (sizes round up to it)
CHUNK = 4 * MiB        # largest piece: a 10 MiB segment is pieces of 4, 4 and 2 MiB

_libc = ctypes.CDLL(None)
_libc.memcmp.restype = ctypes.c_int
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


pytestmark = pytest.mark.usefixtures("fresh_core")  # a torn-down core before and after each test


def enable_sim(**overrides) -> None:
    settings = dict(backend="sim", sim_devices=4, sim_device_bytes=64 * MiB, sim_host_bytes=256 * MiB, chunk=CHUNK,
                    local_budget=16 * MiB, lend=8 * MiB, host_budget=64 * MiB, host_reserve=64 * MiB)
    settings.update(overrides)
    aq.enable(**settings)


def rounded(nbytes: int) -> int:
    return -(-nbytes // GRANULARITY) * GRANULARITY


def tiers(num_devices: int) -> list[str]:
    return [f"gpu{d}" for d in range(num_devices)] + ["host"]


def all_usage(num_devices: int) -> dict[str, tuple[int, int]]:
    return {t: sim.usage(t) for t in tiers(num_devices)}


def assert_bytes(ptr: int, expected: bytes | bytearray, what: str = "") -> None:
    """Every byte at ptr equals `expected`; names the first wrong offset otherwise."""
    n = len(expected)
    buf = (ctypes.c_char * n).from_buffer(expected) if isinstance(expected, bytearray) else expected
    if _libc.memcmp(ptr, buf, n) == 0:
        return
    actual = sim.read(ptr, n)
    first = next(i for i in range(n) if actual[i] != expected[i])
    raise AssertionError(f"{what} segment {ptr:#x}: byte {first} of {n} is {actual[first]}, "
                         f"expected {expected[first]}")


def alloc(tag: str, device: int, nbytes: int) -> int:
    with aq.context(tag, device=device):
        return sim.malloc(nbytes, device=device)


def write_pattern(ptr: int, nbytes: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(nbytes)
    sim.write(ptr, data)
    return data


def where_mib(tag: str) -> dict[str, int]:
    """where(tag) without the empty tiers, in MiB (for readable exact assertions)."""
    return {t: b // MiB for t, b in aq.where(tag).items() if b}


# ==========================================================================================
# Seeded random walk.


@dataclasses.dataclass
class Seg:
    tag: str
    size: int          # bytes of the segment (requested size rounded to the granularity)
    data: bytearray    # expected bytes of its first len(data) bytes


class Model:
    """What the core should hold: each live segment's bytes, each live context's device
    and whether it is parked. Released contexts whose segments live on are `orphans`."""

    def __init__(self, num_devices: int) -> None:
        self.num_devices = num_devices
        self.device: dict[str, int] = {}
        self.parked: dict[str, bool] = {}
        self.segs: dict[int, Seg] = {}
        self.orphans: set[str] = set()

    def bytes_of(self, tag: str) -> int:
        return sum(s.size for s in self.segs.values() if s.tag == tag)

    def live_bytes(self) -> int:
        return sum(s.size for s in self.segs.values())

    def verify_bytes(self) -> None:
        for ptr, seg in self.segs.items():
            assert_bytes(ptr, seg.data, f"context {seg.tag!r}")

    def check(self) -> dict[str, dict[str, int]]:
        """Budgets, counters and where(); returns where() of every live context."""
        st = aq.stats()
        ts = st["tiers"]
        for d in range(self.num_devices):
            t = ts[f"gpu{d}"]
            assert t["current"] - t["lent"] <= t["budget"], (f"gpu{d} holds more of its own contexts than its "
                                                             f"budget: {t}")
            assert t["lent"] <= t["lend_budget"], f"gpu{d} lends more than its lend budget: {t}"
        host = ts["host"]
        assert host["current"] <= host["budget"], f"host over budget: {host}"
        assert host["pool_total"] <= host["budget"], f"host pool over budget: {host}"
        assert sum(t["current"] for t in ts.values()) == self.live_bytes()
        assert sum(t["bytes_in"] for t in ts.values()) == sum(t["bytes_out"] for t in ts.values())
        assert st["num_segments"] == len(self.segs) == sim.segment_count()
        assert st["num_contexts"] == len(self.device)
        wheres = {tag: aq.where(tag) for tag in self.device}
        for tag, w in wheres.items():
            assert sum(w.values()) == self.bytes_of(tag), f"where({tag!r}) = {w}"
        if not self.orphans:  # every byte belongs to a context whose where() we can ask
            for tier, t in ts.items():
                assert t["current"] == sum(w[tier] for w in wheres.values()), tier
            for d in range(self.num_devices):
                lent = sum(w[f"gpu{d}"] for tag, w in wheres.items() if self.device[tag] != d)
                assert ts[f"gpu{d}"]["lent"] == lent, f"gpu{d}"
        return wheres

    def check_bystanders(self, before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
                         target: str | None) -> None:
        """Contexts a step did not target: a running one never moves; a parked one only
        loses bytes on its own GPU (evicted) and only gains them elsewhere."""
        for tag, w0 in before.items():
            if tag == target or tag not in after:
                continue
            w1 = after[tag]
            if not self.parked[tag]:
                assert w1 == w0, f"running context {tag!r} moved: {w0} -> {w1}"
                continue
            home = f"gpu{self.device[tag]}"
            assert w1[home] <= w0[home], f"parked context {tag!r} came home by itself: {w0} -> {w1}"
            for tier in w1:
                if tier != home:
                    assert w1[tier] >= w0[tier], f"parked context {tag!r} left {tier} by itself: {w0} -> {w1}"


STORM_OPS = [sim.Op.MAP, sim.Op.UNMAP, sim.Op.SET_ACCESS, sim.Op.COPY, sim.Op.SYNC, sim.Op.CREATE]


def random_walk(seed: int, steps: int, storm_p: float = 0.0) -> dict[str, int]:
    """Runs the walk; returns how many of each step ran (to check that the walk walked)."""
    num_devices = 8
    enable_sim(sim_devices=num_devices, sim_device_bytes=64 * MiB, sim_host_bytes=256 * MiB,
               local_budget=12 * MiB, lend=4 * MiB, host_budget=32 * MiB, host_reserve=32 * MiB)
    rng = random.Random(seed)
    source = rng.randbytes(32 * MiB)  # random bytes: each write takes a slice at a random offset
    model = Model(num_devices)
    done: dict[str, int] = {}
    next_tag = 0
    max_live = 96 * MiB

    def random_bytes(n: int) -> bytes:
        start = rng.randrange(0, len(source) - n + 1)
        return source[start:start + n]

    def random_size() -> int:
        top = 24 * MiB if rng.random() < 0.2 else 10 * MiB
        return rng.randint(GRANULARITY - 4096, top)

    def storm(on: bool) -> None:
        if storm_p and on:
            sim.fail_random(storm_p, rng.getrandbits(32), STORM_OPS)
        elif storm_p:
            sim.fail_clear()

    wheres = model.check()
    for step in range(steps):
        live = list(model.device)
        r = rng.random()
        if not live or (r < 0.28 and model.live_bytes() < max_live):
            op = "alloc"
        elif r < 0.36:
            op = "write"
        elif r < 0.48:
            op = "park"
        elif r < 0.68:
            op = "evict"
        elif r < 0.84:
            op = "resume"
        elif r < 0.96:
            op = "free"
        else:
            op = "release"
        target = None

        if op == "alloc":
            if live and rng.random() < 0.7:
                target = rng.choice(live)
                device = model.device[target]
            else:
                target, device = f"c{next_tag}", rng.randrange(num_devices)
                next_tag += 1
            size = random_size()
            num_segments = sim.segment_count()
            try:
                ptr = alloc(target, device, size)
            except aq.CoreOutOfMemory as exc:
                assert "out of memory" in str(exc) and f"'{target}'" in str(exc), str(exc)
                assert sim.segment_count() == num_segments
                op = "alloc_oom"
                if target not in model.device:  # the context was made before the allocation failed
                    model.device[target], model.parked[target] = device, False
            else:
                data = random_bytes(size)
                sim.write(ptr, data)
                model.segs[ptr] = Seg(target, rounded(size), bytearray(data))
                model.device[target] = device
            model.parked[target] = False  # allocating means running
        elif op == "write":
            ptr = rng.choice(list(model.segs)) if model.segs else None
            if ptr is not None:
                seg = model.segs[ptr]
                n = rng.randint(1, len(seg.data))
                offset = rng.randint(0, len(seg.data) - n)
                data = random_bytes(n)
                sim.write(ptr + offset, data)
                seg.data[offset:offset + n] = data
        elif op == "park":
            target = rng.choice(live)
            aq.park(target)
            model.parked[target] = True
        elif op == "evict":
            target = rng.choice(live)
            home = model.device[target]
            choice = rng.choice(["host", "auto", "peer"])
            tier = f"gpu{rng.choice([d for d in range(num_devices) if d != home])}" if choice == "peer" else choice
            w0 = wheres[target]
            total = sum(w0.values())
            storm(True)
            try:
                moved = aq.evict(target, tier)
            except aq.CoreError as exc:
                storm(False)
                assert aq.where(target) == w0, f"failed evict of {target!r} to {tier} moved bytes"
                if not storm_p:
                    assert isinstance(exc, aq.CoreOutOfMemory) and "has no room" in str(exc), str(exc)
                op = "evict_failed"
            else:
                storm(False)
                w1 = aq.where(target)
                if tier == "auto":
                    assert w1[f"gpu{home}"] == 0 and moved == w0[f"gpu{home}"], (w0, w1, moved)
                    assert all(w1[t] >= w0[t] for t in w1 if t != f"gpu{home}"), (w0, w1)
                else:
                    assert w1[tier] == total and moved == total - w0[tier], (w0, w1, moved)
            model.parked[target] = True  # evict parks first
        elif op == "resume":
            target = rng.choice(live)
            home = f"gpu{model.device[target]}"
            w0 = wheres[target]
            storm(True)
            try:
                result = aq.resume(target)
            except aq.CoreError as exc:
                storm(False)
                assert storm_p and "rolled back, bytes intact" in str(exc), str(exc)
                assert aq.where(target) == w0, f"failed resume of {target!r} moved bytes"
                op = "resume_failed"
            else:
                storm(False)
                w1 = aq.where(target)
                assert w1[home] == w0[home] + result.bytes_moved, (w0, w1, result)
                assert result.bytes_elsewhere == sum(w1.values()) - w1[home], (w1, result)
            model.parked[target] = False
        elif op == "free":
            ptr = rng.choice(list(model.segs)) if model.segs else None
            if ptr is not None:
                target = model.segs.pop(ptr).tag
                sim.free(ptr)
                if target in model.orphans and not model.bytes_of(target):
                    model.orphans.discard(target)
        elif op == "release":
            target = rng.choice(live)
            aq.release(target)
            del model.device[target], model.parked[target]
            if model.bytes_of(target):
                model.orphans.add(target)
        done[op] = done.get(op, 0) + 1

        if op not in ("park", "write"):
            model.verify_bytes()
        after = model.check()
        model.check_bystanders(wheres, after, target)
        wheres = after

    # Everything back: no mapping left anywhere, no device memory held, no segment.
    model.verify_bytes()
    for ptr in list(model.segs):
        sim.free(ptr)
        del model.segs[ptr]
    for tag in list(model.device):
        aq.release(tag)
    assert sim.segment_count() == 0
    assert aq.stats()["num_contexts"] == 0
    freeze_host_pool()
    for tier in tiers(num_devices):
        physical, mappings = sim.usage(tier)
        assert aq.stats()["tiers"][tier]["current"] == 0, tier
        if tier != "host":
            assert mappings == 0, f"{tier}: {mappings} mappings left"
            assert physical == 0, f"{tier}: {physical} bytes of device memory left"
    # Host memory still held is exactly the idle pool (no leaked pinned backing); each idle
    # host backing keeps its own mapping (made once, when it was created).
    deadline = time.monotonic() + 2
    while True:
        host = aq.stats()["tiers"]["host"]
        if sim.usage("host")[0] == host["pool_total"] == host["pool_free"] or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert sim.usage("host")[0] == host["pool_total"] == host["pool_free"], (sim.usage("host"), host)
    # Trimming the pool releases every host backing and its mapping.
    _native.check(_native.lib().aqua_host_pool_trim(0), "trimming the host pool")
    assert sim.usage("host") == (0, 0), sim.usage("host")
    return done


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_walk(seed):
    done = random_walk(seed, steps=1500)
    # The walk exercised every kind of step, including evictions that found no room.
    for op in ("alloc", "write", "park", "evict", "resume", "free", "release"):
        assert done.get(op, 0) >= 20, done


def test_random_walk_with_driver_failures():
    """Each driver call of a move fails with probability 3%: a failed move changes
    nothing (where(), bytes, budgets); one that succeeds is complete."""
    done = random_walk(seed=11, steps=800, storm_p=0.03)
    assert done.get("evict_failed", 0) + done.get("resume_failed", 0) >= 10, done
    assert sim.failures() >= 10


# ==========================================================================================
# Rollback at each driver call of a move.

# "resumed->host": a park right after a resume, whose last 2 pieces are still mapped at the
# shadow (the resume's staging, kept); "gpu0->host": a park of pieces never moved.
MOVES = ["gpu0->host", "resumed->host", "gpu0->gpu1", "host->gpu0"]


class Rollback:
    """One context 'a' on gpu0: two segments of 10 and 6 MiB (pieces 4+4+2 and 4+2)."""

    def __init__(self) -> None:
        enable_sim(sim_devices=2, sim_device_bytes=128 * MiB, local_budget=64 * MiB, lend=64 * MiB,
                   host_budget=128 * MiB, host_reserve=64 * MiB)
        freeze_host_pool()
        self.data = random.Random(7).randbytes(16 * MiB)
        self.p1 = self.p2 = 0
        self.allocate()

    def allocate(self) -> None:
        """The context's segments, made anew (pieces never moved), with its bytes."""
        for ptr in (self.p1, self.p2):
            if ptr:
                sim.free(ptr)
        self.p1 = alloc("a", 0, 10 * MiB)
        self.p2 = alloc("a", 0, 6 * MiB)
        sim.write(self.p1, self.data[:10 * MiB])
        sim.write(self.p2, self.data[10 * MiB:])
        aq.park("a")

    def verify(self) -> None:
        assert_bytes(self.p1, self.data[:10 * MiB])
        assert_bytes(self.p2, self.data[10 * MiB:])

    def state(self):
        host = aq.stats()["tiers"]["host"]
        return (aq.where("a"), all_usage(2), sim.segment_count(),
                {t: (v["current"], v["lent"]) for t, v in aq.stats()["tiers"].items()},
                host["pool_free"], host["pool_total"])

    def prepare(self, move: str) -> None:
        """Put the context where `move` starts: all on gpu0 (fresh, or just resumed from
        host), or all on host."""
        if move == "host->gpu0":
            aq.evict("a", "host")
        elif move == "resumed->host":
            aq.evict("a", "host")
            aq.resume("a")
            aq.park("a")
        elif move == "gpu0->host":
            self.allocate()
        else:
            aq.resume("a")
            aq.park("a")
        flush_releases()

    @staticmethod
    def run(move: str):
        if move.endswith("->host"):
            return aq.evict("a", "host")
        if move == "gpu0->gpu1":
            return aq.evict("a", "gpu1")
        return aq.resume("a")

    @staticmethod
    def destination(move: str) -> str:
        return move.split("->")[1]


def count_ops() -> dict[sim.Op, int]:
    return {op: sim.op_count(op) for op in sim.Op}


@pytest.mark.parametrize("move", MOVES)
def test_failure_at_each_driver_call_rolls_back(move):
    rb = Rollback()
    rb.prepare(move)
    before = count_ops()
    rb.run(move)
    calls = {op: n - before[op] for op, n in count_ops().items()}
    rb.prepare(move)
    # The clean move of 5 pieces: stage (map + set-access at the shadow), copy and wait,
    # unstage, unmap the old backing, map and set-access the new one, per piece. Host
    # backing is mapped once when it is created, so a move to host does not stage the new
    # backing; for its last 2 pieces it maps the old one at the shadow instead, as the copy's
    # source (their home ranges are then remapped before their copies end), after one wait
    # for the park event. Right after a resume those 2 are still mapped there (the resume
    # kept its staging of the context's last 2 pieces): no map or set-access, one unmap each.
    # A resume from host reads the host backings at their own mappings and remaps home after
    # the same wait, without waiting for the copies.
    # A device backing is created per piece (host: taken from the pool); old device backings
    # are released later, off the move's path (not counted here).
    to_host = move.endswith("->host")
    staged = {"gpu0->host": 2, "resumed->host": 0}.get(move, 5)  # maps at the shadow: new backings, or sources
    kept = 2 if move == "resumed->host" else 0  # kept mappings read through, then dropped
    park_waits = 1 if move != "gpu0->gpu1" else 0  # before remapping home while copies run
    assert calls[sim.Op.MAP] == calls[sim.Op.SET_ACCESS] == 5 + staged, calls
    # a resume keeps 2 of its staging mappings: 2 unmaps fewer
    assert calls[sim.Op.UNMAP] == 5 + staged + kept - (2 if move == "host->gpu0" else 0), calls
    assert calls[sim.Op.COPY] == 5 and calls[sim.Op.SYNC] == 5 + park_waits, calls
    assert calls[sim.Op.CREATE] == (0 if to_host else 5), calls
    assert calls[sim.Op.RESERVE] == calls[sim.Op.FREE_VA] == 0, calls

    num_rolled_back = 0
    for op in (sim.Op.CREATE, sim.Op.MAP, sim.Op.UNMAP, sim.Op.SET_ACCESS, sim.Op.COPY, sim.Op.SYNC):
        for nth in range(calls[op]):
            state, num_failures = rb.state(), sim.failures()
            sim.fail_nth(op, nth, 1)
            if op == sim.Op.CREATE and move == "host->gpu0":
                # resume brings back what it can: a piece whose backing could not be made
                # stays on host in that round, and the next round makes it (a one-off
                # failure: the context comes home whole) ...
                result = rb.run(move)
                sim.fail_clear()
                assert sim.failures() == num_failures + 1
                assert result == aq.MoveResult(bytes_moved=16 * MiB, bytes_elsewhere=0), (nth, result)
                rb.verify()
                # ... or it stays on host, in place, counted as elsewhere (a lasting one).
                rb.prepare(move)
                sim.fail_nth(op, nth, 1000)
                result = rb.run(move)
                sim.fail_clear()
                assert result.bytes_elsewhere > 0 and aq.where("a")["host"] == result.bytes_elsewhere, (nth, result)
                assert result.bytes_moved == 16 * MiB - result.bytes_elsewhere
                rb.verify()
            else:
                with pytest.raises(aq.CoreError) as info:
                    rb.run(move)
                sim.fail_clear()
                assert sim.failures() == num_failures + 1
                num_rolled_back += 1
                message = str(info.value)
                if op == sim.Op.CREATE:
                    # Nothing moved yet: the driver's error is reported as it is.
                    assert "creating backing failed" in message and "SIM_ERR_INJECTED" in message, message
                else:
                    assert "rolled back, bytes intact" in message and "'a'" in message, message
                    assert "SIM_ERR_INJECTED" in message, message
                assert rb.state() == state, f"{op.name}[{nth}]: the failed move left a trace"
                rb.verify()
            # The same move now goes through.
            rb.run(move)
            assert aq.where("a")[rb.destination(move)] == 16 * MiB, f"{op.name}[{nth}]"
            rb.verify()
            rb.prepare(move)
    # map, unmap, set-access, copy and sync per piece, 3 calls per mapping at the shadow (an
    # unmap for a kept one; none for the 2 a resume keeps), plus, for a peer, a create per
    # piece; to host, the wait for the park event.
    assert num_rolled_back == 25 + staged * 3 + kept - (2 if move == "host->gpu0" else 0) + \
        (5 if move == "gpu0->gpu1" else 0) + park_waits


def test_two_failures_in_a_row_are_absorbed_by_the_restore_retries():
    """A call that fails twice (the failing step, then the first restore attempt)."""
    rb = Rollback()
    for op in (sim.Op.MAP, sim.Op.UNMAP, sim.Op.SET_ACCESS):
        for nth in range(7):  # a move to host makes 7 calls of each (5 pieces, the last 2 also mapped as sources)
            state = rb.state()
            sim.fail_nth(op, nth, 2)
            with pytest.raises(aq.CoreError, match="rolled back, bytes intact"):
                aq.evict("a", "host")
            sim.fail_clear()
            assert rb.state() == state, f"{op.name}[{nth}]"
            rb.verify()


def test_a_source_mapping_that_cannot_be_unmapped_never_frees_its_backing():
    """A park to host whose copy source (the old backing's second mapping) cannot be
    unmapped, nor anything after it: the move fails and no byte is lost. The old backing stays
    mapped at the shadow (leaked, as the log line says, not given back for reuse), so later
    moves of those pieces fail at their staging map and roll back, bytes intact."""
    rb = Rollback()
    # Unmaps of a 5-piece park to host: home of pieces 0-4, then the 2 source mappings.
    sim.fail_nth(sim.Op.UNMAP, 5, 1000)
    with pytest.raises(aq.CoreError, match="source unmap failed"):
        aq.evict("a", "host")
    sim.fail_clear()
    rb.verify()  # every byte readable at home
    with pytest.raises(aq.CoreError, match="rolled back, bytes intact"):
        aq.resume("a")
    rb.verify()


@pytest.mark.parametrize("num_failures", [1, 3])
def test_failed_release_of_an_old_backing_is_retried(num_failures):
    """Old device backings are released after the move commits; a release that fails is
    retried, so the device memory comes back."""
    rb = Rollback()
    assert sim.usage("gpu0") == (16 * MiB, 5)
    sim.fail_nth(sim.Op.RELEASE, 0, num_failures)
    assert aq.evict("a", "host") == 16 * MiB
    assert sim.usage("gpu0") == (0, 0), "the old gpu0 backing is still held"  # usage() flushes releases
    sim.fail_clear()
    assert sim.failures() == num_failures
    assert aq.where("a")["host"] == 16 * MiB
    rb.verify()


def test_driver_error_while_evicting_is_not_reported_as_no_room():
    Rollback()
    sim.fail_nth(sim.Op.CREATE, 0, 1)
    with pytest.raises(aq.CoreError) as info:
        aq.evict("a", "gpu1")
    assert "SIM_ERR_INJECTED" in str(info.value), str(info.value)


def test_rolled_back_move_leaves_tier_totals_alone():
    Rollback()
    host = aq.stats()["tiers"]["host"]
    sim.fail_nth(sim.Op.COPY, 0, 1)
    with pytest.raises(aq.CoreError):
        aq.evict("a", "host")
    sim.fail_clear()
    after = aq.stats()["tiers"]["host"]
    assert (after["current"], after["total"], after["peak"]) == (host["current"], host["total"], host["peak"]) == (0, 0, 0)


def test_failed_allocation_rolls_back_every_piece():
    enable_sim()
    freeze_host_pool()
    keep = alloc("keep", 0, 6 * MiB)
    data = write_pattern(keep, 6 * MiB, 1)
    pieces = [4 * MiB, 4 * MiB, 2 * MiB]  # a 10 MiB segment: 2 reservations (home, shadow), 3 pieces
    cases = [(sim.Op.RESERVE, n) for n in range(2)] + [(op, n) for op in (sim.Op.CREATE, sim.Op.MAP, sim.Op.SET_ACCESS)
                                                      for n in range(3)]
    for op, nth in cases:
        usage, num_segments, num_failures = all_usage(4), sim.segment_count(), sim.failures()
        sim.fail_nth(op, nth, 1)
        if op == sim.Op.CREATE:
            # No backing on gpu0 for that piece: it spills to a peer; the allocation succeeds.
            ptr = alloc("a", 0, 10 * MiB)
            sim.fail_clear()
            w = aq.where("a")
            assert w["gpu0"] == 10 * MiB - pieces[nth] and w["host"] == 0, (nth, w)
            assert sum(w.values()) == 10 * MiB
            sim.free(ptr)
        else:
            with pytest.raises(aq.CoreOutOfMemory) as info:
                alloc("a", 0, 10 * MiB)
            sim.fail_clear()
            message = str(info.value)
            assert "SIM_ERR_INJECTED" in message, message
            if op != sim.Op.RESERVE:
                assert "context 'a' asked for 10.0 MiB" in message and "mapping a new segment failed" in message, message
        assert sim.failures() == num_failures + 1, f"{op.name}[{nth}] was not reached"
        assert all_usage(4) == usage and sim.segment_count() == num_segments, f"{op.name}[{nth}]"
        assert sum(aq.where("a").values()) == 0
        assert_bytes(keep, data)
    assert sim.usage("gpu0") == (6 * MiB, 2)


# ==========================================================================================
# Eviction under pressure, spilling, out of memory.


def test_parked_contexts_are_evicted_least_recently_run_first():
    enable_sim()  # 4 GPUs: local budget 16 MiB, lend 8 MiB
    ptrs = {t: alloc(t, 0, 4 * MiB) for t in "abc"}
    data = {t: write_pattern(p, 4 * MiB, i) for i, (t, p) in enumerate(ptrs.items())}
    aq.park("b")
    aq.park("a")  # b was run least recently
    ptrs["d"] = alloc("d", 0, 8 * MiB)  # needs 4 MiB more than gpu0's budget has
    data["d"] = write_pattern(ptrs["d"], 8 * MiB, 9)
    assert aq.where("b")["gpu0"] == 0 and sum(aq.where("b").values()) == 4 * MiB
    assert where_mib("a") == {"gpu0": 4} and where_mib("c") == {"gpu0": 4} and where_mib("d") == {"gpu0": 8}

    ptrs["e"] = alloc("e", 0, 8 * MiB)  # a is the only parked context left with local bytes
    data["e"] = write_pattern(ptrs["e"], 8 * MiB, 10)
    assert aq.where("a")["gpu0"] == 0
    assert where_mib("c") == {"gpu0": 4} and where_mib("d") == {"gpu0": 8}, "running contexts never move"
    w = aq.where("e")
    assert w["gpu0"] == 4 * MiB and w["host"] == 0 and sum(w.values()) == 8 * MiB  # the rest spilled to a peer
    own = aq.stats()["tiers"]["gpu0"]
    assert own["current"] - own["lent"] == 16 * MiB == own["budget"]
    for t, p in ptrs.items():
        assert_bytes(p, data[t], t)
    # b comes home only by evicting a parked context: none has local bytes now, so it stays out.
    result = aq.resume("b")
    assert result == aq.MoveResult(bytes_moved=0, bytes_elsewhere=4 * MiB)
    assert_bytes(ptrs["b"], data["b"], "b")


def test_room_for_a_running_context_is_made_even_when_the_host_pool_is_empty():
    """A new piece of a running context goes home by evicting a parked one, whose host backing
    is created when the pinned pool has none idle (a burst of prefills outruns its top-up);
    the running context is never the one spilled. The victim leaves whole (up to the eviction
    batch), not one piece per allocation."""
    enable_sim(lend=0, host_reserve=0)  # no peer tier; no pinned host backing made ahead
    freeze_host_pool()
    assert aq.stats()["tiers"]["host"]["pool_total"] == 0
    a = alloc("a", 0, 12 * MiB)
    data_a = write_pattern(a, 12 * MiB, 1)
    aq.park("a")
    b = alloc("b", 0, 8 * MiB)  # 4 MiB over gpu0's 16 MiB budget: a must make the room
    data_b = write_pattern(b, 8 * MiB, 2)
    assert where_mib("b") == {"gpu0": 8}, "the running context's new bytes stay home"
    assert where_mib("a") == {"host": 12}, "the parked victim left whole, to host backing made for it"
    assert_bytes(a, data_a, "a")
    assert_bytes(b, data_b, "b")
    aq.release("b")
    sim.free(b)
    aq.resume("a")
    assert where_mib("a") == {"gpu0": 12}
    assert_bytes(a, data_a, "a")


def test_running_contexts_are_never_evicted_and_allocations_spill_peer_then_host():
    enable_sim()  # 4 GPUs: local budget 16 MiB, lend 8 MiB each (24 MiB lendable), host 64 MiB
    a = alloc("a", 0, 16 * MiB)
    data_a = write_pattern(a, 16 * MiB, 1)
    b = alloc("b", 0, 8 * MiB)  # gpu0's budget is full of a running context: to peers
    wb = aq.where("b")
    assert wb["gpu0"] == 0 and wb["host"] == 0 and sum(wb.values()) == 8 * MiB, wb
    assert all(wb[f"gpu{d}"] <= 8 * MiB for d in (1, 2, 3))
    c = alloc("c", 0, 16 * MiB)  # exactly the lendable bytes left on the peers
    wc = aq.where("c")
    assert wc["gpu0"] == 0 and wc["host"] == 0 and sum(wc.values()) == 16 * MiB, wc
    for d in (1, 2, 3):
        assert aq.stats()["tiers"][f"gpu{d}"]["lent"] == 8 * MiB
    d = alloc("d", 0, 10 * MiB)  # every peer lends all it may: host
    assert where_mib("d") == {"host": 10}
    assert where_mib("a") == {"gpu0": 16}, "a running context is never evicted"
    assert_bytes(a, data_a)
    for ptr in (b, c, d):
        sim.free(ptr)
    sim.free(a)
    assert sim.segment_count() == 0


def test_out_of_memory_names_every_tier_and_changes_nothing():
    # Host: budget 16 MiB; the pool holds 14 MiB made ahead (2 + 4 + 4 + 4).
    enable_sim(host_budget=16 * MiB, host_reserve=16 * MiB)
    freeze_host_pool()
    a = alloc("a", 0, 16 * MiB)   # gpu0's local budget
    data = write_pattern(a, 16 * MiB, 3)
    alloc("b", 0, 24 * MiB)       # every peer lends its 8 MiB
    alloc("c", 0, 14 * MiB)       # the host pool
    assert where_mib("a") == {"gpu0": 16} and where_mib("c") == {"host": 14}
    w_before = {t: aq.where(t) for t in "abc"}
    usage, num_segments = all_usage(4), sim.segment_count()
    with pytest.raises(aq.CoreOutOfMemory) as info:
        alloc("d", 0, 8 * MiB)    # a 4 MiB piece fits nowhere (2 MiB of host budget left)
    message = str(info.value)
    assert "out of memory: context 'd' asked for 8.0 MiB: no tier has room for 4.0 MiB" in message, message
    for tier in tiers(4):
        assert f"{tier}:" in message, f"{tier} missing from: {message}"
    assert "gpu0: own 16.0 MiB of budget 16.0 MiB" in message and "budget 16.0 MiB" in message, message
    assert {t: aq.where(t) for t in "abc"} == w_before
    assert sum(aq.where("d").values()) == 0
    assert all_usage(4) == usage and sim.segment_count() == num_segments
    assert_bytes(a, data)
    # 2 MiB still fit (the host may make backing for a new allocation, within its budget).
    alloc("d", 0, 2 * MiB)
    assert where_mib("d") == {"host": 2}
    with pytest.raises(aq.CoreOutOfMemory, match="no tier has room for 2.0 MiB"):
        alloc("d", 0, 2 * MiB)


# ==========================================================================================
# Peer access.


def test_gpu_without_peer_access_never_lends():
    # gpu2 and the others cannot map each other's memory.
    matrix = [[i == j or 2 not in (i, j) for j in range(4)] for i in range(4)]
    enable_sim(sim_peer_access=matrix, local_budget=8 * MiB, lend=8 * MiB, host_budget=128 * MiB,
               host_reserve=128 * MiB)
    ptrs = {}
    for i in range(6):
        tag = f"c{i}"
        ptrs[tag] = alloc(tag, 0, 8 * MiB)
        aq.park(tag)
        aq.evict(tag, "auto")
    ptrs["on2"] = alloc("on2", 2, 12 * MiB)  # gpu2's own context spills only to host
    assert where_mib("on2") == {"gpu2": 8, "host": 4}
    for tag in ptrs:
        assert aq.where(tag)["gpu2"] == (8 * MiB if tag == "on2" else 0), tag
    assert aq.stats()["tiers"]["gpu2"]["lent"] == 0
    assert sum(aq.stats()["tiers"][f"gpu{d}"]["lent"] for d in (1, 3)) == 16 * MiB

    w = aq.where("c0")
    with pytest.raises(aq.CoreError) as info:
        aq.evict("c0", "gpu2")
    assert "gpu0 may not use gpu2" in str(info.value) and "no peer access" in str(info.value), str(info.value)
    with pytest.raises(aq.CoreError, match="gpu2 may not use gpu1"):
        aq.evict("on2", "gpu1")
    assert aq.where("c0") == w
    lib = _native.lib()
    assert lib.aqua_set_peer_rank(0, 2, 0) == _native.Status.INVALID
    assert "gpu0 cannot access gpu2" in _native.last_error()


# ==========================================================================================
# Threads.


def test_threads_allocate_move_and_verify_at_once():
    enable_sim(sim_devices=4, sim_device_bytes=96 * MiB, local_budget=16 * MiB, lend=12 * MiB,
               host_budget=96 * MiB, host_reserve=96 * MiB)
    num_threads, steps = 4, 120
    expected: dict[int, dict[int, tuple[str, bytes]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(num_threads)

    def worker(k: int) -> None:
        rng = random.Random(100 + k)
        mine: dict[int, tuple[str, bytes]] = {}
        tags = {f"t{k}-{j}": (k + j) % 4 for j in range(2)}  # two contexts on shared GPUs
        running = set(tags)
        try:
            for tag, device in tags.items():
                with aq.context(tag, device=device):
                    pass
            start.wait()
            for _ in range(steps):
                tag = rng.choice(list(tags))
                r = rng.random()
                if r < 0.3 and sum(len(d) for _, d in mine.values()) < 24 * MiB:
                    size = rng.choice([2, 4, 6, 10]) * MiB
                    try:
                        ptr = alloc(tag, tags[tag], size)
                    except aq.CoreOutOfMemory:
                        continue
                    data = rng.randbytes(size)
                    sim.write(ptr, data)
                    mine[ptr] = (tag, data)
                    running.add(tag)
                elif r < 0.5:
                    try:
                        aq.evict(tag, rng.choice(["host", "auto", f"gpu{(tags[tag] + 1) % 4}"]))
                    except aq.CoreOutOfMemory:
                        pass
                    running.discard(tag)
                elif r < 0.6:
                    aq.park(tag)
                    running.discard(tag)
                elif r < 0.85:
                    result = aq.resume(tag)
                    running.add(tag)
                    w = aq.where(tag)
                    assert result.bytes_elsewhere == sum(w.values()) - w[f"gpu{tags[tag]}"]
                elif mine:
                    ptr = rng.choice(list(mine))
                    if mine[ptr][0] in running:
                        sim.free(ptr)
                        del mine[ptr]
                # Bytes of running contexts are safe to read: only parked ones are moved by others.
                for ptr, (t, data) in mine.items():
                    if t in running:
                        assert_bytes(ptr, data, t)
                    total = sum(len(d) for tt, d in mine.values() if tt == t)
                    assert sum(aq.where(t).values()) == total
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
        expected[k] = mine

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    live = {ptr: v for mine in expected.values() for ptr, v in mine.items()}
    assert sim.segment_count() == len(live)
    for ptr, (tag, data) in live.items():
        assert_bytes(ptr, data, tag)
    st = aq.stats()
    assert sum(t["current"] for t in st["tiers"].values()) == sum(len(d) for _, d in live.values())
    for d in range(4):
        t = st["tiers"][f"gpu{d}"]
        assert t["current"] - t["lent"] <= t["budget"] and t["lent"] <= t["lend_budget"]
    assert sum(t["bytes_in"] for t in st["tiers"].values()) > 0
    for ptr in live:
        sim.free(ptr)
    assert sim.segment_count() == 0
    for d in range(4):
        assert sim.usage(d) == (0, 0)


# ==========================================================================================
# Bad input: a clear error naming what was wrong, and nothing lost.


def test_operations_before_enable_say_so():
    for call in (lambda: aq.park("x"), lambda: aq.resume("x"), lambda: aq.evict("x", "host"),
                 lambda: aq.where("x"), lambda: aq.release("x"), aq.stats, aq.contexts,
                 lambda: sim.malloc(MiB), lambda: sim.free(0x1000), aq.disable):
        with pytest.raises(aq.ContextError, match="not enabled"):
            call()
    with pytest.raises(aq.ContextError, match="not enabled"):
        with aq.context("x"):
            pass
    out = ctypes.c_int()
    assert _native.lib().aqua_context_create(0, b"x", ctypes.byref(out)) == _native.Status.STATE
    assert "not initialized" in _native.last_error()
    assert _native.lib().aqua_malloc(MiB, 0, None) is None


@dataclasses.dataclass
class TwoContexts:
    a: int         # 'a' on gpu0: 10 MiB
    b: int         # 'b' on gpu1: 6 MiB
    data: dict[int, bytes]
    state: tuple

    def intact(self) -> None:
        for ptr, d in self.data.items():
            assert_bytes(ptr, d)
        assert self.snapshot() == self.state

    @staticmethod
    def snapshot() -> tuple:
        return {t: aq.where(t) for t in ("a", "b")}, sim.segment_count(), all_usage(4)


@pytest.fixture
def two():
    enable_sim()
    freeze_host_pool()
    a = alloc("a", 0, 10 * MiB)
    b = alloc("b", 1, 6 * MiB)
    data = {a: write_pattern(a, 10 * MiB, 1), b: write_pattern(b, 6 * MiB, 2)}
    return TwoContexts(a, b, data, TwoContexts.snapshot())


def test_unknown_tag(two):
    for call in (aq.park, aq.resume, aq.where, aq.release, lambda t: aq.evict(t, "host")):
        with pytest.raises(aq.ContextError, match="no context 'nope'"):
            call("nope")
    two.intact()


def test_release_twice(two):
    a = two.a
    aq.release("a")
    with pytest.raises(aq.ContextError, match=r"no context 'a' \(unknown, or already released\)"):
        aq.release("a")
    assert aq.contexts() == ["b"]
    assert sim.segment_count() == 2  # a's segment lives on until it is freed
    sim.free(a)
    assert sim.segment_count() == 1 and aq.stats()["num_contexts"] == 1
    # The core refuses a second release of the same id, naming it.
    assert _native.lib().aqua_context_release(1) == _native.Status.NOT_FOUND
    assert "no live context with id 1" in _native.last_error()


def test_context_on_unknown_device(two):
    with pytest.raises(ValueError, match=r"device=9: no such GPU \(4 devices\)"):
        with aq.context("x", device=9):
            pass
    with pytest.raises(ValueError, match="device='tpu:0'"):
        with aq.context("x", device="tpu:0"):
            pass
    with pytest.raises(aq.ContextError, match="context 'a' lives on GPU 0, not on 1"):
        with aq.context("a", device=1):
            pass
    assert "x" not in aq.contexts()
    out = ctypes.c_int()
    assert _native.lib().aqua_context_create(7, b"x", ctypes.byref(out)) == _native.Status.INVALID
    assert "context: unknown device 7 (4 devices)" in _native.last_error()
    two.intact()


def test_evict_to_unknown_tier_or_own_device(two):
    with pytest.raises(ValueError, match=r"^tier='gpu9': no such GPU; this process has 4 GPUs: expected 'host', "
                                         r"'auto', 'gpu0'..'gpu3' or a device ordinal 0..3$"):
        aq.evict("a", "gpu9")
    with pytest.raises(ValueError, match="tier='disk': expected 'host', 'auto', 'gpu0'..'gpu3'"):
        aq.evict("a", "disk")
    with pytest.raises(aq.CoreError, match="gpu0 is the context's own device; use resume"):
        aq.evict("a", "gpu0")
    moved = ctypes.c_uint64()
    assert _native.lib().aqua_evict(1, 42, 0, ctypes.byref(moved)) == _native.Status.INVALID
    assert "evict: unknown tier 42" in _native.last_error()
    assert _native.lib().aqua_evict(99, -1, 0, ctypes.byref(moved)) == _native.Status.NOT_FOUND
    assert "evict: no live context with id 99" in _native.last_error()
    two.intact()


def test_refused_evict_leaves_the_context_running():
    enable_sim()
    a = alloc("a", 0, 16 * MiB)
    with pytest.raises(aq.CoreError, match="own device"):
        aq.evict("a", "gpu0")
    alloc("b", 0, 4 * MiB)  # a running context is never evicted to make room
    assert where_mib("a") == {"gpu0": 16}
    del a


def test_free_of_unknown_pointer(two, capfd):
    capfd.readouterr()
    sim.free(two.a + 4096)        # inside a segment, not its start
    sim.free(0xDEAD0000)          # nothing at all
    sim.free(0)                   # null: ignored silently
    err = capfd.readouterr().err
    assert err.count("is not a segment of aqua_alloc; ignored") == 2, err
    assert f"{two.a + 4096:#x}" in err, err
    two.intact()
    sim.free(two.b)
    capfd.readouterr()
    sim.free(two.b)               # twice
    assert "is not a segment of aqua_alloc; ignored" in capfd.readouterr().err
    assert sim.segment_count() == 1
    assert_bytes(two.a, two.data[two.a])
    assert aq.where("a")["gpu0"] == 10 * MiB and sum(aq.where("b").values()) == 0


def test_enable_errors_name_the_setting():
    with pytest.raises(aq.ConfigError, match=r"sim_peer_access: expected a 4x4 matrix, got 2 rows"):
        enable_sim(sim_peer_access=[[True, True], [True, True]])
    assert not aq.is_enabled()
    with pytest.raises(aq.ConfigError, match="AQUA_LOCAL_BUDGET: unknown GPU 7"):
        enable_sim(local_budget={7: MiB})
    assert not aq.is_enabled() and _native.lib().aqua_backend() == _native.Backend.NONE
    enable_sim()
    with pytest.raises(aq.ContextError, match="already enabled"):
        enable_sim(local_budget=MiB)


def test_enable_after_disable_with_segments_freed_later():
    enable_sim()
    ptr = alloc("a", 0, 4 * MiB)
    aq.disable()
    _native.lib().aqua_free(ptr, 0, 0, None)  # torch frees the tensor later
    enable_sim()
    assert aq.is_enabled()


def test_lowered_host_budget_is_enforced_on_the_next_move():
    enable_sim(host_budget=64 * MiB, host_reserve=64 * MiB)
    alloc("a", 0, 8 * MiB)
    _native.check(_native.lib().aqua_set_host_budget(4 * MiB), "lowering the host budget")
    with pytest.raises(aq.CoreOutOfMemory):
        aq.evict("a", "host")
    host = aq.stats()["tiers"]["host"]
    assert host["current"] <= host["budget"]


# ==========================================================================================
# Events.


def test_moves_are_recorded_as_events():
    enable_sim()
    freeze_host_pool()
    alloc("a", 0, 6 * MiB)
    alloc("b", 1, 2 * MiB)
    drain_core_events()
    aq.evict("a", "host")
    aq.resume("a")
    aq.evict("a", "gpu2")
    events = [e for e in drain_core_events() if e.kind.value.startswith("move_")]
    got = [(e.kind.value, e.context, e.src, e.dst, e.bytes, e.status) for e in events]
    six = 6 * MiB
    assert got == [
        ("move_start", "a", "gpu0", "host", six, 0), ("move_end", "a", "gpu0", "host", six, 0),
        ("move_start", "a", "host", "gpu0", six, 0), ("move_end", "a", "host", "gpu0", six, 0),
        ("move_start", "a", "gpu0", "gpu2", six, 0), ("move_end", "a", "gpu0", "gpu2", six, 0),
    ]
    for start, end in zip(events[::2], events[1::2]):
        assert end.dur_ns > 0 and end.t_ns == start.t_ns  # an end carries its move's start time
    st = aq.stats()
    assert st["num_moves"] == 3 and st["bytes_moved"] == 3 * six

    sim.fail_nth(sim.Op.COPY, 0, 1)
    with pytest.raises(aq.CoreError):
        aq.resume("a")
    sim.fail_clear()
    kinds = [(e.kind.value, e.status) for e in drain_core_events() if e.kind.value.startswith("move_")]
    assert kinds == [("move_start", 0), ("move_failed", _native.Status.DRIVER.value)] or \
        kinds[0] == ("move_start", 0) and kinds[1][0] == "move_failed" and kinds[1][1] != 0, kinds


def evicted_to_host(seed: int) -> tuple[int, bytes]:
    """Context 'a' of 16 MiB (4 pieces of 4 MiB) of random bytes, parked and evicted to host
    (2 GPUs, host pool frozen). Returns its pointer and bytes."""
    enable_sim(sim_devices=2, sim_device_bytes=128 * MiB, local_budget=64 * MiB, lend=64 * MiB,
               host_budget=128 * MiB, host_reserve=64 * MiB)
    freeze_host_pool()
    ptr = alloc("a", 0, 16 * MiB)
    data = write_pattern(ptr, 16 * MiB, seed)
    aq.park("a")
    aq.evict("a", "host")
    return ptr, data


def test_a_resume_keeps_the_staging_of_the_last_pieces_for_the_next_park():
    # A park to host reads its last 2 pieces through a second mapping at the shadow; the
    # resume before it staged them there already, and keeps those 2 mappings: the park then
    # maps nothing before its copies (on a GPU, about 0.03 ms per mapping, before the first
    # copy can start).
    ptr, data = evicted_to_host(seed=11)
    assert sim.usage("gpu0") == (0, 0)
    aq.resume("a")
    assert sim.usage("gpu0") == (16 * MiB, 4 + 2)  # home, and the last 2 pieces at the shadow
    aq.park("a")
    before = count_ops()
    aq.evict("a", "host")
    calls = {op: n - before[op] for op, n in count_ops().items()}
    assert calls[sim.Op.MAP] == calls[sim.Op.SET_ACCESS] == 4, calls  # host backings at home only
    assert calls[sim.Op.UNMAP] == 4 + 2, calls  # home, then the 2 kept mappings after their copies
    assert sim.usage("gpu0") == (0, 0)
    assert_bytes(ptr, data)
    # a move that does not read through them drops them first (the shadow stages a peer)
    aq.resume("a")
    aq.park("a")
    aq.evict("a", "gpu1")
    assert sim.usage("gpu0") == (0, 0) and sim.usage("gpu1") == (16 * MiB, 4)
    assert_bytes(ptr, data)
    # and a free unmaps them with the rest
    aq.resume("a")
    assert sim.usage("gpu0") == (16 * MiB, 4 + 2)
    sim.free(ptr)
    assert sim.usage("gpu0") == (0, 0)


def test_a_resume_from_host_remaps_home_before_its_copies_end():
    # The first wait for a copy fails: by then all 4 pieces are mapped at home on their new
    # device backings (the copies read the host backings at their own mappings), and the
    # rollback maps the 4 host backings back. A remap that waited for its copy would have
    # made 1 home map by then, not 4.
    ptr, data = evicted_to_host(seed=12)
    maps = sim.op_count(sim.Op.MAP)
    sim.fail_nth(sim.Op.SYNC, 1, 1)  # [0]: the park event; [1]: the first copy
    with pytest.raises(aq.CoreError, match="waiting for the copy failed.*rolled back, bytes intact"):
        aq.resume("a")
    sim.fail_clear()
    assert sim.op_count(sim.Op.MAP) - maps == 4 + 4 + 4  # staging, home, home again (rollback)
    assert aq.where("a")["host"] == 16 * MiB and sim.usage("gpu0") == (0, 0)
    assert_bytes(ptr, data)
    aq.resume("a")
    assert aq.where("a")["gpu0"] == 16 * MiB
    assert_bytes(ptr, data)


def test_move_spans_are_the_profile_totals_call_by_call():
    enable_sim()
    freeze_host_pool()
    alloc("a", 0, 10 * MiB)  # pieces of 4, 4 and 2 MiB
    aq.allocator.move_profile(reset=True)
    assert aq.allocator.move_spans(record=True) == []  # nothing recorded while off
    before = time.monotonic_ns()
    aq.evict("a", "host")
    aq.resume("a")
    after = time.monotonic_ns()
    spans = aq.allocator.move_spans(record=False)
    totals = aq.allocator.move_profile()
    for phase, stat in totals.items():
        mine = [t1 - t0 for p, t0, t1 in spans if p == phase]
        assert len(mine) == stat["calls"] and sum(mine) / 1e6 == stat["ms"], phase
    assert {p for p, _, _ in spans} == set(_native.PHASES)
    assert all(before <= t0 <= t1 <= after for _, t0, t1 in spans)  # the same clock as Python's
    assert [t0 for _, t0, _ in spans] == sorted(t0 for _, t0, _ in spans)  # in the order they began
    aq.evict("a", "host")
    assert aq.allocator.move_spans() == []  # stopped


def test_tiny_event_ring_drops_and_counts():
    def scenario(capacity: int) -> tuple[int, int]:
        enable_sim(trace_events=capacity)
        freeze_host_pool()
        for i in range(3):
            alloc(f"c{i}", 0, 6 * MiB)
            aq.evict(f"c{i}", "host")
            aq.resume(f"c{i}")
        events = drain_core_events()
        dropped = num_core_events_dropped()
        for i in range(3):
            aq.release(f"c{i}")
        reset_aqua()
        return len(events), dropped

    num_all, dropped_none = scenario(1 << 16)
    assert dropped_none == 0 and num_all > 4
    num_kept, dropped = scenario(4)
    assert num_kept == 4
    assert dropped == num_all - 4  # each event is either kept or counted as dropped


# ==========================================================================================
# Known bugs (core.cpp): a backing whose unmap failed is given back while still mapped.


def test_rollback_that_cannot_unmap_never_shares_the_backing():
    enable_sim(sim_devices=2, sim_device_bytes=128 * MiB, local_budget=64 * MiB, lend=64 * MiB,
               host_budget=64 * MiB, host_reserve=16 * MiB)
    freeze_host_pool()
    a = alloc("a", 0, 8 * MiB)  # pieces of 4 MiB: calls of the move to gpu1 per op, in order:
    data = write_pattern(a, 8 * MiB, 1)  # MAP shadow0, shadow1, home0, home1; UNMAP shadow0, home0, shadow1, home1
    aq.park("a")
    flush_releases()
    sim.fail_nth(sim.Op.MAP, 3, 1)     # piece 1 cannot be mapped at home: roll back piece 0 (committed)...
    sim.fail_nth(sim.Op.UNMAP, 4, 4)   # ...whose new backing then cannot be unmapped (4 attempts)
    with pytest.raises(aq.CoreError, match="rolled back"):
        aq.evict("a", "gpu1")
    sim.fail_clear()
    assert_bytes(a, data, "a")         # home still maps the new backing, with the bytes
    b = alloc("b", 1, 8 * MiB)         # gpu1 backings of 4 MiB given back a moment ago are reused
    sim.write(b, b"\xaa" * 8 * MiB)
    assert_bytes(a, data, "a after b wrote its own segment")


def test_transient_unmap_failure_while_freeing_does_not_leak():
    enable_sim()
    freeze_host_pool()
    a = alloc("a", 0, 4 * MiB)
    sim.fail_nth(sim.Op.UNMAP, 0, 1)
    sim.free(a)
    sim.fail_clear()
    assert sim.segment_count() == 0
    assert sim.usage("gpu0") == (0, 0)


def test_refused_evict_for_want_of_room_leaves_the_context_running():
    # Regression (review): a refused evict left the context parked, so another context's
    # allocation then moved it while it ran.
    enable_sim(sim_devices=2, sim_device_bytes=64 * MiB, sim_host_bytes=256 * MiB, local_budget=16 * MiB,
               lend=8 * MiB, host_budget=4 * MiB, host_reserve=4 * MiB)
    a = alloc("a", 0, 8 * MiB)
    data = write_pattern(a, 8 * MiB, 7)
    with pytest.raises(aq.CoreOutOfMemory, match="host has no room"):
        aq.evict("a", "host")
    assert where_mib("a") == {"gpu0": 8}
    alloc("b", 0, 16 * MiB)  # spills to the peer: a running context is not evicted to make room
    assert where_mib("b") == {"gpu0": 8, "gpu1": 8}
    assert where_mib("a") == {"gpu0": 8}
    assert_bytes(a, data, "a")


def test_where_without_waiting_answers_now_or_says_it_cannot():
    enable_sim()
    ptr = alloc("a", 0, 8 * MiB)
    aq.evict("a", "host")
    assert aq.where("a", wait=False) == aq.where("a")
    assert aq.where("a")["host"] == 8 * MiB
    # Another thread inside aqua_alloc (here: holding its lock, as a move does): None at once.
    from aqua_alloc.memory import allocator  # noqa: PLC0415

    held, release = threading.Event(), threading.Event()

    def hold():
        with allocator._lock:
            held.set()
            release.wait(10)
    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        t0 = time.monotonic()
        assert aq.where("a", wait=False) is None
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()
        holder.join()
    assert aq.where("a", wait=False)["host"] == 8 * MiB
    with pytest.raises(TypeError, match="context tag"):
        aq.where(ptr, wait=False)
    with pytest.raises(aq.ContextError, match="no context 'nope'"):
        aq.where("nope", wait=False)
