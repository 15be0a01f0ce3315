"""The C++ core, loaded through ctypes: every C signature of csrc/aqua_alloc.h, declared once.

The library is a plain shared library with a C ABI (not a Python extension module). The
same file is handed to ``torch.cuda.memory.CUDAPluggableAllocator`` by its path, so its
``aqua_malloc`` / ``aqua_free`` serve the context pools.

Loading it never touches a GPU: the CUDA driver is opened only by ``aqua_init_cuda``.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import glob
import os

# Tiers in the C ABI: device ordinals are tiers 0..N-1.
TIER_HOST = -1
TIER_AUTO = -2
TIER_NONE = -3


class Status(enum.IntEnum):
    OK = 0
    INVALID = 1
    NOT_FOUND = 2
    OUT_OF_MEMORY = 3
    DRIVER = 4
    NO_DEVICE = 5
    STATE = 6
    BUSY = 7


class Backend(enum.IntEnum):
    NONE = 0
    CUDA = 1
    SIM = 2


class Op(enum.IntEnum):
    """Driver operations (for failure injection on the simulated backend)."""

    RESERVE = 0
    FREE_VA = 1
    CREATE = 2
    RELEASE = 3
    MAP = 4
    UNMAP = 5
    SET_ACCESS = 6
    COPY = 7
    SYNC = 8


# Phases of a move (enum aqua_phase), in order.
PHASES = ("acquire", "stage", "issue", "wait", "remap", "release")


class CoreEvent(ctypes.Structure):
    """struct aqua_event (56 bytes)."""

    _fields_ = [
        ("t_ns", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("dur_ns", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
        ("kind", ctypes.c_int32),
        ("context", ctypes.c_int32),
        ("src_tier", ctypes.c_int32),
        ("dst_tier", ctypes.c_int32),
        ("status", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


class TierStats(ctypes.Structure):
    """struct aqua_tier_stats: bytes and counts of one tier."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "current", "peak", "total", "budget", "lend_budget", "lent", "pool_free", "pool_total",
            "num_moves_in", "num_moves_out", "bytes_in", "bytes_out",
        )
    ]


class CoreError(RuntimeError):
    """A call into the core failed; ``status`` says how, the message says what."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = Status(status) if status in Status._value2member_map_ else status


class CoreOutOfMemory(CoreError, MemoryError):
    """No tier had room."""


_i, _u64, _p = ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p
_pi, _pu64 = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint64)

# name -> (restype, argtypes)
_SIGNATURES = {
    "aqua_init_cuda": (_i, []),
    "aqua_init_sim": (_i, [_i, _pu64, _u64, ctypes.POINTER(ctypes.c_uint8), _u64]),
    "aqua_shutdown": (_i, [_i]),
    "aqua_backend": (_i, []),
    "aqua_last_error": (ctypes.c_char_p, []),
    "aqua_device_count": (_i, [_pi]),
    "aqua_can_access_peer": (_i, [_i, _i, _pi]),
    "aqua_mem_info": (_i, [_i, _pu64, _pu64]),
    "aqua_set_local_budget": (_i, [_i, _u64]),
    "aqua_set_lend_budget": (_i, [_i, _u64]),
    "aqua_set_host_budget": (_i, [_u64]),
    "aqua_set_peer_rank": (_i, [_i, _i, _i]),
    "aqua_set_chunk_bytes": (_i, [_u64]),
    "aqua_set_device_keep": (_i, [_u64]),
    "aqua_host_pool_reserve": (_i, [_u64, _i]),
    "aqua_host_pool_trim": (_i, [_u64]),
    "aqua_context_create": (_i, [_i, ctypes.c_char_p, _pi]),
    "aqua_context_release": (_i, [_i]),
    "aqua_set_thread_context": (_i, [_i, _pi]),
    "aqua_park": (_i, [_i, _u64]),
    "aqua_resume": (_i, [_i, _u64, _pu64, _pu64]),
    "aqua_evict": (_i, [_i, _i, _u64, _pu64]),
    "aqua_reclaim": (_i, [_i, _pu64, _pu64]),
    "aqua_resume_async": (_i, [_i, _u64, ctypes.POINTER(ctypes.c_uint32)]),
    "aqua_resume_wait_on_stream": (_i, [ctypes.c_uint32, _u64]),
    "aqua_resume_result": (_i, [ctypes.c_uint32, _pu64, _pu64]),
    "aqua_context_where": (_i, [_i, _pu64, _i]),
    "aqua_context_where_nowait": (_i, [_i, _pu64, _i]),
    "aqua_pointer_context": (_i, [_u64, _pi]),
    "aqua_range_where": (_i, [_u64, _u64, _pu64, _i]),
    "aqua_context_count": (_i, [_pi]),
    "aqua_segment_count": (_i, [_pi]),
    "aqua_tier_stats_get": (_i, [_i, ctypes.POINTER(TierStats)]),
    "aqua_events_set_capacity": (_i, [_u64]),
    "aqua_events_drain": (_i, [ctypes.POINTER(CoreEvent), _i]),
    "aqua_events_dropped": (_u64, []),
    "aqua_profile_get": (_i, [_pu64, _pu64, _i]),
    "aqua_profile_reset": (_i, []),
    "aqua_profile_record_spans": (_i, [_i]),
    "aqua_profile_spans": (_i, [_pu64, _i, _pi]),
    "aqua_flush_releases": (_i, []),
    "aqua_malloc": (_p, [ctypes.c_size_t, _i, _p]),
    "aqua_free": (None, [_p, ctypes.c_size_t, _i, _p]),
    "aqua_sim_fail_nth": (_i, [_i, _u64, _u64]),
    "aqua_sim_fail_random": (_i, [ctypes.c_double, _u64, ctypes.c_uint32]),
    "aqua_sim_fail_clear": (_i, []),
    "aqua_sim_op_count": (_u64, [_i]),
    "aqua_sim_failures": (_u64, []),
    "aqua_sim_usage": (_i, [_i, _pu64, _pu64]),
}


def library_path() -> str:
    """Path of the built core (aqua_alloc/memory/_aqua_core*.so)."""
    here = os.path.dirname(os.path.abspath(__file__))
    matches = sorted(glob.glob(os.path.join(here, "_aqua_core*.so")))
    if not matches:
        raise ImportError(
            f"aqua_alloc's C++ core is not built (no _aqua_core*.so in {here}); "
            "install the package with `pip install .` (or `pip install -e .`)"
        )
    return matches[0]


@functools.lru_cache(maxsize=None)
def lib() -> ctypes.CDLL:
    """The loaded core. Loaded once and kept for the life of the process: torch may call
    its free function long after the Python objects that made an allocation are gone."""
    handle = ctypes.CDLL(library_path())
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return handle


def last_error() -> str:
    message = lib().aqua_last_error()
    return message.decode("utf-8", "replace") if message else ""


def check(status: int, what: str) -> None:
    """Raise CoreError (CoreOutOfMemory for no room) when a core call failed."""
    if status == Status.OK:
        return
    message = f"{what}: {last_error() or Status(status).name}"
    if status == Status.OUT_OF_MEMORY:
        raise CoreOutOfMemory(status, message)
    raise CoreError(status, message)


def mem_info(device: int) -> tuple[int, int]:
    """(free, total) bytes of GPU ``device`` as the core sees it (simulated or CUDA)."""
    free, total = ctypes.c_uint64(), ctypes.c_uint64()
    check(lib().aqua_mem_info(device, ctypes.byref(free), ctypes.byref(total)), f"reading memory of GPU {device}")
    return free.value, total.value
