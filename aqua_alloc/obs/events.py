"""Typed events: what the C++ core, the scheduler and the coordinator client record,
drained by whoever traces them.

One event is one thing that happened at one instant (``t_ns``) or over an interval
(``t_ns`` .. ``t_ns + dur_ns``). Times are ``CLOCK_MONOTONIC`` nanoseconds: the C++ core's
``std::chrono::steady_clock`` and Python's ``time.monotonic_ns()`` read the same clock on
Linux, so core and scheduler events interleave correctly.

Tiers are named ``"gpu<N>"`` (CUDA device ordinal N, or simulated device N) and ``"host"``.

The queue of Python-side events is bounded (``AQUA_TRACE_EVENTS``, default 1,000,000) and
counts what it drops, like the core's ring buffer. Tracing stays out of the logic: code
calls :func:`emit` and never reads events back.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading
import time
from typing import Any, Callable, Iterable


class EventKind(str, enum.Enum):
    """Every kind of event. Values are the names written into traces."""

    # Recorded by the C++ core (numbers are the ``aqua_event.kind`` codes of csrc/aqua_alloc.h).
    SEGMENT_ALLOC = "segment_alloc"      # a VA segment was created for a context: bytes, dst tier
    SEGMENT_FREE = "segment_free"        # a segment was freed: bytes
    MAP = "map"                          # a backing was mapped: bytes, dst tier
    UNMAP = "unmap"                      # a backing was unmapped: bytes, src tier
    MOVE_START = "move_start"            # bytes of a context start moving src -> dst
    MOVE_END = "move_end"                # the move finished: bytes, dur_ns (GiB/s = bytes / dur)
    MOVE_FAILED = "move_failed"          # the move failed and was rolled back: status = error code
    BUDGET = "budget"                    # a tier's budget changed: bytes = new budget, dst tier
    ALLOC_FAILED = "alloc_failed"        # an allocation found no tier with room: bytes
    CONTEXT_PARK = "context_park"        # a context was marked not running
    CONTEXT_RESUME = "context_resume"    # a context was marked running again
    CONTEXT_CREATE = "context_create"
    CONTEXT_RELEASE = "context_release"
    # Recorded in Python by the scheduler.
    PROMPT_ARRIVED = "prompt_arrived"
    FIRST_TOKEN = "first_token"
    SLICE_START = "slice_start"
    SLICE_END = "slice_end"
    PARKED = "parked"
    RESUMED = "resumed"
    FINISHED = "finished"
    # Recorded in Python by the coordinator client (lending between processes). ``dst``
    # (``src`` for lend_release) is this process's tier of the GPU; args.gpu its GPU key.
    LEND_OFFER = "lend_offer"                      # this process offers bytes of its GPU
    LEND_BORROW = "lend_borrow"                    # bytes granted on another process's GPU
    LEND_RELEASE = "lend_release"                  # bytes of a borrowed GPU given back (args.reason)
    LEND_RECLAIM = "lend_reclaim"                  # bytes asked back (args.role: lender or borrower)
    LEND_RECLAIMED = "lend_reclaimed"              # a lender's reclaim is complete: bytes are back
    LEND_RECLAIM_TIMEOUT = "lend_reclaim_timeout"  # borrowers did not confirm in time


# The core's numeric kind codes (csrc/aqua_alloc.h, enum aqua_event_kind) -> EventKind.
CORE_KIND_CODES: dict[int, EventKind] = {
    1: EventKind.SEGMENT_ALLOC,
    2: EventKind.SEGMENT_FREE,
    3: EventKind.MAP,
    4: EventKind.UNMAP,
    5: EventKind.MOVE_START,
    6: EventKind.MOVE_END,
    7: EventKind.MOVE_FAILED,
    8: EventKind.BUDGET,
    9: EventKind.ALLOC_FAILED,
    10: EventKind.CONTEXT_PARK,
    11: EventKind.CONTEXT_RESUME,
    12: EventKind.CONTEXT_CREATE,
    13: EventKind.CONTEXT_RELEASE,
}


@dataclasses.dataclass(frozen=True)
class Event:
    """One event. Fields that do not apply to a kind are None (or 0 for sizes)."""

    t_ns: int                      # CLOCK_MONOTONIC ns at the start
    kind: EventKind
    context: str | None = None     # context tag (scheduler: the prompt's tag)
    src: str | None = None         # tier the bytes left ("gpu0", "host")
    dst: str | None = None         # tier the bytes went to
    bytes: int = 0                 # bytes concerned
    dur_ns: int = 0                # duration, ns (moves)
    status: int = 0                # 0 ok, else the driver's or core's error code
    args: dict[str, Any] = dataclasses.field(default_factory=dict)  # kind-specific extras


_DEFAULT_CAPACITY = 1_000_000


class EventQueue:
    """A bounded, thread-safe FIFO of events; counts what it drops when full."""

    def __init__(self, capacity: int = _DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError(f"event queue capacity must be positive, got {capacity}")
        self._lock = threading.Lock()
        self._events: collections.deque[Event] = collections.deque()
        self._capacity = capacity
        self.num_dropped = 0

    def put(self, event: Event) -> None:
        with self._lock:
            if len(self._events) >= self._capacity:
                self.num_dropped += 1
                return
            self._events.append(event)

    def extend(self, events: Iterable[Event]) -> None:
        for event in events:
            self.put(event)

    def drain(self) -> list[Event]:
        """Take every queued event out, oldest first."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            return events


_python_events = EventQueue()


def emit(kind: EventKind, context: str | None = None, **args: Any) -> None:
    """Record a Python-side (scheduler) event now. Never raises on a full queue."""
    _python_events.put(Event(t_ns=time.monotonic_ns(), kind=kind, context=context, args=args))


def record(event: Event) -> None:
    """Record a Python-side event built by the caller (for kinds that carry bytes or
    tiers, not only args). Never raises on a full queue."""
    _python_events.put(event)


def drain_python_events() -> list[Event]:
    return _python_events.drain()


def num_python_events_dropped() -> int:
    return _python_events.num_dropped


@dataclasses.dataclass(frozen=True)
class EventSource:
    """Events recorded below Python (the C++ core's ring buffer), handed up by the layer that
    owns them: ``drain()`` takes the new events out; ``num_dropped()`` counts those lost so
    far. Either may raise (a core that is not loaded): collectors then take none from it."""

    drain: Callable[[], list[Event]]
    num_dropped: Callable[[], int]


_sources: dict[str, EventSource] = {}


def register_source(name: str, source: EventSource) -> None:
    """Make ``source``'s events part of every trace collected from now on (``name``: "core").
    Registering a name again replaces its source. The memory layer registers the core's, so
    this bottom layer never imports upward."""
    _sources[name] = source


def unregister_source(name: str) -> None:
    _sources.pop(name, None)


def sources() -> dict[str, EventSource]:
    """The registered sources by name (a copy)."""
    return dict(_sources)
