"""The one validating trace reader: a trace file -> :class:`~aqua_alloc.obs.trace_format.Trace`,
or :class:`~aqua_alloc.obs.trace_format.TraceFormatError` naming the file, the place and the
field."""

from __future__ import annotations

import json
import os
from typing import Any

from aqua_alloc.obs.events import Event, EventKind
from aqua_alloc.obs.trace_format import EVENT_FIELDS, FORMAT_NAME, FORMAT_VERSION, Trace, TraceFormatError

__all__ = ["read_trace", "loads_trace", "parse_trace"]


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
