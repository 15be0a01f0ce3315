"""Traces on demand and at exit: drain the events (the core's, through the sources the memory
layer registered, and the scheduler's), keep them, and write them with the one writer;
optionally PyTorch's memory snapshot beside them.

Tracing costs nothing on the allocation path: events are queued by the core and the
scheduler, and only :func:`dump` (on demand or at exit) drains and formats them.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aqua_alloc.obs import events as events_module
from aqua_alloc.obs.events import Event, drain_python_events, num_python_events_dropped
from aqua_alloc.obs.trace_writer import write_atomically, write_trace

__all__ = ["collect", "dump", "exit_hook_path", "install_exit_hook", "snapshot_path_for", "write_memory_snapshot"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_collected: list[Event] = []        # every event drained so far: later dumps include earlier ones
_num_core_dropped = 0
_exit_path: Path | None = None
_exit_snapshot = False
_exit_hooks_installed = False
_exit_written_events = -1           # len(_collected) at the last exit-time write
_previous_excepthook = sys.excepthook


def _drain_sources() -> list[Event]:
    """New events of every registered source (the core's, once the memory layer is loaded);
    a source that cannot say (a core not loaded or shut down) gives none."""
    global _num_core_dropped
    drained: list[Event] = []
    for name, source in events_module.sources().items():
        try:
            drained += source.drain()
            if name == "core":
                _num_core_dropped = int(source.num_dropped())
        except Exception as e:  # a missing or disabled core: no core events
            log.debug("no %s events: %s: %s", name, type(e).__name__, e)
    return drained


def collect() -> list[Event]:
    """Drain the core's and the scheduler's queues into the in-memory trace; return a copy."""
    with _lock:
        new = _drain_sources() + drain_python_events()
        new.sort(key=lambda e: e.t_ns)
        # Events usually arrive later than those collected before; merge when they do not.
        if _collected and new and new[0].t_ns < _collected[-1].t_ns:
            _collected.extend(new)
            _collected.sort(key=lambda e: e.t_ns)
        else:
            _collected.extend(new)
        return list(_collected)


def _reset_for_tests() -> None:
    global _num_core_dropped, _exit_written_events
    with _lock:
        _collected.clear()
        _num_core_dropped = 0
        _exit_written_events = -1


def snapshot_path_for(trace_path: str | os.PathLike[str]) -> Path:
    """``trace.json`` -> ``trace.snapshot.pickle`` (next to the trace)."""
    path = Path(trace_path)
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    return path.with_name(f"{stem}.snapshot.pickle")


def write_memory_snapshot(path: str | os.PathLike[str]) -> Path | None:
    """Write PyTorch's memory snapshot (``torch.cuda.memory._snapshot()``, the pickle that
    pytorch.org/memory_viz reads) to ``path``. Without CUDA, write nothing, log why and
    return None."""
    torch = sys.modules.get("torch")
    if torch is None:
        log.warning("aqua_alloc: no memory snapshot written to %s: torch was never imported", path)
        return None
    if not torch.cuda.is_available():
        log.warning("aqua_alloc: no memory snapshot written to %s: CUDA is not available", path)
        return None
    snapshot = torch.cuda.memory._snapshot()
    path = Path(path)
    write_atomically(path, pickle.dumps(snapshot))
    return path


def dump(path: str | os.PathLike[str], *, snapshot: bool = False) -> Path:
    """Write a trace of every event collected so far to ``path``; with ``snapshot``, also
    PyTorch's memory snapshot next to it (see :func:`snapshot_path_for`). Returns the path."""
    events = collect()
    path = write_trace(
        path, events,
        num_core_events_dropped=_num_core_dropped,
        num_python_events_dropped=num_python_events_dropped(),
        extra_metadata={"pid": os.getpid(), "argv": list(sys.argv),
                        "written_unix_s": round(time.time(), 3)},
    )
    if snapshot:
        write_memory_snapshot(snapshot_path_for(path))
    return path


def _write_exit_trace(reason: str) -> None:
    global _exit_written_events
    path = _exit_path
    if path is None:
        return
    try:
        num_events = len(collect())
        if num_events == _exit_written_events:
            return          # already written with these events (excepthook, then atexit)
        dump(path, snapshot=_exit_snapshot)
        _exit_written_events = num_events
        # One line, like the core's own messages: the user asked for this file by AQUA_TRACE.
        print(f"[aqua_alloc] trace written to {path} at {reason} ({num_events} events)",
              file=sys.stderr)
    except Exception as e:  # never turn a clean exit into a crash
        log.error("aqua_alloc: could not write trace to %s: %s: %s", path, type(e).__name__, e)


def _excepthook(exc_type: Any, exc: Any, tb: Any) -> None:
    try:
        _previous_excepthook(exc_type, exc, tb)
    finally:
        _write_exit_trace("unhandled exception")


def exit_hook_path() -> Path | None:
    """Where the trace is written at exit, or None when no exit hook is installed."""
    return _exit_path


def install_exit_hook(path: str | os.PathLike[str], snapshot: bool = False) -> None:
    """Write a trace to ``path`` when the process exits, and also on an unhandled exception
    (chained to the previous ``sys.excepthook``). Calling again changes path and snapshot."""
    global _exit_path, _exit_snapshot, _exit_hooks_installed, _previous_excepthook
    _exit_path = Path(path)
    _exit_snapshot = bool(snapshot)
    if _exit_hooks_installed:
        return
    _exit_hooks_installed = True
    atexit.register(_write_exit_trace, "exit")
    if sys.excepthook is not _excepthook:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _excepthook
