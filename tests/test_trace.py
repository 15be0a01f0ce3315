"""Trace writer, validating reader, summaries, plot, dumps and exit hooks (CPU, no timing).

The known trace (``known_events``) is also committed as tests/data/small_trace.json, the
format's golden file: regenerate it with ``PYTHONPATH=. python tests/test_trace.py`` when
the format changes on purpose (and bump trace_format.FORMAT_VERSION).
"""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqua_alloc.obs import events as ev
from aqua_alloc.obs import trace
from aqua_alloc.obs import replay, trace_format, trace_reader, trace_writer
from aqua_alloc.obs.events import Event, EventKind, EventQueue
from aqua_alloc.obs.trace_format import TraceFormatError
from aqua_alloc.obs.summary import format_summary, percentile, summarize

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "small_trace.json"
GiB = 2**30
MS = 1_000_000
T0 = 5_000_000_000          # traces start at an arbitrary monotonic time


def e(t_ms: float, kind: EventKind, context: str | None = None, **fields) -> Event:
    return Event(t_ns=T0 + int(t_ms * MS), kind=kind, context=context, **fields)


def known_events() -> list[Event]:
    """Two prompts time-sharing gpu0; a parks on gpu1, b on host. Numbers in test_summary."""
    K = EventKind
    return [
        e(0, K.BUDGET, dst="gpu1", bytes=8 * GiB),
        e(0, K.CONTEXT_CREATE, "a"),
        e(0, K.PROMPT_ARRIVED, "a", args={"prompt_tokens": 7}),
        e(0, K.SEGMENT_ALLOC, "a", dst="gpu0", bytes=2 * GiB),
        e(1, K.SLICE_START, "a"),
        e(5, K.PROMPT_ARRIVED, "b"),
        e(5, K.CONTEXT_CREATE, "b"),
        e(10, K.FIRST_TOKEN, "a"),
        e(20, K.SLICE_END, "a"),
        e(20, K.PARKED, "a"),
        e(20, K.CONTEXT_PARK, "a"),            # the core's own record of the same park
        e(20, K.MOVE_START, "a", src="gpu0", dst="gpu1", bytes=2 * GiB),
        e(20, K.MOVE_END, "a", src="gpu0", dst="gpu1", bytes=2 * GiB, dur_ns=10 * MS),
        e(21, K.SEGMENT_ALLOC, "b", dst="gpu0", bytes=1 * GiB),
        e(21, K.SLICE_START, "b"),
        e(45, K.FIRST_TOKEN, "b"),
        e(49, K.MOVE_FAILED, "b", src="gpu0", dst="gpu1", bytes=1 * GiB, status=2),
        e(50, K.SLICE_END, "b"),
        e(50, K.PARKED, "b"),
        e(50, K.MOVE_END, "b", src="gpu0", dst="host", bytes=1 * GiB, dur_ns=20 * MS),
        e(55, K.MOVE_END, "a", src="gpu1", dst="gpu0", bytes=2 * GiB, dur_ns=5 * MS),
        e(60, K.RESUMED, "a"),
        e(60, K.SLICE_START, "a"),
        e(80, K.SLICE_END, "a"),
        e(80, K.FINISHED, "a"),
        e(80, K.SEGMENT_FREE, "a", src="gpu0", bytes=2 * GiB),
        e(90, K.CONTEXT_RESUME, "b"),
        e(90, K.SLICE_START, "b"),
        e(95, K.ALLOC_FAILED, bytes=3 * GiB),
        e(100, K.FINISHED, "b"),
        e(100, K.SEGMENT_FREE, "b", src="host", bytes=1 * GiB),
    ]


def random_core_events(seed: int, num_gpus: int = 8, steps: int = 400) -> list[Event]:
    """Events as the C++ core records them: a segment is MAP events (one per piece, on its
    tier) then SEGMENT_ALLOC (dst: the first piece's tier); a move of one piece is
    MOVE_START + MOVE_END; a free is UNMAP per piece (src: where it is now) then SEGMENT_FREE
    naming no tier. Some segments spill: pieces on two tiers."""
    rng = random.Random(seed)
    tiers = [f"gpu{i}" for i in range(num_gpus)] + ["host"]
    segments: list[tuple[str, int, list[list]]] = []    # (context, base address, [[tier, bytes]])
    out: list[Event] = []
    t = T0
    next_addr = 1 << 40
    for _ in range(steps):
        t += rng.randrange(1, 5000)
        action = rng.random()
        if action < 0.4 or not segments:
            ctx = f"ctx{rng.randrange(12)}"
            chunk = rng.choice([2, 20, 64]) * 2**20
            pieces = [["gpu0", chunk]]
            if rng.random() < 0.3:                       # spilled to a peer
                pieces.append([rng.choice(tiers[1:]), chunk])
            base, next_addr = next_addr, next_addr + 2 * chunk
            for k, (tier, size) in enumerate(pieces):
                out.append(Event(t, EventKind.MAP, ctx, dst=tier, bytes=size,
                                 args={"addr": base + k * chunk}))
            out.append(Event(t, EventKind.SEGMENT_ALLOC, ctx, dst=pieces[0][0],
                             bytes=sum(p[1] for p in pieces), args={"addr": base}))
            segments.append((ctx, base, pieces))
        elif action < 0.8:
            ctx, base, pieces = rng.choice(segments)
            piece = rng.choice(pieces)
            src = piece[0]
            dst = rng.choice([x for x in tiers if x != src])
            dur = rng.randrange(0, 100_000)
            out.append(Event(t, EventKind.MOVE_START, ctx, src=src, dst=dst, bytes=piece[1]))
            out.append(Event(t, EventKind.MOVE_END, ctx, src=src, dst=dst, bytes=piece[1],
                             dur_ns=dur, args={"addr": base}))
            piece[0] = dst
            t += dur     # the next event comes after this move's effect
        else:
            ctx, base, pieces = segments.pop(rng.randrange(len(segments)))
            for k, (tier, size) in enumerate(pieces):
                out.append(Event(t, EventKind.UNMAP, ctx, src=tier, bytes=size,
                                 args={"addr": base + k * size}))
            out.append(Event(t, EventKind.SEGMENT_FREE, ctx, bytes=sum(p[1] for p in pieces),
                             args={"addr": base}))
    return out


def brute_force_tier_bytes(events: list[Event]) -> list[dict[str, int]]:
    """Bytes per tier after each event, from MAP/UNMAP/MOVE_END alone (the core's truth)."""
    level: dict[str, int] = {}
    out = []
    for x in sorted(events, key=lambda x: x.t_ns + x.dur_ns if x.kind == EventKind.MOVE_END else x.t_ns):
        if x.kind == EventKind.MAP:
            level[x.dst] = level.get(x.dst, 0) + x.bytes
        elif x.kind == EventKind.UNMAP:
            level[x.src] -= x.bytes
        elif x.kind == EventKind.MOVE_END:
            level[x.src] -= x.bytes
            level[x.dst] = level.get(x.dst, 0) + x.bytes
        out.append(dict(level))
    return out


def write_and_read(tmp_path: Path, events: list[Event], **kwargs) -> trace_format.Trace:
    path = trace_writer.write_trace(tmp_path / "t.json", events, **kwargs)
    return trace_reader.read_trace(path)


# --------------------------------------------------------------------------------------
# Round trips and the Chrome side of the format.


def test_round_trip_keeps_every_event(tmp_path):
    events = known_events()
    back = write_and_read(tmp_path, events, num_core_events_dropped=3, num_python_events_dropped=1)
    assert back.events == sorted(events, key=lambda x: x.t_ns)
    assert back.version == trace_format.FORMAT_VERSION
    assert back.t0_ns == T0
    assert (back.num_core_events_dropped, back.num_python_events_dropped) == (3, 1)


def test_round_trip_core_events_of_simulated_backend(tmp_path):
    events = random_core_events(seed=1)
    back = write_and_read(tmp_path, events)
    assert back.events == sorted(events, key=lambda x: x.t_ns)
    # Replaying a consistent core trace never makes a tier negative and ends where it should.
    rep = replay.replay(back.events)
    assert all(b >= 0 for _, tiers in rep.tier_samples for b in tiers.values())
    assert rep.tier_samples[-1][1] == brute_force_tier_bytes(events)[-1]


def test_events_out_of_order_are_sorted_and_plain_string_kinds_accepted(tmp_path):
    events = [Event(T0 + 5, "slice_end", "a"), Event(T0, "slice_start", "a")]
    back = write_and_read(tmp_path, events)
    assert [x.kind for x in back.events] == [EventKind.SLICE_START, EventKind.SLICE_END]
    assert summarize(back).contexts[0].running_ns == 5


def test_args_are_made_json_safe(tmp_path):
    events = [Event(T0, EventKind.PROMPT_ARRIVED, "a",
                    args={"shape": (1, 2), "nan": float("nan"), "obj": object, 3: "x"})]
    args = write_and_read(tmp_path, events).events[0].args
    assert args["shape"] == [1, 2]
    assert args["nan"] == "nan"
    assert args["3"] == "x"
    assert isinstance(args["obj"], str)


def test_unknown_kind_is_refused_by_the_writer(tmp_path):
    with pytest.raises(ValueError):
        trace_writer.write_trace(tmp_path / "t.json", [Event(T0, "no_such_kind")])


def test_chrome_events_tracks_slices_counters_moves():
    doc = trace_writer.build_trace(known_events())
    assert list(doc) == ["displayTimeUnit", "traceEvents", "metadata"]
    tes = doc["traceEvents"]
    names = {(t["pid"], t["tid"]): t["args"]["name"] for t in tes if t["name"] == "thread_name"}
    assert {"a", "b"} <= set(names.values())
    tid_a = next(k for k, v in names.items() if v == "a")
    slices_a = [(t["name"], t["ts"], t["dur"]) for t in tes
                if t["ph"] == "X" and (t["pid"], t["tid"]) == tid_a]
    assert slices_a == [("running", 1000.0, 19000.0), ("parked", 20000.0, 40000.0),
                        ("running", 60000.0, 20000.0)]
    moves = [t for t in tes if t["ph"] == "X" and t["cat"] == "move"]
    assert [(m["args"]["src"], m["args"]["dst"], m["args"]["bytes"], m["args"]["gib_s"])
            for m in moves] == [("gpu0", "gpu1", 2 * GiB, 200.0), ("gpu0", "host", GiB, 50.0),
                                ("gpu1", "gpu0", 2 * GiB, 400.0)]
    counters = [(t["ts"], t["args"]) for t in tes if t["ph"] == "C" and t["name"] == "bytes"]
    assert counters[0] == (0.0, {"gpu0": 2 * GiB})
    assert counters[-1] == (100000.0, {"gpu0": 0, "gpu1": 0, "host": 0})
    assert [t["args"] for t in tes if t["ph"] == "C" and t["name"] == "budget"] == [{"gpu1": 8 * GiB}]
    instants = {t["name"] for t in tes if t["ph"] == "i"}
    assert {"prompt_arrived", "first_token", "finished", "move_failed", "alloc_failed"} <= instants
    json.dumps(doc, allow_nan=False)


def test_slices_on_every_track_nest():
    """Chrome and Perfetto drop slices that overlap without nesting on one track."""
    events = random_core_events(seed=2) + [
        Event(T0 + 10 * i, EventKind.SLICE_START if i % 2 == 0 else EventKind.PARKED, "ctx1")
        for i in range(20)]
    tracks: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for t in trace_writer.build_trace(events)["traceEvents"]:
        if t["ph"] == "X":
            tracks.setdefault((t["pid"], t["tid"]), []).append((t["ts"], t["ts"] + t["dur"]))
    assert tracks
    for spans in tracks.values():
        spans.sort()
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            assert s2 >= e1 - 1e-6 or e2 <= e1 + 1e-6, (s1, e1, s2, e2)


def test_open_state_is_closed_at_the_end_and_marked():
    doc = trace_writer.build_trace([e(0, EventKind.PARKED, "a"), e(7, EventKind.PROMPT_ARRIVED, "b")])
    parked = [t for t in doc["traceEvents"] if t["ph"] == "X"]
    assert [(t["name"], t["dur"], t["args"]) for t in parked] == [("parked", 7000.0, {"open": True})]


def test_golden_file_matches_the_writer(tmp_path):
    path = trace_writer.write_trace(tmp_path / "t.json", known_events())
    assert path.read_bytes() == FIXTURE.read_bytes(), (
        "the trace format changed: bump FORMAT_VERSION if on purpose, then regenerate "
        "tests/data/small_trace.json (see this file's docstring)")


def test_empty_event_list_round_trips(tmp_path):
    back = write_and_read(tmp_path, [])
    assert back.events == []
    s = summarize(back)
    assert (s.duration_ns, s.contexts, s.tiers, s.links, s.ttft.count) == (0, [], [], [], 0)
    assert "0 events" in format_summary(s)


# --------------------------------------------------------------------------------------
# Summaries: exact numbers.


def test_summary_of_known_trace_is_exact():
    s = summarize(trace_reader.read_trace(FIXTURE))
    assert s.duration_ns == 100 * MS
    assert s.num_events == len(known_events())
    by_ctx = {c.context: c for c in s.contexts}
    assert list(by_ctx) == ["a", "b"]
    a, b = by_ctx["a"], by_ctx["b"]
    assert (a.running_ns, a.parked_ns, a.num_moves, a.bytes_moved, a.peak_bytes, a.ttft_ns) == (
        39 * MS, 40 * MS, 2, 4 * GiB, 2 * GiB, 10 * MS)
    assert (b.running_ns, b.parked_ns, b.num_moves, b.bytes_moved, b.peak_bytes, b.ttft_ns) == (
        39 * MS, 40 * MS, 1, GiB, GiB, 40 * MS)
    assert s.ttft.count == 2
    assert s.ttft.mean_ns == 25 * MS
    assert s.ttft.p50_ns == 25 * MS
    assert s.ttft.p99_ns == pytest.approx(39.7 * MS, rel=1e-12)
    assert s.ttft.max_ns == 40 * MS
    assert [(t.tier, t.peak_bytes, t.final_bytes) for t in s.tiers] == [
        ("gpu0", 3 * GiB, 0), ("gpu1", 2 * GiB, 0), ("host", GiB, 0)]
    assert [(l.src, l.dst, l.num_moves, l.bytes, l.dur_ns, l.gib_s) for l in s.links] == [
        ("gpu0", "gpu1", 1, 2 * GiB, 10 * MS, 200.0),
        ("gpu0", "host", 1, GiB, 20 * MS, 50.0),
        ("gpu1", "gpu0", 1, 2 * GiB, 5 * MS, 400.0)]
    assert (s.num_move_failures, s.num_alloc_failures) == (1, 1)
    text = format_summary(s)
    assert "p50 25.000 ms" in text and "400.00 GiB/s" in text


def test_summary_counts_dropped_events(tmp_path):
    s = summarize(write_and_read(tmp_path, known_events(), num_core_events_dropped=4))
    assert s.num_core_events_dropped == 4
    assert "WARNING: events dropped" in format_summary(s)


def test_summary_of_core_events_matches_a_direct_count():
    events = random_core_events(seed=3)
    s = summarize(events)
    moves = [x for x in events if x.kind == EventKind.MOVE_END]
    assert sum(c.bytes_moved for c in s.contexts) == sum(m.bytes for m in moves)
    assert sum(l.num_moves for l in s.links) == len(moves)
    levels = brute_force_tier_bytes(events)
    peaks = {tier: max(level.get(tier, 0) for level in levels) for tier in levels[-1]}
    assert {t.tier: t.peak_bytes for t in s.tiers} == peaks
    assert {t.tier: t.final_bytes for t in s.tiers} == levels[-1]


def test_spilled_segment_is_split_by_its_pieces():
    K = EventKind
    s = summarize([
        e(0, K.MAP, "a", dst="gpu0", bytes=2 * GiB, args={"addr": 4096}),
        e(0, K.MAP, "a", dst="gpu1", bytes=GiB, args={"addr": 4096 + 2 * GiB}),
        e(0, K.SEGMENT_ALLOC, "a", dst="gpu0", bytes=3 * GiB, args={"addr": 4096}),
        e(1, K.MOVE_END, "a", src="gpu0", dst="host", bytes=2 * GiB, dur_ns=MS),
        e(3, K.UNMAP, "a", src="host", bytes=2 * GiB, args={"addr": 4096}),
        e(3, K.UNMAP, "a", src="gpu1", bytes=GiB, args={"addr": 4096 + 2 * GiB}),
        e(3, K.SEGMENT_FREE, "a", bytes=3 * GiB, args={"addr": 4096}),
    ])
    assert [(t.tier, t.peak_bytes, t.final_bytes) for t in s.tiers] == [
        ("gpu0", 2 * GiB, 0), ("gpu1", GiB, 0), ("host", 2 * GiB, 0)]
    assert s.contexts[0].peak_bytes == 3 * GiB


def test_local_and_lend_budgets_are_separate_counters():
    K = EventKind
    doc = trace_writer.build_trace([e(0, K.BUDGET, dst="gpu0", bytes=100),
                             e(0, K.BUDGET, dst="gpu0", bytes=40, args={"addr": 1}),
                             e(1, K.BUDGET, dst="host", bytes=500)])
    counters = [(t["name"], t["ts"], t["args"]) for t in doc["traceEvents"] if t["ph"] == "C"]
    assert counters == [("budget", 0.0, {"gpu0": 100}), ("budget", 1000.0, {"gpu0": 100, "host": 500}),
                        ("lend budget", 0.0, {"gpu0": 40})]


def test_ttft_pairs_each_arrival_with_the_next_first_token():
    K = EventKind
    s = summarize([e(0, K.PROMPT_ARRIVED, "p"), e(3, K.FIRST_TOKEN, "p"), e(4, K.FIRST_TOKEN, "p"),
                   e(10, K.PROMPT_ARRIVED, "p"), e(11, K.FIRST_TOKEN, "p"),
                   e(12, K.PROMPT_ARRIVED, "q")])          # q never got a token
    assert s.ttft.count == 2
    assert (s.ttft.mean_ns, s.ttft.max_ns) == (2 * MS, 3 * MS)


def test_percentile_interpolates():
    values = list(range(101))
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50, 99, 100)
    assert percentile([10, 20], 25) == 12.5
    assert percentile([7], 99) == 7


def test_segment_free_without_src_uses_the_tier_holding_the_context():
    K = EventKind
    s = summarize([e(0, K.SEGMENT_ALLOC, "a", dst="gpu0", bytes=GiB),
                   e(1, K.MOVE_END, "a", src="gpu0", dst="host", bytes=GiB),
                   e(2, K.SEGMENT_FREE, "a", bytes=GiB)])
    assert [(t.tier, t.final_bytes) for t in s.tiers] == [("gpu0", 0), ("host", 0)]


# --------------------------------------------------------------------------------------
# The reader refuses bad input with the place and the field.


def valid_doc() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["metadata"]["events"][3].__setitem__(5, "2GiB"),
     "metadata.events[3].bytes: expected an integer, got str '2GiB'"),
    (lambda d: d["metadata"]["events"][4].__setitem__(5, -1),
     "metadata.events[4].bytes: expected an integer >= 0"),
    (lambda d: d["metadata"]["events"][2].__setitem__(1, "teleport"),
     "metadata.events[2].kind: unknown event kind 'teleport'"),
    (lambda d: d["metadata"]["events"][6].__setitem__(2, 5),
     "metadata.events[6].context: expected a string or null, got int 5"),
    (lambda d: d["metadata"]["events"][7].pop(),
     "metadata.events[7]: expected 9 fields, got 8"),
    (lambda d: d["metadata"]["events"][1].__setitem__(0, True),
     "metadata.events[1].t_ns: expected an integer, got bool"),
    (lambda d: d["metadata"]["events"][1].__setitem__(0, 0),
     "metadata.events[1].t_ns: 0 is earlier than the previous event's"),
    (lambda d: d["metadata"]["events"][8].__setitem__(8, []),
     "metadata.events[8].args: expected an object, got list"),
    (lambda d: d["metadata"].__setitem__("version", 99),
     "metadata.version: version 99 is newer than this reader"),
    (lambda d: d["metadata"].__setitem__("format", "chrome"),
     "metadata.format: expected 'aqua_alloc.trace'"),
    (lambda d: d["metadata"].pop("events"), "metadata: missing field 'events'"),
    (lambda d: d["metadata"]["num_events_dropped"].__setitem__("core", 1.5),
     "metadata.num_events_dropped.core: expected an integer, got float"),
    (lambda d: d["metadata"]["event_fields"].remove("dur_ns"),
     "metadata.event_fields: missing field 'dur_ns'"),
    (lambda d: d.pop("metadata"), "top level: missing field 'metadata'"),
    (lambda d: d.__setitem__("traceEvents", {}), "traceEvents: expected a list, got dict"),
    (lambda d: d["traceEvents"][12].__setitem__("ts", "soon"),
     "traceEvents[12].ts: expected a number, got str"),
    (lambda d: d["traceEvents"][12].pop("ph"), "traceEvents[12]: missing field 'ph'"),
])
def test_bad_fields_are_named(mutate, message):
    doc = valid_doc()
    mutate(doc)
    with pytest.raises(TraceFormatError) as info:
        trace_reader.loads_trace(json.dumps(doc), source="t.json")
    assert str(info.value).startswith("t.json: ")
    assert message in str(info.value)


@pytest.mark.parametrize("data, message", [
    (b"", "t.json: empty file"),
    (b"  \n", "t.json: empty file"),
    (b"\xff\xfe{", "t.json: not UTF-8 text"),
    (b"[1, 2]", "t.json: top level: expected a JSON object"),
    (b'{"traceEvents": [], "metadata": {"format": NaN}}', "not valid JSON: NaN"),
    (b"[" * 100_000, "t.json: not valid JSON"),
])
def test_bad_files_are_refused(data, message):
    with pytest.raises(TraceFormatError, match=None) as info:
        trace_reader.loads_trace(data, source="t.json")
    assert message in str(info.value)


def test_truncated_file_says_so():
    text = FIXTURE.read_text()
    with pytest.raises(TraceFormatError) as info:
        trace_reader.loads_trace(text[: len(text) // 2], source="t.json")
    assert "not valid JSON (truncated?)" in str(info.value)
    assert "line" in str(info.value)


def test_read_trace_of_a_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        trace_reader.read_trace(tmp_path / "nope.json")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _reads_or_refuses(data) -> None:
    try:
        trace_reader.loads_trace(data)
    except TraceFormatError:
        pass


@FUZZ
@given(json_values)
def test_fuzz_arbitrary_json(value):
    _reads_or_refuses(json.dumps(value))


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data):
    _reads_or_refuses(data)


@FUZZ
@given(st.integers(min_value=0), )
def test_fuzz_truncated(cut):
    text = FIXTURE.read_text()
    _reads_or_refuses(text[: cut % len(text)])


def _containers(obj, path=()):
    yield path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, child in items:
        yield from _containers(child, path + (key,))


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_trace(data):
    doc = valid_doc()
    places = [(p, o) for p, o in _containers(doc) if isinstance(o, (dict, list)) and o]
    path, container = data.draw(st.sampled_from(places))
    keys = list(container) if isinstance(container, dict) else list(range(len(container)))
    key = data.draw(st.sampled_from(keys))
    if data.draw(st.booleans()):
        container[key] = data.draw(json_values)
    else:
        del container[key]
    _reads_or_refuses(json.dumps(doc))


@FUZZ
@given(st.lists(st.builds(
    Event,
    t_ns=st.integers(0, 2**62),
    kind=st.sampled_from(list(EventKind)),
    context=st.none() | st.sampled_from(["a", "b", "c"]),
    src=st.none() | st.sampled_from(["gpu0", "gpu1", "host"]),
    dst=st.none() | st.sampled_from(["gpu0", "gpu1", "host"]),
    bytes=st.integers(0, 2**40),
    dur_ns=st.integers(0, 10**9),
    status=st.integers(-5, 5),
    args=st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=4), max_size=2),
), max_size=30))
def test_fuzz_any_event_list_round_trips(events):
    back = trace_reader.loads_trace(trace_writer._dumps(trace_writer.build_trace(events)))
    assert back.events == sorted(events, key=lambda x: x.t_ns)
    summarize(back)


# --------------------------------------------------------------------------------------
# Plot.


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_a_png_of_the_promised_size(tmp_path):
    pytest.importorskip("matplotlib")
    from aqua_alloc.obs.plot import figure_size_px, plot_trace
    out = plot_trace(trace_reader.read_trace(FIXTURE), tmp_path / "t.png")
    assert png_size(out) == figure_size_px(2) == (1200, 800)


def test_plot_grows_with_many_contexts_and_handles_no_events(tmp_path):
    pytest.importorskip("matplotlib")
    from aqua_alloc.obs.plot import figure_size_px, plot_trace
    events = random_core_events(seed=4, steps=200)
    num_contexts = len({x.context for x in events})
    assert png_size(plot_trace(events, tmp_path / "a.png")) == figure_size_px(num_contexts)
    many = [e(i, EventKind.SLICE_START, f"prompt{i}") for i in range(30)]
    assert png_size(plot_trace(many, tmp_path / "b.png")) == (1200, 1000)
    assert png_size(plot_trace([], tmp_path / "c.png")) == (1200, 800)


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    from aqua_alloc.obs.plot import PlotUnavailableError, plot_trace
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)     # None: "not installed" to import
    with pytest.raises(PlotUnavailableError, match=r"pip install 'aqua_alloc\[plot\]'"):
        plot_trace(known_events(), tmp_path / "t.png")


# --------------------------------------------------------------------------------------
# Collecting, dumping, exit hooks.


def test_event_queue_drops_and_counts_when_full():
    q = EventQueue(capacity=3)
    for i in range(5):
        q.put(Event(i, EventKind.SLICE_START, "a"))
    assert q.num_dropped == 2
    assert [x.t_ns for x in q.drain()] == [0, 1, 2]
    q.put(Event(9, EventKind.SLICE_END, "a"))
    assert [x.t_ns for x in q.drain()] == [9]
    assert q.num_dropped == 2
    with pytest.raises(ValueError):
        EventQueue(capacity=0)


@pytest.fixture
def clean_trace_state(monkeypatch):
    ev.drain_python_events()
    trace._reset_for_tests()
    monkeypatch.setattr(ev, "_sources", {})  # no real core: each test registers the source it needs
    yield
    ev.drain_python_events()
    trace._reset_for_tests()


def fake_core_source(events, dropped=0, fail=False) -> ev.EventSource:
    """A core event source as the memory layer registers it: hands out ``events`` once."""
    pending = list(events)

    def drain():
        if fail:
            raise RuntimeError("allocator not enabled")
        out = list(pending)
        pending.clear()
        return out

    return ev.EventSource(drain=drain, num_dropped=lambda: dropped)


def test_dump_keeps_earlier_events_for_later_dumps(tmp_path, clean_trace_state, monkeypatch):
    core = [Event(1, EventKind.SEGMENT_ALLOC, "a", dst="gpu0", bytes=GiB)]
    ev.register_source("core", fake_core_source(core, dropped=5))
    ev.emit(EventKind.PROMPT_ARRIVED, "a", prompt_tokens=3)
    first = trace_reader.read_trace(trace.dump(tmp_path / "1.json"))
    assert [x.kind for x in first.events] == [EventKind.SEGMENT_ALLOC, EventKind.PROMPT_ARRIVED]
    assert first.events[1].args == {"prompt_tokens": 3}
    assert first.num_core_events_dropped == 5
    assert first.info["pid"] > 0
    ev.emit(EventKind.FIRST_TOKEN, "a")
    second = trace_reader.read_trace(trace.dump(tmp_path / "2.json"))
    assert [x.kind for x in second.events] == [
        EventKind.SEGMENT_ALLOC, EventKind.PROMPT_ARRIVED, EventKind.FIRST_TOKEN]


def test_dump_without_a_working_allocator_has_no_core_events(tmp_path, clean_trace_state, monkeypatch):
    ev.register_source("core", fake_core_source([], fail=True))
    ev.emit(EventKind.SLICE_START, "a")
    back = trace_reader.read_trace(trace.dump(tmp_path / "t.json"))
    assert [x.kind for x in back.events] == [EventKind.SLICE_START]


def test_snapshot_without_cuda_writes_nothing_and_says_why(tmp_path, clean_trace_state, monkeypatch, caplog):
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    trace.dump(tmp_path / "t.json", snapshot=True)
    assert (tmp_path / "t.json").exists()
    assert not trace.snapshot_path_for(tmp_path / "t.json").exists()
    assert "CUDA is not available" in caplog.text


def test_snapshot_with_cuda_pickles_torch_snapshot(tmp_path, clean_trace_state, monkeypatch):
    snap = {"segments": [{"address": 1}], "device_traces": []}
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(
        is_available=lambda: True, memory=types.SimpleNamespace(_snapshot=lambda: snap)))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    trace.dump(tmp_path / "run.json", snapshot=True)
    path = tmp_path / "run.snapshot.pickle"
    assert path == trace.snapshot_path_for(tmp_path / "run.json")
    assert pickle.loads(path.read_bytes()) == snap


_EXIT_SCRIPT = textwrap.dedent("""
    import sys
    from aqua_alloc.obs import events, trace
    trace.install_exit_hook(sys.argv[1], snapshot=True)
    events.emit(events.EventKind.PROMPT_ARRIVED, "p")
    events.emit(events.EventKind.SLICE_START, "p")
    if sys.argv[2] == "crash":
        raise RuntimeError("boom")
""")


@pytest.mark.parametrize("how", ["exit", "crash"])
def test_exit_hook_writes_the_trace(tmp_path, how):
    out = tmp_path / "exit.json"
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(out), how],
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    if how == "crash":
        assert proc.returncode == 1
        assert "RuntimeError: boom" in proc.stderr      # the user's traceback still shows
    else:
        assert proc.returncode == 0, proc.stderr
    assert "no memory snapshot" in proc.stderr          # asked for, no torch: says why
    assert proc.stderr.count(f"[aqua_alloc] trace written to {out}") == 1   # once, not twice
    back = trace_reader.read_trace(out)
    assert [x.kind for x in back.events] == [EventKind.PROMPT_ARRIVED, EventKind.SLICE_START]
    assert not list(tmp_path.glob("*.pickle"))
    assert not list(tmp_path.glob(".*.tmp"))


if __name__ == "__main__":   # regenerate the golden file
    trace_writer.write_trace(FIXTURE, known_events())
    print(f"wrote {FIXTURE}")
