"""Memory traces: the one writer, the one validating reader, and dumps on demand or at exit.

A trace is Chrome trace-event JSON (object form) that Perfetto and chrome://tracing open,
with the aqua_alloc events it was made from kept under ``metadata`` so that tools
(``python -m aqua_alloc trace ...``) rebuild everything from the events, never from the
drawing. The format is documented in docs/trace-format.md; bump :data:`FORMAT_VERSION`
when it changes.

What the trace draws is derived by :func:`replay`, the single interpretation of an event
list shared by the writer, the summary and the plot:

- a context is *running* between SLICE_START and SLICE_END, and *parked* between
  PARKED/CONTEXT_PARK and RESUMED/CONTEXT_RESUME (FINISHED and CONTEXT_RELEASE end both);
- bytes per tier: SEGMENT_ALLOC adds ``bytes`` and SEGMENT_FREE removes them, split by
  tier as the MAP (``dst``) / UNMAP (``src``) events of the segment's pieces just before
  say, else on the segment event's own tier; MOVE_END moves ``bytes`` from ``src`` to
  ``dst`` at ``t_ns + dur_ns``.

Tracing costs nothing on the allocation path: events are queued by the core and the
scheduler, and only :func:`dump` (on demand or at exit) drains and formats them.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import pickle
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from aqua_alloc.obs import events as events_module
from aqua_alloc.obs.events import Event, EventKind, drain_python_events, num_python_events_dropped

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "EVENT_FIELDS",
    "TraceFormatError",
    "Trace",
    "Interval",
    "Move",
    "Replay",
    "replay",
    "build_trace",
    "write_trace",
    "read_trace",
    "loads_trace",
    "parse_trace",
    "collect",
    "dump",
    "install_exit_hook",
    "snapshot_path_for",
    "write_memory_snapshot",
    "context_label",
    "tier_sort_key",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "aqua_alloc.trace"
FORMAT_VERSION = 1
# Order of the fields of one event row in ``metadata.events`` (written into every trace).
EVENT_FIELDS = ("t_ns", "kind", "context", "src", "dst", "bytes", "dur_ns", "status", "args")

UNTAGGED = "(untagged)"     # label of events that carry no context tag
UNKNOWN_TIER = "unknown"    # tier of a segment event that names none

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
_RUN_KINDS = {EventKind.SLICE_START: True, EventKind.SLICE_END: False}
_PARK_KINDS = {
    EventKind.PARKED: True, EventKind.CONTEXT_PARK: True,
    EventKind.RESUMED: False, EventKind.CONTEXT_RESUME: False,
}
_END_KINDS = frozenset({EventKind.FINISHED, EventKind.CONTEXT_RELEASE})
_BYTES_KINDS = frozenset({EventKind.SEGMENT_ALLOC, EventKind.SEGMENT_FREE, EventKind.MOVE_END})
_UNTAGGED_TRACK_KINDS = frozenset(_RUN_KINDS) | frozenset(_PARK_KINDS) | _BYTES_KINDS


class TraceFormatError(ValueError):
    """A trace file is not valid: the message names the file, the place and the field."""


def context_label(context: str | None) -> str:
    return UNTAGGED if context is None else context


def tier_sort_key(tier: str) -> tuple[int, int, str]:
    """gpu0 < gpu1 < ... < gpu10 < host < anything else."""
    if tier.startswith("gpu") and tier[3:].isdigit():
        return (0, int(tier[3:]), "")
    if tier == "host":
        return (1, 0, "")
    return (2, 0, tier)


# --------------------------------------------------------------------------------------
# Replay: the one interpretation of an event list.


@dataclasses.dataclass(frozen=True)
class Interval:
    """A stretch of time over which a context's state (running, parked) did not change."""

    context: str | None
    start_ns: int
    end_ns: int
    running: bool
    parked: bool
    open: bool = False             # still in this state when the trace ends

    @property
    def name(self) -> str:
        if self.running and self.parked:
            return "running (parked)"
        return "running" if self.running else "parked"


@dataclasses.dataclass(frozen=True)
class Move:
    """A finished move of a context's bytes between tiers (from one MOVE_END event)."""

    context: str | None
    src: str
    dst: str
    bytes: int
    start_ns: int
    dur_ns: int
    lane: int = 0                  # index among overlapping moves on the same src -> dst link

    @property
    def gib_s(self) -> float | None:
        """Bandwidth in GiB/s; None when the duration is 0."""
        if self.dur_ns <= 0:
            return None
        return self.bytes / 2**30 / (self.dur_ns / 1e9)


@dataclasses.dataclass
class Replay:
    """What a list of events says happened, ready to draw or sum up. Times are ns."""

    t0_ns: int                                     # earliest event time (0 if no events)
    end_ns: int                                    # latest t_ns + dur_ns
    contexts: list[str | None]                     # in order of first appearance
    intervals: list[Interval]                      # per context, non-overlapping, by start
    moves: list[Move]                              # by start
    # (t_ns, bytes per tier) after every change; every sample holds each tier seen so far.
    tier_samples: list[tuple[int, dict[str, int]]]
    # context -> (t_ns, bytes per tier of that context) after every change.
    context_samples: dict[str | None, list[tuple[int, dict[str, int]]]]
    # (t_ns, budget per tier) after every BUDGET event: what a tier may hold (device:
    # local budget; host: host budget), and what a device may lend to its peers.
    budget_samples: list[tuple[int, dict[str, int]]]
    lend_samples: list[tuple[int, dict[str, int]]]

    @property
    def tiers(self) -> list[str]:
        """Every tier that held bytes, gpu0 first, host last."""
        seen: set[str] = set()
        for _, tiers in self.tier_samples:
            seen.update(tiers)
        return sorted(seen, key=tier_sort_key)


def _effect_time(event: Event) -> int:
    # A move's bytes change tier when it ends.
    return event.t_ns + event.dur_ns if event.kind == EventKind.MOVE_END else event.t_ns


def _is_lend_budget(event: Event) -> bool:
    # The core marks a device's lend budget (vs its local budget) with addr 1.
    return event.args.get("budget") == "lend" or event.args.get("addr") == 1


_Piece = tuple[Any, str, int]     # (address or None, tier, bytes) of a MAP / UNMAP


def _take_pieces(pending: list[_Piece], segment: Event) -> dict[str, int]:
    """Remove from ``pending`` the pieces inside ``segment``; their bytes per tier."""
    base = segment.args.get("addr")
    split: dict[str, int] = {}
    kept: list[_Piece] = []
    for piece in pending:
        addr, tier, size = piece
        inside = (not isinstance(base, int) or not isinstance(addr, int)
                  or base <= addr < base + segment.bytes)
        if inside:
            split[tier] = split.get(tier, 0) + size
        else:
            kept.append(piece)
    pending[:] = kept
    return split


def _segment_split(event: Event, pieces: dict[str, int], held: dict[str, int],
                   tier: str | None) -> dict[str, int]:
    """Where a segment's bytes are, by tier: its MAP/UNMAP pieces, the rest on ``tier``
    (or, for a free that names none, the tier holding most of the context's bytes)."""
    rest = event.bytes - sum(pieces.values())
    if rest > 0:
        if tier is None:
            tier = (max(sorted(held, key=tier_sort_key), key=lambda t: held[t])
                    if held else UNKNOWN_TIER)
        pieces[tier] = pieces.get(tier, 0) + rest
    return pieces


def replay(events: Iterable[Event]) -> Replay:
    """Derive context states, moves and bytes per tier from events (in any order)."""
    events = sorted(events, key=lambda e: e.t_ns)
    t0_ns = events[0].t_ns if events else 0
    end_ns = max((e.t_ns + e.dur_ns for e in events), default=t0_ns)

    # Tracks: every tag, and the untagged "context" only if it holds bytes or has a state.
    contexts: dict[str | None, None] = {}
    for event in events:
        if event.context is not None or event.kind in _UNTAGGED_TRACK_KINDS:
            contexts.setdefault(event.context)

    # Context states, in event order.
    flags: dict[str | None, tuple[bool, bool]] = {}
    since: dict[str | None, int] = {}
    intervals: list[Interval] = []
    for event in events:
        ctx = event.context
        running, parked = flags.get(ctx, (False, False))
        if event.kind in _RUN_KINDS:
            new = (_RUN_KINDS[event.kind], parked)
        elif event.kind in _PARK_KINDS:
            new = (running, _PARK_KINDS[event.kind])
        elif event.kind in _END_KINDS:
            new = (False, False)
        else:
            continue
        if new == (running, parked):
            continue
        if (running or parked) and event.t_ns > since[ctx]:
            intervals.append(Interval(ctx, since[ctx], event.t_ns, running, parked))
        flags[ctx] = new
        since[ctx] = event.t_ns
    for ctx, (running, parked) in flags.items():
        if (running or parked) and end_ns > since[ctx]:
            intervals.append(Interval(ctx, since[ctx], end_ns, running, parked, open=True))
    intervals.sort(key=lambda i: (i.start_ns, i.end_ns))

    # Bytes per tier, in effect order (a move counts when it ends).
    tier_bytes: dict[str, int] = {}
    ctx_bytes: dict[str | None, dict[str, int]] = {}
    budgets: dict[str, int] = {}
    lends: dict[str, int] = {}
    tier_samples: list[tuple[int, dict[str, int]]] = []
    context_samples: dict[str | None, list[tuple[int, dict[str, int]]]] = {}
    budget_samples: list[tuple[int, dict[str, int]]] = []
    lend_samples: list[tuple[int, dict[str, int]]] = []
    raw_moves: list[Move] = []
    maps: dict[str | None, list[_Piece]] = {}      # pieces mapped, not yet claimed by a segment
    unmaps: dict[str | None, list[_Piece]] = {}

    def add(ctx: str | None, tier: str, delta: int) -> None:
        tier_bytes[tier] = tier_bytes.get(tier, 0) + delta
        held = ctx_bytes.setdefault(ctx, {})
        held[tier] = held.get(tier, 0) + delta

    def sample(samples: list[tuple[int, dict[str, int]]], t: int, values: dict[str, int]) -> None:
        if samples and samples[-1][0] == t:
            samples[-1] = (t, dict(values))      # keep the last value of an instant
        else:
            samples.append((t, dict(values)))

    for event in sorted(events, key=_effect_time):
        ctx = event.context
        t = _effect_time(event)
        if event.kind == EventKind.MAP:
            maps.setdefault(ctx, []).append((event.args.get("addr"), event.dst or UNKNOWN_TIER,
                                             event.bytes))
            continue
        elif event.kind == EventKind.UNMAP:
            unmaps.setdefault(ctx, []).append((event.args.get("addr"), event.src or UNKNOWN_TIER,
                                               event.bytes))
            continue
        elif event.kind == EventKind.SEGMENT_ALLOC:
            pieces = _take_pieces(maps.get(ctx, []), event)
            for tier, size in _segment_split(event, pieces, {}, event.dst or event.src
                                             or UNKNOWN_TIER).items():
                add(ctx, tier, size)
        elif event.kind == EventKind.SEGMENT_FREE:
            pieces = _take_pieces(unmaps.get(ctx, []), event)
            for tier, size in _segment_split(event, pieces, ctx_bytes.get(ctx, {}),
                                             event.src or event.dst).items():
                add(ctx, tier, -size)
        elif event.kind == EventKind.MOVE_END:
            src = event.src or UNKNOWN_TIER
            dst = event.dst or UNKNOWN_TIER
            add(ctx, src, -event.bytes)
            add(ctx, dst, event.bytes)
            raw_moves.append(Move(ctx, src, dst, event.bytes, event.t_ns, event.dur_ns))
        elif event.kind == EventKind.BUDGET:
            tier = event.dst or event.src or UNKNOWN_TIER
            if _is_lend_budget(event):
                lends[tier] = event.bytes
                sample(lend_samples, t, lends)
            else:
                budgets[tier] = event.bytes
                sample(budget_samples, t, budgets)
            continue
        else:
            continue
        sample(tier_samples, t, tier_bytes)
        sample(context_samples.setdefault(ctx, []), t, ctx_bytes.setdefault(ctx, {}))

    # Lanes: overlapping moves on one link go to separate tracks (Chrome slices must nest).
    moves: list[Move] = []
    lane_ends: dict[tuple[str, str], list[int]] = {}
    for move in sorted(raw_moves, key=lambda m: (m.start_ns, m.dur_ns)):
        ends = lane_ends.setdefault((move.src, move.dst), [])
        lane = next((i for i, end in enumerate(ends) if end <= move.start_ns), len(ends))
        if lane == len(ends):
            ends.append(0)
        ends[lane] = move.start_ns + move.dur_ns
        moves.append(dataclasses.replace(move, lane=lane))

    return Replay(
        t0_ns=t0_ns, end_ns=end_ns, contexts=list(contexts), intervals=intervals,
        moves=moves, tier_samples=tier_samples, context_samples=context_samples,
        budget_samples=budget_samples, lend_samples=lend_samples,
    )


# --------------------------------------------------------------------------------------
# Writer.


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


def _write_atomically(path: Path, data: bytes) -> None:
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
    _write_atomically(path, _dumps(trace).encode("utf-8"))
    return path


# --------------------------------------------------------------------------------------
# Reader.


@dataclasses.dataclass(frozen=True)
class Trace:
    """A trace read back and validated."""

    version: int
    t0_ns: int
    events: list[Event]                       # sorted by t_ns
    num_core_events_dropped: int
    num_python_events_dropped: int
    info: dict[str, Any]                      # the writer's extra_metadata
    trace_events: list[dict[str, Any]]        # the Chrome events, as written


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return f"<deeply nested {_type_name(value)}>"
    return text if len(text) <= 40 else text[:37] + "..."


# The widest integers a trace may hold: anything a signed or an unsigned 64-bit field can carry.
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> TraceFormatError:
        return TraceFormatError(f"{self.source}: {where}: {message}")

    def get(self, obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise self.fail(where, f"missing field {key!r}")
        return obj[key]

    def int_(self, value: Any, where: str, *, minimum: int | None = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"expected an integer, got {_type_name(value)} {_short(value)}")
        # JSON integers have no size limit, but every integer the writer emits fits in 64 bits
        # (signed or unsigned). Larger ones would be accepted here and then overflow later, when
        # summarize or plot turns them into floats (OverflowError past ~1e308), so refuse them now.
        # The message gives the width, not the digits: repr() of a huge int can itself fail.
        if not _INT64_MIN <= value <= _UINT64_MAX:
            width = value.bit_length() if value >= 0 else (~value).bit_length() + 1  # two's complement
            raise self.fail(where, f"expected an integer that fits in 64 bits, got one of {width} bits")
        if minimum is not None and value < minimum:
            raise self.fail(where, f"expected an integer >= {minimum}, got {value}")
        return value

    def number(self, value: Any, where: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.fail(where, f"expected a number, got {_type_name(value)} {_short(value)}")
        return value

    def str_(self, value: Any, where: str, *, nullable: bool = False) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            expected = "a string or null" if nullable else "a string"
            raise self.fail(where, f"expected {expected}, got {_type_name(value)} {_short(value)}")
        # JSON's "\ud800" escape decodes to a lone surrogate, which no UTF-8 text can hold: printing
        # the summary would raise UnicodeEncodeError and plotting would fail in matplotlib.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise self.fail(where, f"string holds a lone surrogate (U+{ord(value[e.start]):04X}) at "
                                   f"index {e.start}, which is not valid Unicode text") from None
        return value

    def list_(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {_type_name(value)}")
        return value

    def dict_(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {_type_name(value)}")
        return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_trace(data: bytes | str, source: str = "<trace>") -> Trace:
    """Parse and validate a trace; raise TraceFormatError naming the place and the field."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TraceFormatError(f"{source}: not UTF-8 text (byte {e.start})") from None
    if not data.strip():
        raise TraceFormatError(f"{source}: empty file")
    try:
        obj = json.loads(data, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        truncated = e.pos >= len(data.rstrip()) or e.msg.startswith("Unterminated string")
        hint = " (truncated?)" if truncated else ""
        raise TraceFormatError(
            f"{source}: not valid JSON{hint}: {e.msg}, line {e.lineno} column {e.colno}"
        ) from None
    except ValueError as e:   # NaN / Infinity
        raise TraceFormatError(f"{source}: not valid JSON: {e}") from None
    except RecursionError:
        raise TraceFormatError(f"{source}: not valid JSON: nested too deeply") from None
    return parse_trace(obj, source)


def parse_trace(obj: Any, source: str = "<trace>") -> Trace:
    """Validate an already-loaded JSON value as a trace."""
    c = _Checker(source)
    if not isinstance(obj, dict):
        raise c.fail("top level", f"expected a JSON object with traceEvents and metadata, "
                                  f"got {_type_name(obj)}")
    trace_events = c.list_(c.get(obj, "traceEvents", "top level"), "traceEvents")
    meta = c.dict_(c.get(obj, "metadata", "top level"), "metadata")
    fmt = c.get(meta, "format", "metadata")
    if fmt != FORMAT_NAME:
        raise c.fail("metadata.format", f"expected {FORMAT_NAME!r}, got {_short(fmt)} "
                                        "(not an aqua_alloc trace)")
    version = c.int_(c.get(meta, "version", "metadata"), "metadata.version", minimum=1)
    if version > FORMAT_VERSION:
        raise c.fail("metadata.version", f"version {version} is newer than this reader "
                                         f"(version {FORMAT_VERSION}); upgrade aqua_alloc")
    t0_ns = c.int_(c.get(meta, "t0_ns", "metadata"), "metadata.t0_ns")
    dropped = c.dict_(c.get(meta, "num_events_dropped", "metadata"), "metadata.num_events_dropped")
    num_core = c.int_(c.get(dropped, "core", "metadata.num_events_dropped"),
                      "metadata.num_events_dropped.core")
    num_python = c.int_(c.get(dropped, "python", "metadata.num_events_dropped"),
                        "metadata.num_events_dropped.python")
    info = c.dict_(meta.get("info", {}), "metadata.info")

    fields = c.list_(c.get(meta, "event_fields", "metadata"), "metadata.event_fields")
    index: dict[str, int] = {}
    for i, name in enumerate(fields):
        c.str_(name, f"metadata.event_fields[{i}]")
        if name in index:
            raise c.fail(f"metadata.event_fields[{i}]", f"duplicate field {name!r}")
        index[name] = i
    for name in EVENT_FIELDS:
        if name not in index:
            raise c.fail("metadata.event_fields", f"missing field {name!r}")

    rows = c.list_(c.get(meta, "events", "metadata"), "metadata.events")
    events: list[Event] = []
    previous_t = -1
    for i, row in enumerate(rows):
        where = f"metadata.events[{i}]"
        c.list_(row, where)
        if len(row) != len(fields):
            raise c.fail(where, f"expected {len(fields)} fields, got {len(row)}")
        v = {name: row[index[name]] for name in EVENT_FIELDS}
        t_ns = c.int_(v["t_ns"], f"{where}.t_ns")
        if t_ns < previous_t:
            raise c.fail(f"{where}.t_ns", f"{t_ns} is earlier than the previous event's "
                                          f"{previous_t} (events must be sorted by time)")
        previous_t = t_ns
        kind_name = c.str_(v["kind"], f"{where}.kind")
        try:
            kind = EventKind(kind_name)
        except ValueError:
            raise c.fail(f"{where}.kind", f"unknown event kind {_short(kind_name)}") from None
        events.append(Event(
            t_ns=t_ns,
            kind=kind,
            context=c.str_(v["context"], f"{where}.context", nullable=True),
            src=c.str_(v["src"], f"{where}.src", nullable=True),
            dst=c.str_(v["dst"], f"{where}.dst", nullable=True),
            bytes=c.int_(v["bytes"], f"{where}.bytes"),
            dur_ns=c.int_(v["dur_ns"], f"{where}.dur_ns"),
            status=c.int_(v["status"], f"{where}.status", minimum=None),
            args=c.dict_(v["args"], f"{where}.args"),
        ))

    for i, te in enumerate(trace_events):
        where = f"traceEvents[{i}]"
        c.dict_(te, where)
        ph = c.str_(c.get(te, "ph", where), f"{where}.ph")
        if "name" in te:
            c.str_(te["name"], f"{where}.name")
        for key in ("pid", "tid"):
            if key in te:
                c.int_(te[key], f"{where}.{key}", minimum=None)
        if ph != "M":
            c.number(c.get(te, "ts", where), f"{where}.ts")
        if ph == "X" and c.number(c.get(te, "dur", where), f"{where}.dur") < 0:
            raise c.fail(f"{where}.dur", f"expected a duration >= 0, got {te['dur']}")
        if "args" in te:
            c.dict_(te["args"], f"{where}.args")

    return Trace(version=version, t0_ns=t0_ns, events=events, num_core_events_dropped=num_core,
                 num_python_events_dropped=num_python, info=info, trace_events=trace_events)


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and validate a trace file. OSError if it cannot be read, else TraceFormatError."""
    with open(path, "rb") as f:
        data = f.read()
    return loads_trace(data, source=str(path))


# --------------------------------------------------------------------------------------
# Collecting events and dumping them, on demand and at exit.

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
    _write_atomically(path, pickle.dumps(snapshot))
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
