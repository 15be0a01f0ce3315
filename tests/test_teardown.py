"""Teardown: a process with contexts on every tier ends cleanly however it ends, and
disable() with live contexts brings them home or refuses, saying why.

Out of process (the simulated backend in a subprocess, with bytes on the local GPU, on a
peer GPU, on host, and one context split over the three): a normal exit, an unhandled
exception, SIGTERM while idle, SIGTERM while threads are moving contexts, SIGTERM turned
into SystemExit by a handler, and an exit while daemon threads are still moving. Each must
end within its timeout (no hang) with the expected status and nothing on stderr but what
the script itself wrote (no crash, no "[aqua_alloc]" complaint). The simulated arenas are
memfds and die with the process, so what lies outside it cannot be checked; what can be,
is: with AQUA_TRACE set, the trace written at exit is valid and holds the moves.

In process: disable() with contexts on every tier.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import aqua_alloc as aq
import aqua_alloc.memory.sim as sim
from aqua_alloc.memory import native as _native
from aqua_alloc.obs import trace_reader
from conftest import reset_aqua

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
TIMEOUT_S = 60

# Contexts on every tier: 'local' on gpu0, 'peer' (of gpu0) on gpu1, 'host' (of gpu1) on
# host, 'split' (of gpu2): 16 MiB local, the rest spilled to peers and host.
CHILD = textwrap.dedent("""
    import os, random, signal, sys, threading, time
    import aqua_alloc as aq, aqua_alloc.memory.sim as sim
    MiB = 1 << 20
    mode = sys.argv[1]
    aq.enable(backend="sim", sim_devices=4, sim_device_bytes=64 * MiB, sim_host_bytes=256 * MiB, chunk=4 * MiB,
              local_budget=16 * MiB, lend=8 * MiB, host_budget=96 * MiB, host_reserve=64 * MiB, trace_events=65536)
    ptrs = {}
    for tag, device, nbytes, tier in [("local", 0, 8, None), ("peer", 0, 8, "gpu1"), ("host", 1, 8, "host"),
                                      ("split", 2, 40, None)]:
        with aq.context(tag, device=device):
            ptrs[tag] = sim.malloc(nbytes * MiB, device=device)
        sim.write(ptrs[tag], bytes([len(tag)]) * (nbytes * MiB))
        if tier:
            aq.evict(tag, tier)
    where = {t: {k: v // MiB for k, v in aq.where(t).items() if v} for t in aq.contexts()}
    assert where["local"] == {"gpu0": 8} and where["peer"] == {"gpu1": 8} and where["host"] == {"host": 8}, where
    assert where["split"]["gpu2"] == 16 and where["split"]["host"] > 0 and len(where["split"]) >= 3, where
    print("where", where, flush=True)

    def mover(seed, stop):
        rng = random.Random(seed)
        while not stop.is_set():
            tag = rng.choice(["local", "peer", "host"])
            try:
                aq.evict(tag, rng.choice(["host", "auto", "gpu3"]))
                aq.resume(tag)
            except aq.CoreError:
                pass

    if mode == "exit":
        sys.exit(0)
    if mode == "exception":
        raise RuntimeError("boom")
    if mode == "disable":
        sim.free(ptrs.pop("split"))  # the rest fits at home
        aq.disable()
        assert not aq.is_enabled()
        assert all(sim.read(p, 4) == bytes([len(t)]) * 4 for t, p in ptrs.items())
        print("disabled", flush=True)
        sys.exit(0)
    if mode == "threads-at-exit":
        stop = threading.Event()
        for k in range(3):
            threading.Thread(target=mover, args=(k, stop), daemon=True).start()
        time.sleep(0.3)
        sys.exit(0)  # daemon threads are still moving
    if mode == "sigterm-handled":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if mode.startswith("sigterm"):
        stop = threading.Event()
        if mode != "sigterm-idle":
            for k in range(3):
                threading.Thread(target=mover, args=(k, stop), daemon=True).start()
        print("ready", flush=True)
        while True:
            time.sleep(0.01)
    raise SystemExit(f"unknown mode {mode}")
""")


def child_env(tmp_path: Path, trace_path: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUA_")}
    env["PYTHONPATH"] = str(REPO)
    if trace_path:
        env["AQUA_TRACE"] = str(trace_path)
    return env


def start_child(tmp_path: Path, mode: str, trace_path: Path | None = None) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), mode], env=child_env(tmp_path, trace_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the process hung (killed after {TIMEOUT_S} s); stderr:\n{err[-3000:]}")


def assert_clean_stderr(err: str, allowed: tuple[str, ...] = ()) -> None:
    """Nothing on stderr but the lines expected (the user's traceback, our trace line)."""
    for bad in ("Segmentation fault", "Fatal Python error", "terminate called", "Aborted", "core dumped",
                "[aqua_alloc]" if not allowed else "\0"):
        assert bad not in err, f"unexpected {bad!r} on stderr:\n{err[-3000:]}"
    unexpected = [line for line in err.splitlines() if not any(a in line for a in allowed)]
    assert not unexpected, "unexpected stderr:\n" + "\n".join(unexpected[:30])


def assert_trace_has_the_contexts(path: Path) -> None:
    back = trace_reader.read_trace(path)  # valid, or TraceFormatError
    tags = {e.context for e in back.events}
    assert {"local", "peer", "host", "split"} <= tags, tags
    assert any(e.kind.value == "move_end" and e.context == "peer" and e.dst == "gpu1" for e in back.events)


# ==========================================================================================
# Out of process.


def test_normal_exit_with_contexts_on_every_tier(tmp_path):
    out_trace = tmp_path / "exit.json"
    proc = start_child(tmp_path, "exit", out_trace)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert out.startswith("where "), out
    assert_clean_stderr(err, allowed=(f"[aqua_alloc] trace written to {out_trace} at exit",))
    assert err.count("trace written") == 1, err
    assert_trace_has_the_contexts(out_trace)


def test_unhandled_exception_with_contexts_on_every_tier(tmp_path):
    out_trace = tmp_path / "crash.json"
    proc = start_child(tmp_path, "exception", out_trace)
    out, err = finish(proc)
    assert proc.returncode == 1, err
    lines = err.splitlines()  # the user's traceback, then our one line
    assert lines[-2] == "RuntimeError: boom", err
    assert lines[-1].startswith(f"[aqua_alloc] trace written to {out_trace} at unhandled exception"), err
    traceback_lines = err[err.index("Traceback (most recent call last):"):err.index("RuntimeError: boom")]
    assert "aqua_alloc" not in traceback_lines, err           # raised by the script, not by us
    assert_clean_stderr(err, allowed=("Traceback", "  File", "    ", "RuntimeError: boom", "^^^",
                                      f"[aqua_alloc] trace written to {out_trace} at unhandled exception"))
    assert_trace_has_the_contexts(out_trace)


def test_disable_then_exit(tmp_path):
    proc = start_child(tmp_path, "disable")
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "disabled", out
    assert_clean_stderr(err)


@pytest.mark.parametrize("repeat", range(3))
def test_exit_while_daemon_threads_are_moving(tmp_path, repeat):
    proc = start_child(tmp_path, "threads-at-exit")
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert_clean_stderr(err)


@pytest.mark.parametrize("mode", ["sigterm-idle", "sigterm-moving", "sigterm-moving", "sigterm-moving"])
def test_sigterm(tmp_path, mode):
    proc = start_child(tmp_path, mode)
    deadline = time.monotonic() + TIMEOUT_S
    line = ""
    while "ready" not in line and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
    assert "ready" in line, f"the child did not start: {proc.communicate()[1][-3000:]}"
    time.sleep(0.3)  # let the movers move
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err)
    assert time.monotonic() - t0 < 10, "SIGTERM took more than 10 s to end the process"
    assert_clean_stderr(err)


def test_sigterm_handled_as_exit_writes_the_trace(tmp_path):
    out_trace = tmp_path / "term.json"
    proc = start_child(tmp_path, "sigterm-handled", out_trace)
    line = ""
    while "ready" not in line and proc.poll() is None:
        line = proc.stdout.readline()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 143, (proc.returncode, err)
    assert_clean_stderr(err, allowed=(f"[aqua_alloc] trace written to {out_trace} at exit",))
    assert_trace_has_the_contexts(out_trace)


# ==========================================================================================
# In process: disable() with live contexts.


SETTINGS = dict(backend="sim", sim_devices=4, sim_device_bytes=64 * MiB, sim_host_bytes=256 * MiB, chunk=4 * MiB,
                local_budget=16 * MiB, lend=8 * MiB, host_budget=64 * MiB, host_reserve=32 * MiB, trace_events=4096)


pytestmark = pytest.mark.usefixtures("fresh_core")  # a torn-down core before and after each test


def alloc(tag: str, device: int, nbytes: int, fill: int) -> int:
    with aq.context(tag, device=device):
        ptr = sim.malloc(nbytes, device=device)
    sim.write(ptr, bytes([fill]) * nbytes)
    return ptr


def intact(ptr: int, nbytes: int, fill: int) -> bool:
    return sim.read(ptr, nbytes) == bytes([fill]) * nbytes


def core_usage(tier: int) -> tuple[int, int]:
    """sim usage through the C ABI: works after disable() while the core still serves frees."""
    nbytes, nmaps = ctypes.c_uint64(), ctypes.c_uint64()
    _native.check(_native.lib().aqua_flush_releases(), "flush")
    _native.check(_native.lib().aqua_sim_usage(tier, ctypes.byref(nbytes), ctypes.byref(nmaps)), "usage")
    return nbytes.value, nmaps.value


def every_tier() -> dict[str, tuple[int, int, int]]:
    """'local' (gpu0), 'peer' (of gpu0, on gpu1), 'host' (of gpu1, on host): tag -> (ptr, bytes, fill)."""
    made = {"local": (0, None), "peer": (0, "gpu1"), "host": (1, "host")}
    out = {}
    for fill, (tag, (device, tier)) in enumerate(made.items(), start=1):
        ptr = alloc(tag, device, 8 * MiB, fill)
        if tier:
            aq.evict(tag, tier)
        out[tag] = (ptr, 8 * MiB, fill)
    assert {t: {k: v for k, v in aq.where(t).items() if v} for t in out} == {
        "local": {"gpu0": 8 * MiB}, "peer": {"gpu1": 8 * MiB}, "host": {"host": 8 * MiB}}
    return out


def test_disable_brings_every_context_home_and_keeps_serving_its_tensors():
    aq.enable(**SETTINGS)
    segs = every_tier()
    aq.disable()
    assert not aq.is_enabled()
    for tag, (ptr, n, fill) in segs.items():
        assert intact(ptr, n, fill), f"{tag}: bytes changed by disable()"
    # The core stays up for the live segments (torch frees them later), each now at home:
    # gpu0 holds 'local' and 'peer', gpu1 holds 'host'; nothing on gpu2, gpu3 or host.
    assert _native.lib().aqua_backend() == _native.Backend.SIM
    assert core_usage(0)[0] == 16 * MiB and core_usage(1)[0] == 8 * MiB
    assert core_usage(2) == core_usage(3) == (0, 0)
    num_segments = ctypes.c_int()
    _native.lib().aqua_segment_count(ctypes.byref(num_segments))
    assert num_segments.value == 3
    for ptr, _, _ in segs.values():
        _native.lib().aqua_free(ptr, 0, 0, None)
    assert core_usage(0) == core_usage(1) == (0, 0)
    aq.enable(**SETTINGS)  # shuts the old core down (nothing left), starts a new one
    assert aq.stats()["num_segments"] == 0 and aq.contexts() == []


def test_disable_refuses_when_a_context_cannot_come_home():
    aq.enable(**SETTINGS)
    segs = every_tier()
    big = alloc("big", 2, 24 * MiB, 9)  # gpu2's budget is 16 MiB: 8 MiB stay on peers
    wheres = {t: aq.where(t) for t in aq.contexts()}
    with pytest.raises(aq.ContextError) as info:
        aq.disable()
    message = str(info.value)
    assert "disable()" in message and "'big'" in message and "off its GPU" in message, message
    assert aq.is_enabled() and sorted(aq.contexts()) == sorted(wheres)
    for tag in wheres:
        assert sum(aq.where(tag).values()) == sum(wheres[tag].values()), tag
    for tag, (ptr, n, fill) in segs.items():
        assert intact(ptr, n, fill), tag
    assert intact(big, 24 * MiB, 9)
    # Make room and it goes through.
    sim.free(big)
    aq.disable()
    assert not aq.is_enabled()
    for tag, (ptr, n, fill) in segs.items():
        assert intact(ptr, n, fill), tag


def test_the_test_reset_keeps_every_pool_that_may_hold_a_live_block():
    """After a failed test, its tensors live on in the traceback while the fixture resets
    aqua_alloc: a context that cannot come home makes disable() refuse, and the reset drops
    the state. Every context's pool must outlive it: torch aborts when a tensor is freed
    after its MemPool was deleted (issue 18: the GPU suite aborted on two GPUs). The
    simulated backend makes no MemPool; a stand-in checks that the reset keeps it."""
    import aqua_alloc.memory.allocator as allocator

    aq.enable(**SETTINGS)
    big = alloc("big", 2, 24 * MiB, 9)  # 8 MiB stay on peers: disable() refuses
    stand_in = object()
    allocator._state.contexts["big"].pool = stand_in
    kept_before = len(allocator._keep_alive)
    reset_aqua()
    assert not aq.is_enabled()
    assert any(pool is stand_in for pool in allocator._keep_alive[kept_before:])
    del big


def test_disable_waits_for_a_pending_prefetch():
    aq.enable(**SETTINGS)
    segs = every_tier()
    future = aq.prefetch("host")
    aq.disable()
    assert future.done() and future.result().bytes_elsewhere == 0
    ptr, n, fill = segs["host"]
    assert intact(ptr, n, fill)


def test_disable_with_released_contexts_whose_tensors_live_on():
    aq.enable(**SETTINGS)
    segs = every_tier()
    for tag in list(segs):
        aq.release(tag)  # tensors still alive: the segments stay where they are
    aq.disable()
    for tag, (ptr, n, fill) in segs.items():
        assert intact(ptr, n, fill), tag
    assert core_usage(-1)[0] >= 8 * MiB  # 'host' was released on host: it stays there, intact
    for ptr, _, _ in segs.values():
        _native.lib().aqua_free(ptr, 0, 0, None)
    aq.enable(**SETTINGS)
    assert aq.stats()["num_segments"] == 0


def test_disable_twice_and_use_after_disable_say_not_enabled():
    aq.enable(**SETTINGS)
    aq.disable()
    for call in (aq.disable, aq.stats, lambda: aq.where("local"), lambda: aq.park("local")):
        with pytest.raises(aq.ContextError, match="not enabled"):
            call()


# ==========================================================================================
# A refused disable() (aqua_alloc/memory/allocator.py).


def test_refused_disable_leaves_contexts_brought_home_before_at_home():
    """As disable()'s docstring says: contexts are brought home one after the other; when
    one cannot come home, disable() is refused naming it, the ones brought home before it
    stay home and running, and nothing is released. (Undoing it is not done: bug 4.)"""
    aq.enable(**SETTINGS)
    pa = alloc("a", 1, 8 * MiB, 1)
    aq.evict("a", "host")               # parked, on host; made first, so brought home first
    pb = alloc("b", 0, 24 * MiB, 2)     # cannot all come home
    assert aq.contexts() == ["a", "b"]
    before = {t: aq.where(t) for t in aq.contexts()}
    assert before["a"] == {"gpu0": 0, "gpu1": 0, "gpu2": 0, "gpu3": 0, "host": 8 * MiB}, before
    with pytest.raises(aq.ContextError, match="'b'"):
        aq.disable()
    assert aq.is_enabled() and aq.contexts() == ["a", "b"], "nothing is released"
    after = {t: aq.where(t) for t in aq.contexts()}
    assert after["a"] == {"gpu0": 0, "gpu1": 8 * MiB, "gpu2": 0, "gpu3": 0, "host": 0}, after  # home
    assert after["b"]["gpu0"] >= before["b"]["gpu0"] and sum(after["b"].values()) == 24 * MiB, after
    assert sim.read(pa, 8 * MiB) == bytes([1]) * (8 * MiB) and sim.read(pb, 24 * MiB) == bytes([2]) * (24 * MiB)
    # 'a' is running, not parked: a new context's allocation on gpu1 cannot evict it.
    alloc("c", 1, 16 * MiB, 3)
    assert aq.where("a")["gpu1"] == 8 * MiB and aq.where("c")["gpu1"] == 8 * MiB, aq.where("c")


def test_disable_refuses_while_a_context_is_in_use():
    aq.enable(**SETTINGS)
    with aq.context("a", device=0):
        sim.malloc(2 * MiB)
        alloc("b", 1, 8 * MiB, 1)
        aq.evict("b", "host")
        with pytest.raises(aq.ContextError) as info:
            aq.disable()
        assert "'a'" in str(info.value) and "in use" in str(info.value), str(info.value)
        assert aq.is_enabled(), "disable() went through while a thread was inside `with context('a')`"
        assert aq.contexts() == ["a", "b"] and aq.where("b")["host"] == 8 * MiB, "refused before changing anything"
    aq.disable()  # out of the block: goes through
    assert not aq.is_enabled()


# ==========================================================================================
# Retired cores (csrc/api.cpp aqua_shutdown) keep nothing heavy.


def _memfds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:aqua-sim")
        except OSError:
            pass
    return count


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cycle(**overrides) -> None:
    aq.enable(**{**SETTINGS, **overrides})
    ptr = alloc("a", 0, 8 * MiB, 1)
    aq.evict("a", "host")
    aq.resume("a")
    sim.free(ptr)
    aq.release("a")
    aq.disable()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_enable_disable_cycles_close_the_simulated_arenas():
    """A retired core is kept (api.cpp g_retired) but gives its backend's arenas back: no
    memfd stays open per enable()/disable() cycle."""
    _cycle()
    before = _memfds()
    for _ in range(3):
        _cycle()
    assert _memfds() == before, f"{_memfds() - before} memfd arenas left open by 3 enable/disable cycles"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_enable_disable_cycles_give_the_event_ring_back():
    """A retired core frees its event ring (56 bytes x trace_events: 56 MiB here)."""
    _cycle(trace_events=1 << 20)
    before = _rss_bytes()
    for _ in range(4):
        _cycle(trace_events=1 << 20)
    grown = _rss_bytes() - before
    assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.0f} MiB over 4 enable/disable cycles"
