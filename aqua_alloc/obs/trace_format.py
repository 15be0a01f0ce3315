"""The trace file format: its name, version and event row, the error a reader raises, and
what a reader gives back. The format is documented in docs/trace-format.md; bump
:data:`FORMAT_VERSION` when it changes. One writer (:mod:`aqua_alloc.obs.trace_writer`) and
one validating reader (:mod:`aqua_alloc.obs.trace_reader`) use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aqua_alloc.obs.events import Event

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "EVENT_FIELDS", "TraceFormatError", "Trace"]

FORMAT_NAME = "aqua_alloc.trace"
FORMAT_VERSION = 1
# Order of the fields of one event row in ``metadata.events`` (written into every trace).
EVENT_FIELDS = ("t_ns", "kind", "context", "src", "dst", "bytes", "dur_ns", "status", "args")


class TraceFormatError(ValueError):
    """A trace file is not valid: the message names the file, the place and the field."""


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
