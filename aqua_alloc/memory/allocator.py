"""The allocator: contexts of inference memory that can move between tiers.

:func:`start` (called by ``aqua_alloc.enable()``) starts the C++ core over the CUDA driver
(or over simulated devices) and sets the tiers' budgets; :func:`stop` brings every context
home and stops it. What else ``enable()`` switches on (the HuggingFace hook, the
coordinator client, the trace at exit) is wired by :mod:`aqua_alloc.lifecycle`, above.

``with context(tag):`` routes the calling thread's CUDA allocations to
the context's pool: one ``torch.cuda.MemPool`` per (device, context), whose allocator is the
core's ``aqua_malloc`` / ``aqua_free``. PyTorch's caching allocator stays in front (it
splits and caches blocks inside the pool) and asks the core only for new segments; weights
and activations made outside a context never reach the core.

``park`` marks a context as not running (a candidate for eviction), ``resume`` brings its
bytes back to its GPU, ``evict`` moves them now, ``where`` says where they are. Every move
keeps each tensor's ``data_ptr()`` and bytes.

Thread-safety: every function may be called from any thread. Routing is per thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import threading
from typing import Any, Iterator

from aqua_alloc.memory import config, lending
from aqua_alloc.memory import native as _native
from aqua_alloc.memory.native import TIER_AUTO, TIER_HOST, TIER_NONE, Backend, check
from aqua_alloc.obs import events

_lock = threading.RLock()
_state: "_State | None" = None
_tags_by_id: dict[int, str] = {}   # every context id ever made -> tag (for events)
_routing = threading.local()       # .stack: [(context, pool_ctx)] of this thread
_threads_in_pools = 0              # `with context()` blocks inside torch.cuda.use_mem_pool now (under _lock)


class NoDeviceError(RuntimeError):
    """aqua_alloc was asked to use CUDA where there is no usable GPU or driver."""


class ContextError(RuntimeError):
    """A context was misused: unknown or released tag, wrong device, in use."""


@dataclasses.dataclass
class _Context:
    tag: str
    id: int
    device: int
    pool: Any = None       # torch.cuda.MemPool (CUDA backend)
    users: int = 0         # threads inside `with context(tag)` now


@dataclasses.dataclass
class _State:
    settings: config.Settings
    plan: config.Plan
    backend: Backend
    num_devices: int
    contexts: dict[str, _Context] = dataclasses.field(default_factory=dict)
    torch_allocator: Any = None  # CUDAPluggableAllocator, kept for the process's life
    prefetcher: concurrent.futures.ThreadPoolExecutor | None = None
    released_pools: list[Any] = dataclasses.field(default_factory=list)  # see _sweep_released_pools
    lending: lending.Lending | None = None  # lend budgets: elastic re-reads and reclaims


_keep_alive: list[Any] = []  # pluggable allocators: torch may call them until exit


def tier_name(tier: int) -> str:
    return "host" if tier == TIER_HOST else f"gpu{tier}"


def _tiers_accepted(num_devices: int) -> str:
    """What a tier argument may be on this machine, for messages."""
    last = num_devices - 1
    gpus = "'gpu0' or the device ordinal 0" if last == 0 else f"'gpu0'..'gpu{last}' or a device ordinal 0..{last}"
    return f"'host', 'auto', {gpus}"


def parse_tier(tier: int | str, num_devices: int) -> int:
    """'host', 'gpuN', 'auto' or a device ordinal -> the core's tier number."""
    given = tier
    if isinstance(tier, str):
        t = tier.strip().lower()
        if t == "host":
            return TIER_HOST
        if t == "auto":
            return TIER_AUTO
        if t.startswith("gpu") and t[3:].isascii() and t[3:].isdigit():
            tier = int(t[3:])
        elif t.startswith("cuda:") and t[5:].isascii() and t[5:].isdigit():
            tier = int(t[5:])
    if isinstance(tier, bool) or not isinstance(tier, int):
        raise ValueError(f"tier={given!r}: expected {_tiers_accepted(num_devices)}")
    if not 0 <= tier < num_devices:
        raise ValueError(f"tier={given!r}: no such GPU; this process has {num_devices} "
                         f"GPU{'s' if num_devices != 1 else ''}: expected {_tiers_accepted(num_devices)}")
    return tier


# --- enable / disable -----------------------------------------------------------------------


def is_enabled() -> bool:
    return _state is not None


def num_devices() -> int:
    """GPUs (or simulated devices) the running core drives."""
    return _require().num_devices


def settings() -> config.Settings | None:
    return _state.settings if _state else None


def start(settings: config.Settings) -> None:
    """Start the core with ``settings`` (already parsed and validated). Raises ContextError
    when already started, NoDeviceError when CUDA is asked for and missing; on any failure
    nothing is left started."""
    global _state
    with _lock:
        if _state is not None:
            raise ContextError("aqua_alloc is already enabled; call disable() before enabling with new settings")
        lib = _native.lib()
        if lib.aqua_backend() != Backend.NONE:
            # A core left up by disable() while tensors were alive: shut it down now if they
            # are gone; otherwise say what holds it.
            if lib.aqua_shutdown(0) != _native.Status.OK:
                raise ContextError(f"enable(): the previous aqua_alloc session still serves live tensors "
                                   f"({_native.last_error()}); free them before enabling again")
        if settings.backend == "sim":
            n = settings.sim_devices
            caps = (ctypes.c_uint64 * n)(*([settings.sim_device_bytes] * n))
            matrix = settings.sim_peer_access or tuple(tuple(True for _ in range(n)) for _ in range(n))
            if len(matrix) != n:
                raise config.ConfigError(f"sim_peer_access: expected a {n}x{n} matrix, got {len(matrix)} rows")
            peer = (ctypes.c_uint8 * (n * n))(*[int(x) for row in matrix for x in row])
            check(lib.aqua_init_sim(n, caps, settings.sim_host_bytes, peer, 0), "starting simulated devices")
            backend = Backend.SIM
        else:
            status = lib.aqua_init_cuda()
            if status == _native.Status.NO_DEVICE:
                raise NoDeviceError(f"aqua_alloc needs a CUDA GPU: {_native.last_error()}. "
                                    "(Tests with no GPU use enable(backend='sim').)")
            check(status, "starting the CUDA backend")
            backend = Backend.CUDA
        try:
            plan, num_devices = _configure(lib, settings, backend)
        except BaseException:
            lib.aqua_shutdown(1)
            raise
        _state = _State(settings=settings, plan=plan, backend=backend, num_devices=num_devices)
        _state.lending = lending.Lending(num_devices, plan, settings.lend_poll_ms)
        _state.lending.start()


def abort_start() -> None:
    """Undo :func:`start` at once, when a layer above fails to start with it (no context
    can exist yet: nothing is brought home)."""
    global _state
    with _lock:
        if _state is None:
            return
        _state.lending.stop()
        _state = None
        _native.lib().aqua_shutdown(1)


def uses_cuda() -> bool:
    """Whether the running core drives CUDA devices (not simulated ones)."""
    return _state is not None and _state.backend == Backend.CUDA


def _configure(lib: ctypes.CDLL, settings: config.Settings, backend: Backend) -> tuple[config.Plan, int]:
    check(lib.aqua_events_set_capacity(settings.trace_events), "AQUA_TRACE_EVENTS")  # first: it clears the buffer
    n = ctypes.c_int()
    check(lib.aqua_device_count(ctypes.byref(n)), "counting devices")
    num_devices = n.value
    peer = [[False] * num_devices for _ in range(num_devices)]
    for i in range(num_devices):
        for j in range(num_devices):
            can = ctypes.c_int()
            check(lib.aqua_can_access_peer(i, j, ctypes.byref(can)), "asking peer access")
            peer[i][j] = bool(can.value)
    total, free = {}, {}
    for d in range(num_devices):
        free[d], total[d] = _native.mem_info(d)
    from aqua_alloc.memory import topology  # noqa: PLC0415 - psutil (and pynvml on CUDA): at enable(), not import

    if backend == Backend.SIM:
        host_total = host_available = settings.sim_host_bytes
        nvlink = peer
    else:
        topo = topology.discover(peer)
        host_total, host_available = topo.host_total_bytes, topo.host_available_bytes
        nvlink = topo.nvlink if len(topo.nvlink) == num_devices else [[False] * num_devices] * num_devices
    plan = config.resolve(settings, total, free, host_total, host_available)
    check(lib.aqua_set_chunk_bytes(settings.chunk), "AQUA_CHUNK")
    check(lib.aqua_set_device_keep(settings.device_keep), "AQUA_DEVICE_KEEP")
    for d in range(num_devices):
        check(lib.aqua_set_local_budget(d, plan.local_budget[d]), f"AQUA_LOCAL_BUDGET for GPU {d}")
        check(lib.aqua_set_lend_budget(d, plan.lend[d]), f"AQUA_LEND for GPU {d}")
        for p in range(num_devices):
            if p != d:
                rank = topology.peer_rank(peer[d][p], nvlink[d][p])
                check(lib.aqua_set_peer_rank(d, p, rank), f"peer rank {d}->{p}")
    check(lib.aqua_set_host_budget(plan.host_budget), "AQUA_HOST_BUDGET")
    check(lib.aqua_host_pool_reserve(plan.host_reserve, 1), "AQUA_HOST_RESERVE (creating pinned host backing)")
    return plan, num_devices


def _refuse_if_in_use(state: _State) -> None:
    for ctx in state.contexts.values():
        if ctx.users:
            raise ContextError(f"disable(): context {ctx.tag!r} is in use by {ctx.users} `with context()` block(s)")


def refuse_if_in_use() -> None:
    """ContextError naming a context some thread is inside ``with context(tag)`` of."""
    with _lock:
        _refuse_if_in_use(_require())


def stop() -> None:
    """Stop the core. Tensors made in contexts stay valid; the core keeps serving their
    frees and is shut down once none is left.

    Refused, with ContextError naming the context and nothing changed, while a thread is
    inside ``with context(tag)`` of any context (as :func:`release` is). Otherwise it brings
    every context home to its GPU, one after the other. When one cannot come home (no
    room), it is refused with ContextError naming it: contexts brought home before that
    one stay home and running (they are not parked again), nothing is released, and the
    core keeps running."""
    global _state
    with _lock:
        state = _require()
        _refuse_if_in_use(state)
        lib = _native.lib()
        for ctx in list(state.contexts.values()):
            moved, elsewhere = ctypes.c_uint64(), ctypes.c_uint64()
            check(lib.aqua_resume(ctx.id, _current_stream(ctx), ctypes.byref(moved), ctypes.byref(elsewhere)),
                  f"bringing {ctx.tag!r} home")
            if elsewhere.value:
                raise ContextError(f"disable(): context {ctx.tag!r} still has {config.format_size(elsewhere.value)} "
                                   "off its GPU (no room to bring them home); release contexts or free memory first")
        # Kept device backings go back now: the core may outlive this state (live tensors)
        # and nothing would release them until it shuts down.
        check(lib.aqua_set_device_keep(0), "releasing kept device backings")
        if state.lending:
            state.lending.stop()
        if state.prefetcher:
            state.prefetcher.shutdown(wait=True)
        for ctx in list(state.contexts.values()):
            _release_locked(state, ctx)
        _keep_alive.extend(state.released_pools)  # pools with live tensors outlive the state
        _state = None
        # Refused while tensors of released contexts are alive: the core then stays up to
        # serve their frees, and the next enable() shuts it down once they are gone.
        lib.aqua_shutdown(0)


def _require() -> _State:
    if _state is None:
        raise ContextError("aqua_alloc is not enabled: call aqua_alloc.enable() (or set AQUA_ALLOC=1)")
    return _state


# --- contexts -------------------------------------------------------------------------------


def _resolve_device(state: _State, device: Any) -> int:
    if device is None:
        if state.backend == Backend.CUDA:
            import torch  # noqa: PLC0415

            return torch.cuda.current_device()
        return 0
    index = getattr(device, "index", device)  # torch.device
    if getattr(device, "type", "cuda") != "cuda":
        raise ValueError(f"device={device!r}: aqua_alloc contexts live on CUDA devices")
    if isinstance(device, str):
        s = device.strip().lower()
        index = int(s[5:]) if s.startswith("cuda:") and s[5:].isdigit() else (0 if s == "cuda" else None)
        if index is None:
            raise ValueError(f"device={device!r}: expected 'cuda:N' or a device ordinal")
    if index is None:
        index = 0
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < state.num_devices:
        raise ValueError(f"device={device!r}: no such GPU ({state.num_devices} devices)")
    return index


def _get_or_create(state: _State, tag: str, device: Any) -> _Context:
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"context tag must be a non-empty string, got {tag!r}")
    ctx = state.contexts.get(tag)
    if ctx is not None:
        if device is not None and _resolve_device(state, device) != ctx.device:
            raise ContextError(f"context {tag!r} lives on GPU {ctx.device}, not on {device!r}")
        return ctx
    dev = _resolve_device(state, device)
    lib = _native.lib()
    out = ctypes.c_int()
    check(lib.aqua_context_create(dev, tag.encode(), ctypes.byref(out)), f"creating context {tag!r}")
    ctx = _Context(tag=tag, id=out.value, device=dev)
    if state.backend == Backend.CUDA:
        import torch  # noqa: PLC0415

        if state.torch_allocator is None:
            state.torch_allocator = torch.cuda.memory.CUDAPluggableAllocator(
                _native.library_path(), "aqua_malloc", "aqua_free")
            _keep_alive.append(state.torch_allocator)
        with torch.cuda.device(dev):
            ctx.pool = torch.cuda.MemPool(state.torch_allocator.allocator())
    state.contexts[tag] = ctx
    _tags_by_id[ctx.id] = tag
    return ctx


@contextlib.contextmanager
def context(tag: str, device: Any = None) -> Iterator[str]:
    """Route this thread's CUDA allocations to context `tag` (made on first use, on
    `device` or the current device). Nested contexts: the innermost wins."""
    global _threads_in_pools
    with _lock:
        state = _require()
        ctx = _get_or_create(state, tag, device)
        ctx.users += 1
        routed = ctx.pool is not None
        if routed:
            _threads_in_pools += 1
    lib = _native.lib()
    prev = ctypes.c_int()
    lib.aqua_set_thread_context(ctx.id, ctypes.byref(prev))
    stack = getattr(_routing, "stack", None)
    if stack is None:
        stack = _routing.stack = []
    stack.append(tag)
    try:
        if ctx.pool is not None:
            import torch  # noqa: PLC0415

            with torch.cuda.use_mem_pool(ctx.pool, device=ctx.device):
                yield tag
        else:
            yield tag
    finally:
        stack.pop()
        lib.aqua_set_thread_context(prev.value, None)
        with _lock:
            ctx.users -= 1
            if routed:
                _threads_in_pools -= 1
                if _threads_in_pools == 0 and _state is not None and _state.released_pools:
                    _sweep_released_pools(_state)


def current_context() -> str | None:
    """The tag this thread allocates into now, or None."""
    stack = getattr(_routing, "stack", None)
    return stack[-1] if stack else None


def _find(tag: str) -> _Context:
    state = _require()
    ctx = state.contexts.get(tag)
    if ctx is None:
        raise ContextError(f"no context {tag!r} (unknown, or already released)")
    return ctx


def _current_stream(ctx: _Context) -> int:
    if _state is not None and _state.backend == Backend.CUDA:
        import torch  # noqa: PLC0415

        return torch.cuda.current_stream(ctx.device).cuda_stream
    return 0


def park(tag: str) -> None:
    """Mark `tag` as not running: it becomes a candidate for eviction, least recently run
    first. Records an event on the current stream; moves of the context wait for it."""
    with _lock:
        ctx = _find(tag)
    check(_native.lib().aqua_park(ctx.id, _current_stream(ctx)), f"park({tag!r})")


@dataclasses.dataclass(frozen=True)
class MoveResult:
    bytes_moved: int       # bytes brought back to the context's GPU
    bytes_elsewhere: int   # bytes still on other tiers (no room); usable in place


def resume(tag: str, wait: bool = True) -> MoveResult | concurrent.futures.Future:
    """Mark `tag` running and bring its bytes back to its GPU, as far as room allows
    (parked contexts are evicted in the same move, least recently run first).

    With wait=False it returns a Future at once and the move runs in the background; work
    the caller queues afterwards on its current CUDA stream waits for the move on the GPU
    (a stream wait on a flag the move sets), not on the host, so kernels may be launched on
    the context right away. Where the driver cannot queue such a wait, the call waits for
    the move on the host before it returns (the Future is then already done)."""
    config.expect_bool(wait, "resume(): wait")
    with _lock:
        ctx = _find(tag)
    stream = _current_stream(ctx)  # the caller's: a running context's moves wait for its work
    if wait:
        moved, elsewhere = ctypes.c_uint64(), ctypes.c_uint64()
        check(_native.lib().aqua_resume(ctx.id, stream, ctypes.byref(moved), ctypes.byref(elsewhere)),
              f"resume({tag!r})")
        return MoveResult(moved.value, elsewhere.value)
    future = _start_resume(ctx, stream)
    if _native.lib().aqua_resume_wait_on_stream(future.ticket, stream) != _native.Status.OK:
        future.result()  # no GPU-side wait here: wait on the host instead (raises what the move raised)
    return future


def prefetch(tag: str) -> concurrent.futures.Future:
    """Start bringing `tag` back to its GPU in the background and return a Future of its
    MoveResult; nothing waits for it. The context counts as running from now on (it is not
    evicted). Before running kernels on it, call :func:`wait_on_stream` (GPU-side wait) or
    ``.result()`` (host wait). For schedulers that resume the next prompt while one runs."""
    with _lock:
        ctx = _find(tag)
    return _start_resume(ctx, _current_stream(ctx))


def wait_on_stream(future: concurrent.futures.Future, stream: Any = None) -> bool:
    """Make work queued later on `stream` (default: the current stream of the context's
    GPU) wait, on the GPU, for the move of a :func:`prefetch` or ``resume(wait=False)``.
    Returns False where the driver cannot queue such a wait (then wait on the host)."""
    ticket = getattr(future, "ticket", None)
    if ticket is None:
        raise ValueError("wait_on_stream(): expected the Future of prefetch() or resume(wait=False)")
    if stream is None:
        with _lock:
            state = _require()
            ctx_stream = 0
            if state.backend == Backend.CUDA:
                import torch  # noqa: PLC0415

                ctx_stream = torch.cuda.current_stream(future.device).cuda_stream
        stream = ctx_stream
    else:
        stream = getattr(stream, "cuda_stream", stream)
    return _native.lib().aqua_resume_wait_on_stream(ticket, int(stream)) == _native.Status.OK


def _start_resume(ctx: _Context, stream: int) -> concurrent.futures.Future:
    """Queue an asynchronous resume of `ctx`; a prefetcher thread resolves its Future."""
    with _lock:
        state = _require()
        if state.prefetcher is None:
            state.prefetcher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="aqua-prefetch")
    ticket = ctypes.c_uint32()
    check(_native.lib().aqua_resume_async(ctx.id, stream, ctypes.byref(ticket)), f"resume({ctx.tag!r})")

    def result() -> MoveResult:
        moved, elsewhere = ctypes.c_uint64(), ctypes.c_uint64()
        check(_native.lib().aqua_resume_result(ticket.value, ctypes.byref(moved), ctypes.byref(elsewhere)),
              f"resume({ctx.tag!r})")
        return MoveResult(moved.value, elsewhere.value)

    future = state.prefetcher.submit(result)
    future.ticket = ticket.value   # for wait_on_stream
    future.device = ctx.device
    return future


def evict(tag: str, tier: int | str = "auto") -> int:
    """Move every byte of `tag` off its GPU now: to `tier` ('host', 'gpuN') or, with
    'auto', to the best tier with room. All or nothing. Parks the context first if it is
    running. Returns the bytes moved."""
    with _lock:
        state = _require()
        ctx = _find(tag)
        target = parse_tier(tier, state.num_devices)
    moved = ctypes.c_uint64()
    check(_native.lib().aqua_evict(ctx.id, target, _current_stream(ctx), ctypes.byref(moved)),
          f"evict({tag!r}, tier={tier!r})")
    return moved.value


def _lend_device(state: _State, device: Any, what: str) -> int:
    if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < state.num_devices:
        raise ValueError(f"{what}: device={device!r}: expected a GPU ordinal in 0..{state.num_devices - 1}")
    return device


def _lend_bytes(value: Any, device: int, what: str, name: str, none_means: str) -> int:
    """Bytes of GPU ``device`` given to lend()/reclaim() (``none_means``: what None asks for)."""
    try:
        size = config.parse_size(value, f"{what}: {name}", allow_percent=False)
    except config.ConfigError as e:
        raise config.ConfigError(f"{e}; or None for {none_means}") from None
    _, total = _native.mem_info(device)
    if size > total:
        raise config.ConfigError(f"{what}: {name}={value!r} is {config.format_size(size)}, more than the "
                                 f"{config.format_size(total)} GPU {device} has")
    return size


def lend(device: int, max_bytes: int | str | None) -> None:
    """Fix how many bytes of GPU `device` other GPUs' contexts may use (``max_bytes``: bytes
    or a size such as '8GiB'); ``None`` returns it to the elastic default (its free memory
    less AQUA_LEND_MARGIN, re-read every AQUA_LEND_POLL_MS). Lowering it below what the GPU
    holds for others moves the excess away, as :func:`reclaim` does, without waiting."""
    with _lock:
        state = _require()
        device = _lend_device(state, device, "lend()")
        if max_bytes is None:
            state.lending.set_elastic(device)
        else:
            state.lending.set_fixed(device, _lend_bytes(max_bytes, device, "lend()", "max_bytes",
                                                       "the elastic default"))
    state.lending.move_excess(device)


def reclaim(device: int, nbytes: int | str | None = None, timeout: float = 5.0) -> lending.ReclaimResult:
    """Take back `nbytes` (default: all) of what GPU `device` lends: its lend budget drops by
    that much (and stays fixed, see :func:`lend`), and other GPUs' contexts placed on it
    beyond the new budget move to another lender with room, else host, bytes and pointers
    intact. Parked contexts move at once; running ones at their next park or resume. Waits
    up to `timeout` seconds; the result says the bytes moved and still pending (pending
    bytes also raise a RuntimeWarning: they are never assumed moved)."""
    with _lock:
        state = _require()
        device = _lend_device(state, device, "reclaim()")
        size = None if nbytes is None else _lend_bytes(nbytes, device, "reclaim()", "nbytes", "all it lends")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"reclaim(): timeout={timeout!r}: expected seconds >= 0")
    return state.lending.reclaim(device, size, float(timeout))


def reclaim_pending() -> bool:
    """Whether a lender waits for running contexts to move off it: a caller running a
    context then calls :func:`resume` on it at its next safe point (between steps)."""
    state = _state
    return bool(state and state.lending and state.lending.pending)


def _pools_with_live_blocks() -> set[tuple[int, int]]:
    """Ids of the memory pools in which some tensor still holds a block, from one snapshot
    of the whole caching allocator. (``MemPool.snapshot()``, the per-pool form, crashes
    PyTorch 2.11 once pools have been deleted: benchmarks/probe_mempool.py shows it with
    plain ``torch.cuda.MemPool()`` and no aqua_alloc.)"""
    import torch  # noqa: PLC0415

    live = set()
    for segment in torch.cuda.memory_snapshot():
        if any(block.get("state") == "active_allocated" for block in segment.get("blocks", ())):
            live.add(tuple(segment.get("segment_pool_id", (0, 0))))
    return live


def _sweep_released_pools(state: _State) -> None:
    """Drop the pools of released contexts whose tensors are all gone: deleting a MemPool
    makes torch free its segments (aqua_free). A pool must not die while a tensor still
    holds one of its blocks (torch aborts when that tensor is freed later), so released
    contexts with live tensors wait here. Nor may a pool die while any thread allocates
    through ``use_mem_pool`` (PyTorch 2.11 asserts, or corrupts its state, when a pool is
    destroyed during another thread's pool routing): then every pool waits for the last
    such block to end, which sweeps again. Caller holds _lock."""
    if _threads_in_pools or not state.released_pools:
        return
    live = _pools_with_live_blocks()
    state.released_pools = [p for p in state.released_pools if tuple(p.id) in live]


def _release_locked(state: _State, ctx: _Context) -> None:
    check(_native.lib().aqua_context_release(ctx.id), f"release({ctx.tag!r})")
    del state.contexts[ctx.tag]
    if ctx.pool is not None:
        state.released_pools.append(ctx.pool)
        ctx.pool = None
        _sweep_released_pools(state)


def release(tag: str) -> None:
    """Free context `tag`: its memory goes back to the tiers it came from once its
    tensors are gone (at once if none is alive). Releasing twice raises ContextError."""
    with _lock:
        state = _require()
        ctx = _find(tag)
        if ctx.users:
            raise ContextError(f"release({tag!r}): the context is in use by {ctx.users} `with context()` block(s)")
        _release_locked(state, ctx)


def contexts() -> list[str]:
    with _lock:
        return list(_require().contexts)


def where(tag_or_tensor: Any, *, wait: bool = True) -> dict[str, int] | None:
    """Bytes of a context (by tag, or the context holding a tensor) per tier:
    ``{"gpu0": ..., "gpu1": ..., "host": ...}``.

    ``wait=False`` (a tag only): None at once, instead of waiting, while another thread is
    inside aqua_alloc (e.g. moving contexts): for hot paths, such as a model's forward, that
    can reuse what they knew rather than stall behind a move.
    """
    config.expect_bool(wait, "where(): wait")
    if not wait:
        if not isinstance(tag_or_tensor, str):
            raise TypeError(f"where(..., wait=False) takes a context tag, got {type(tag_or_tensor).__name__}")
        if not _lock.acquire(blocking=False):
            return None
        try:
            return _per_tier("where", _native.lib().aqua_context_where_nowait, _find(tag_or_tensor).id)
        finally:
            _lock.release()
    with _lock:
        if isinstance(tag_or_tensor, str):
            ctx_id = _find(tag_or_tensor).id
        else:
            ptr = tag_or_tensor.data_ptr() if hasattr(tag_or_tensor, "data_ptr") else int(tag_or_tensor)
            out_id = ctypes.c_int()
            check(_native.lib().aqua_pointer_context(ptr, ctypes.byref(out_id)), "where(tensor)")
            ctx_id = out_id.value
        return _per_tier("where", _native.lib().aqua_context_where, ctx_id)


def _per_tier(what: str, core_call: Any, *args: Any) -> dict[str, int] | None:
    """``{"gpu0": ..., "gpuN-1": ..., "host": ...}`` from a core call that fills one uint64 per
    device, then host, after ``args``; None when a nowait call finds the core busy. Under ``_lock``."""
    num_tiers = _require().num_devices + 1
    buf = (ctypes.c_uint64 * num_tiers)()
    status = core_call(*args, buf, num_tiers)
    if status == _native.Status.BUSY:
        return None
    check(status, what)
    result = {f"gpu{d}": buf[d] for d in range(num_tiers - 1)}
    result["host"] = buf[num_tiers - 1]
    return result


def placement(tensor_or_ptr: Any, nbytes: int | None = None) -> dict[str, int]:
    """Bytes of one tensor's storage per tier (``where(tensor)`` gives its whole context's):
    ``{"gpu0": ..., "host": ...}``. Also ``placement(ptr, nbytes)`` for a raw address range.
    The storage (range) must lie in a context's segment."""
    if hasattr(tensor_or_ptr, "untyped_storage"):
        if nbytes is not None:
            raise ValueError("placement(tensor): nbytes is only for a raw pointer")
        storage = tensor_or_ptr.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
    else:
        if nbytes is None or nbytes < 0:
            raise ValueError(f"placement(ptr, nbytes): nbytes must be a byte count >= 0, got {nbytes!r}")
        ptr = int(tensor_or_ptr)
    with _lock:
        return _per_tier("placement", _native.lib().aqua_range_where, ptr, nbytes)


def flush_releases() -> None:
    """Give the GPU back, now, the memory of backings that moves and frees returned
    (normally released a few ms later, or reused by the next resume). Backings a lender
    keeps for reuse (``device_keep``) stay: they go back when the lender lowers its budget,
    reclaims, runs short of memory, or ``device_keep`` is set to 0."""
    with _lock:
        state = _require()
        _sweep_released_pools(state)
        check(_native.lib().aqua_flush_releases(), "flush_releases")


def stats() -> dict[str, Any]:
    """Per tier current/peak/total bytes and budgets; moves and bytes moved; counts."""
    with _lock:
        state = _require()
        _sweep_released_pools(state)
        lib = _native.lib()
        tiers = {}
        for tier in [*range(state.num_devices), TIER_HOST]:
            s = _native.TierStats()
            check(lib.aqua_tier_stats_get(tier, ctypes.byref(s)), "stats")
            tiers[tier_name(tier)] = {name: getattr(s, name) for name, _ in _native.TierStats._fields_}
        num_contexts, num_segments = ctypes.c_int(), ctypes.c_int()
        lib.aqua_context_count(ctypes.byref(num_contexts))
        lib.aqua_segment_count(ctypes.byref(num_segments))
        out = {
            "tiers": tiers,
            "num_moves": sum(t["num_moves_in"] for t in tiers.values()),
            "bytes_moved": sum(t["bytes_in"] for t in tiers.values()),
            "num_contexts": num_contexts.value,
            "num_segments": num_segments.value,
        }
    return out


# --- events ---------------------------------------------------------------------------------


def _event_args(kind: events.EventKind, e: _native.CoreEvent) -> dict[str, Any]:
    if kind == events.EventKind.BUDGET:
        return {"budget": "lend" if e.addr == 1 else "local"}
    return {"addr": e.addr} if e.addr else {}


def drain_core_events() -> list[events.Event]:
    """Take the core's recorded events out, as :class:`aqua_alloc.obs.events.Event`."""
    try:
        lib = _native.lib()
    except ImportError:
        return []
    out: list[events.Event] = []
    buf = (_native.CoreEvent * 4096)()
    while True:
        n = lib.aqua_events_drain(buf, len(buf))
        for e in buf[:n]:
            kind = events.CORE_KIND_CODES.get(e.kind)
            if kind is None:
                continue
            out.append(events.Event(
                t_ns=e.t_ns, kind=kind, context=_tags_by_id.get(e.context, f"context-{e.context}") if e.context >= 0 else None,
                src=None if e.src_tier == TIER_NONE else tier_name(e.src_tier),
                dst=None if e.dst_tier == TIER_NONE else tier_name(e.dst_tier),
                bytes=e.bytes, dur_ns=e.dur_ns, status=e.status, args=_event_args(kind, e)))
        if n < len(buf):
            return out


def move_profile(reset: bool = False) -> dict[str, dict[str, float]]:
    """Where moves spent their time since enable() (or the last reset): per phase
    (acquire, stage, issue, wait, remap, release) total milliseconds and calls."""
    config.expect_bool(reset, "move_profile(): reset")
    _require()
    lib = _native.lib()
    n = len(_native.PHASES)
    ns, calls = (ctypes.c_uint64 * n)(), (ctypes.c_uint64 * n)()
    check(lib.aqua_profile_get(ns, calls, n), "move_profile")
    if reset:
        check(lib.aqua_profile_reset(), "move_profile")
    return {phase: {"ms": ns[i] / 1e6, "calls": calls[i]} for i, phase in enumerate(_native.PHASES)}


def move_spans(record: bool | None = None) -> list[tuple[str, int, int]]:
    """The move phases recorded since recording began (or the last call) as
    (phase, t0_ns, t1_ns), on the clock of time.monotonic_ns(): a move's timeline. Recording
    is off by default; ``record=True`` clears and starts it, ``False`` stops it (at most
    16384 spans are kept; later ones are dropped)."""
    config.expect_bool(record, "move_spans(): record", allow_none=True)
    _require()
    lib = _native.lib()
    out: list[tuple[str, int, int]] = []
    buf = (ctypes.c_uint64 * (3 * 1024))()
    count = ctypes.c_int()
    while True:
        check(lib.aqua_profile_spans(buf, 1024, ctypes.byref(count)), "move_spans")
        out += [(_native.PHASES[buf[3 * i]], buf[3 * i + 1], buf[3 * i + 2]) for i in range(count.value)]
        if count.value < 1024:
            break
    if record is not None:
        check(lib.aqua_profile_record_spans(int(bool(record))), "move_spans")
    return out


def num_core_events_dropped() -> int:
    try:
        return int(_native.lib().aqua_events_dropped())
    except ImportError:
        return 0


# The trace (obs, the layer below) collects the core's events through this source.
events.register_source("core", events.EventSource(drain=drain_core_events, num_dropped=num_core_events_dropped))
