"""The simulated backend's extras: raw segments, their bytes, and failure injection.

With ``enable(backend="sim")`` the core runs over devices made of host memory (see
csrc/sim_backend.cpp), so every rule of the core (budgets, eviction, rollback, integrity)
is testable on a machine with no GPU. There is no torch pool in front: :func:`malloc` asks
the core for a segment the way PyTorch's caching allocator would (``aqua_malloc`` in the
calling thread's context), and the segment's bytes are readable and writable from Python
through its address, wherever they live.
"""

from __future__ import annotations

import ctypes

from aqua_alloc.memory import native as _native
from aqua_alloc.memory.allocator import _require, parse_tier
from aqua_alloc.memory.native import Op, TIER_HOST, check

__all__ = ["Op", "malloc", "free", "write", "read", "fail_nth", "fail_random", "fail_clear", "op_count",
           "failures", "usage", "segment_count"]


def _sim_state():
    state = _require()
    if state.backend != _native.Backend.SIM:
        raise RuntimeError("aqua_alloc.memory.sim needs enable(backend='sim')")
    return state


def malloc(size: int, device: int = 0) -> int:
    """A new segment of at least `size` bytes in this thread's context (see
    ``aqua_alloc.context``), on `device`. Returns its address; raises CoreOutOfMemory."""
    _sim_state()
    ptr = _native.lib().aqua_malloc(size, device, None)
    if not ptr:
        raise _native.CoreOutOfMemory(_native.Status.OUT_OF_MEMORY, f"aqua_malloc({size}): {_native.last_error()}")
    return ptr


def free(ptr: int) -> None:
    _sim_state()
    _native.lib().aqua_free(ptr, 0, 0, None)


def write(ptr: int, data: bytes) -> None:
    ctypes.memmove(ptr, data, len(data))


def read(ptr: int, size: int) -> bytes:
    return ctypes.string_at(ptr, size)


def fail_nth(op: Op, nth: int = 0, count: int = 1) -> None:
    """Fail the `nth` next call (0 = the very next) of driver op `op`, `count` times."""
    _sim_state()
    check(_native.lib().aqua_sim_fail_nth(int(op), nth, count), "fail_nth")


def fail_random(p: float, seed: int, ops: list[Op] | None = None) -> None:
    """Fail each call of `ops` (default: all) with probability `p`, seeded."""
    _sim_state()
    mask = sum(1 << int(op) for op in (ops if ops is not None else list(Op)))
    check(_native.lib().aqua_sim_fail_random(p, seed, mask), "fail_random")


def fail_clear() -> None:
    _sim_state()
    check(_native.lib().aqua_sim_fail_clear(), "fail_clear")


def op_count(op: Op) -> int:
    return int(_native.lib().aqua_sim_op_count(int(op)))


def failures() -> int:
    return int(_native.lib().aqua_sim_failures())


def usage(tier: int | str) -> tuple[int, int]:
    """(physical bytes held, live mappings) of a simulated tier ('host', 'gpuN', N)."""
    state = _sim_state()
    t = parse_tier(tier, state.num_devices) if tier != TIER_HOST else TIER_HOST
    check(_native.lib().aqua_flush_releases(), "flushing deferred releases")
    nbytes, nmaps = ctypes.c_uint64(), ctypes.c_uint64()
    check(_native.lib().aqua_sim_usage(t, ctypes.byref(nbytes), ctypes.byref(nmaps)), "usage")
    return nbytes.value, nmaps.value


def segment_count() -> int:
    n = ctypes.c_int()
    check(_native.lib().aqua_segment_count(ctypes.byref(n)), "segment_count")
    return n.value
