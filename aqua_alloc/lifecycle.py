"""What ``enable()`` starts and ``disable()`` stops: the layers, wired together.

The memory core comes first (:mod:`aqua_alloc.memory.allocator`); on CUDA, the HuggingFace
``generate`` hook (:mod:`aqua_alloc.hf.generate_hook`, when transformers is installed);
with ``AQUA_COORDINATOR``, the client that lends between processes
(:mod:`aqua_alloc.coordinator.client`); with ``AQUA_TRACE``, the trace written at exit
(:mod:`aqua_alloc.obs.trace`). ``disable()`` undoes them in the opposite order. This is the
only module that knows all the layers: none of them imports another upward.

Thread-safety: enable() and disable() are serialized by one lock; they may be called from
any thread.
"""

from __future__ import annotations

import threading
from typing import Any

from aqua_alloc.memory import allocator, config

_lock = threading.RLock()
_coordinator: Any = None  # coordinator.client.Client while this process is in a coordinator


def enable(**overrides: Any) -> None:
    """Start aqua_alloc. Settings: ``AQUA_*`` variables, overridden by these arguments
    (see :class:`aqua_alloc.memory.config.Settings`). A bad value raises ConfigError naming it.
    Calling it again while enabled with no arguments does nothing."""
    global _coordinator
    with _lock:
        if allocator.is_enabled():
            if overrides:
                raise allocator.ContextError(
                    "aqua_alloc is already enabled; call disable() before enabling with new settings")
            return
        settings = config.Settings.from_env(**overrides)
        allocator.start(settings)
        if settings.coordinator:
            try:
                _coordinator = _join_coordinator(settings)
            except BaseException:
                # Not half started: no coordinator, no aqua_alloc (a later enable() starts afresh).
                allocator.abort_start()
                raise
        if allocator.uses_cuda():
            _install_generate_hook()
        if settings.trace:
            from aqua_alloc.obs import trace  # noqa: PLC0415 - only when tracing is asked for

            trace.install_exit_hook(settings.trace, snapshot=settings.trace_snapshot)


def disable() -> None:
    """Stop aqua_alloc. Tensors made in contexts stay valid; the core keeps serving their
    frees and is shut down once none is left.

    Refused, with ContextError naming the context and nothing changed, while a thread is
    inside ``with context(tag)`` of any context (as :func:`aqua_alloc.release` is).

    Otherwise it first leaves the cross-process coordinator, if it joined one (what was
    borrowed from other processes is given back, its pieces moved away), then brings every
    context home to its GPU, one after the other. When one cannot come home (no room),
    disable() is refused with ContextError naming it: contexts brought home before that
    one stay home and running (they are not parked again), nothing is released, and
    aqua_alloc stays enabled (but no longer in the coordinator: it does not join again)."""
    global _coordinator
    with _lock:
        allocator.refuse_if_in_use()
        client, _coordinator = _coordinator, None
        if client is not None:
            # The client's threads call into the allocator (lend, reclaim, stats) and
            # close() waits for them; neither takes this lock.
            client.close()
        allocator.stop()
        _uninstall_generate_hook()


def stats() -> dict[str, Any]:
    """Per tier current/peak/total bytes and budgets; moves and bytes moved; counts; and,
    in a coordinator, what this process borrowed and offers."""
    out = allocator.stats()
    client = _coordinator
    if client is not None:
        out["coordinator"] = {"borrowed": client.borrowed(), "offers": client.offers()}
    return out


def coordinator_client() -> Any:
    """The coordinator client of this process, or None when it is in no coordinator."""
    return _coordinator


def forget_coordinator_for_tests() -> Any:
    """Take the client out without closing it (tests that tear down by force); returns it."""
    global _coordinator
    client, _coordinator = _coordinator, None
    return client


def _join_coordinator(settings: config.Settings) -> Any:
    """Join the cross-process coordinator named by the settings."""
    from aqua_alloc.coordinator import client  # noqa: PLC0415 - only when asked for

    return client.join(settings.coordinator, gpus=settings.coordinator_gpus,
                       offer=settings.coordinator_offer, margin=settings.lend_margin,
                       max_borrow=settings.coordinator_borrow, interval=settings.coordinator_interval)


def _install_generate_hook() -> None:
    try:
        from aqua_alloc.hf import generate_hook  # noqa: PLC0415
    except ImportError:
        return  # transformers is optional
    generate_hook.install_generate_hook()


def _uninstall_generate_hook() -> None:
    try:
        from aqua_alloc.hf import generate_hook  # noqa: PLC0415
    except ImportError:
        return
    generate_hook.uninstall_generate_hook()
