"""The one trace writer: aqua_alloc events -> Chrome trace-event JSON (object form) that
Perfetto and chrome://tracing open, with the events it was drawn from kept under
``metadata`` so that tools rebuild everything from the events, never from the drawing.
What is drawn comes from :func:`aqua_alloc.obs.replay.replay`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Iterable

from aqua_alloc.obs.events import Event, EventKind
from aqua_alloc.obs.replay import context_label, replay
from aqua_alloc.obs.trace_format import EVENT_FIELDS, FORMAT_NAME, FORMAT_VERSION

__all__ = ["build_trace", "write_trace", "write_atomically"]

_CONTEXTS_PID = 1           # Chrome "process" holding one thread-like track per context
_TIERS_PID = 2              # Chrome "process" holding tier counters, moves, untagged events
_UNTAGGED_TID = 1
_FIRST_MOVE_TID = 2

# Kinds drawn as instant markers (the others are drawn as slices or counters).
_INSTANT_KINDS = frozenset({
    EventKind.PROMPT_ARRIVED, EventKind.FIRST_TOKEN, EventKind.FINISHED,
    EventKind.CONTEXT_CREATE, EventKind.CONTEXT_RELEASE,
    EventKind.MOVE_FAILED, EventKind.ALLOC_FAILED,
    EventKind.LEND_OFFER, EventKind.LEND_BORROW, EventKind.LEND_RELEASE, EventKind.LEND_RECLAIM,
    EventKind.LEND_RECLAIMED, EventKind.LEND_RECLAIM_TIMEOUT,
})



def _jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of an event's args: finite numbers, strings, lists, str-keyed dicts."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth < 16 and isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if depth < 16 and isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    return str(value)


def _normalized(event: Event) -> Event:
    """The event with an EventKind kind (a plain string value is accepted; ValueError if unknown)."""
    if isinstance(event.kind, EventKind):
        return event
    return dataclasses.replace(event, kind=EventKind(event.kind))


def _event_row(event: Event) -> list[Any]:
    return [
        int(event.t_ns),
        event.kind.value,
        None if event.context is None else str(event.context),
        None if event.src is None else str(event.src),
        None if event.dst is None else str(event.dst),
        int(event.bytes),
        int(event.dur_ns),
        int(event.status),
        _jsonable(dict(event.args)),
    ]


def _us(t_ns: int, t0_ns: int) -> float:
    """Chrome timestamps are microseconds; keep ns precision."""
    return round((t_ns - t0_ns) / 1000, 3)


def build_trace(
    events: Iterable[Event],
    *,
    num_core_events_dropped: int = 0,
    num_python_events_dropped: int = 0,
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The trace of ``events`` as a JSON-ready dict (see docs/trace-format.md)."""
    events = sorted((_normalized(e) for e in events), key=lambda e: e.t_ns)
    rows = [_event_row(e) for e in events]
    rep = replay(events)
    t0 = rep.t0_ns
    tid_of = {ctx: 1 + i for i, ctx in enumerate(rep.contexts)}
    out: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": _CONTEXTS_PID, "tid": 0,
         "args": {"name": "aqua_alloc contexts"}},
        {"ph": "M", "name": "process_sort_index", "pid": _CONTEXTS_PID, "tid": 0,
         "args": {"sort_index": 1}},
        {"ph": "M", "name": "process_name", "pid": _TIERS_PID, "tid": 0,
         "args": {"name": "aqua_alloc tiers"}},
        {"ph": "M", "name": "process_sort_index", "pid": _TIERS_PID, "tid": 0,
         "args": {"sort_index": 2}},
        {"ph": "M", "name": "thread_name", "pid": _TIERS_PID, "tid": _UNTAGGED_TID,
         "args": {"name": "events"}},
    ]
    for ctx, tid in tid_of.items():
        out.append({"ph": "M", "name": "thread_name", "pid": _CONTEXTS_PID, "tid": tid,
                    "args": {"name": context_label(ctx)}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": _CONTEXTS_PID, "tid": tid,
                    "args": {"sort_index": tid}})

    move_tid: dict[tuple[str, str, int], int] = {}
    for move in rep.moves:
        key = (move.src, move.dst, move.lane)
        if key not in move_tid:
            move_tid[key] = _FIRST_MOVE_TID + len(move_tid)
            lane = f" #{move.lane + 1}" if move.lane else ""
            out.append({"ph": "M", "name": "thread_name", "pid": _TIERS_PID,
                        "tid": move_tid[key], "args": {"name": f"move {move.src}->{move.dst}{lane}"}})

    for interval in rep.intervals:
        args: dict[str, Any] = {"open": True} if interval.open else {}
        out.append({"ph": "X", "name": interval.name, "cat": "context",
                    "pid": _CONTEXTS_PID, "tid": tid_of[interval.context],
                    "ts": _us(interval.start_ns, t0),
                    "dur": round((interval.end_ns - interval.start_ns) / 1000, 3),
                    "args": args})
    for move in rep.moves:
        gib_s = move.gib_s
        out.append({"ph": "X", "name": f"move {move.src}->{move.dst}", "cat": "move",
                    "pid": _TIERS_PID, "tid": move_tid[(move.src, move.dst, move.lane)],
                    "ts": _us(move.start_ns, t0), "dur": round(move.dur_ns / 1000, 3),
                    "args": {"context": context_label(move.context), "bytes": move.bytes,
                             "src": move.src, "dst": move.dst,
                             "gib_s": None if gib_s is None else round(gib_s, 3)}})
    for t, tiers in rep.tier_samples:
        out.append({"ph": "C", "name": "bytes", "pid": _TIERS_PID, "tid": 0,
                    "ts": _us(t, t0), "args": tiers})
    for name, samples in (("budget", rep.budget_samples), ("lend budget", rep.lend_samples)):
        for t, tiers in samples:
            out.append({"ph": "C", "name": name, "pid": _TIERS_PID, "tid": 0,
                        "ts": _us(t, t0), "args": tiers})
    for ctx, samples in rep.context_samples.items():
        name = f"bytes {context_label(ctx)}"
        for t, tiers in samples:
            out.append({"ph": "C", "name": name, "pid": _CONTEXTS_PID, "tid": 0,
                        "ts": _us(t, t0), "args": tiers})
    for event, row in zip(events, rows):
        if event.kind not in _INSTANT_KINDS:
            continue
        args = {k: v for k, v in zip(EVENT_FIELDS[2:], row[2:]) if v not in (None, 0, {})}
        if event.context is None:
            pid, tid = _TIERS_PID, _UNTAGGED_TID
        else:
            pid, tid = _CONTEXTS_PID, tid_of[event.context]
        out.append({"ph": "i", "s": "t", "name": event.kind.value, "cat": "event",
                    "pid": pid, "tid": tid, "ts": _us(event.t_ns, t0), "args": args})

    metadata: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "clock": "CLOCK_MONOTONIC",
        "t0_ns": t0,
        "num_events_dropped": {"core": int(num_core_events_dropped),
                               "python": int(num_python_events_dropped)},
        "info": _jsonable(extra_metadata or {}),
        "event_fields": list(EVENT_FIELDS),
        "events": rows,
    }
    # displayTimeUnit first and metadata last: Perfetto reads the keys in order.
    return {"displayTimeUnit": "ms", "traceEvents": out, "metadata": metadata}


def _dumps(trace: dict[str, Any]) -> str:
    """Compact JSON, one trace event / aqua event per line (greppable, diffable)."""
    enc = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode

    meta = dict(trace["metadata"])
    rows = meta.pop("events")
    meta_head = enc(meta)[:-1]   # without the closing brace: events are appended below
    return "".join([
        '{"displayTimeUnit":', enc(trace["displayTimeUnit"]), ',\n"traceEvents":[\n',
        ",\n".join(enc(e) for e in trace["traceEvents"]),
        '\n],\n"metadata":', meta_head, ',"events":[\n',
        ",\n".join(enc(r) for r in rows),
        "\n]}}\n",
    ])


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_trace(
    path: str | os.PathLike[str],
    events: Iterable[Event],
    *,
    num_core_events_dropped: int = 0,
    num_python_events_dropped: int = 0,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the trace of ``events`` to ``path`` (atomically: a reader never sees half)."""
    path = Path(path)
    trace = build_trace(events, num_core_events_dropped=num_core_events_dropped,
                        num_python_events_dropped=num_python_events_dropped,
                        extra_metadata=extra_metadata)
    write_atomically(path, _dumps(trace).encode("utf-8"))
    return path
