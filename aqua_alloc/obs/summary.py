"""Numbers from a trace: time running and parked per context, bytes moved, time to first
token, peak bytes per tier and move bandwidth. Consumes the events of a trace (as read by
:func:`aqua_alloc.obs.trace_reader.read_trace`) through :func:`aqua_alloc.obs.replay.replay`, so the
numbers are those the trace draws.

Units: times in ns (ints where exact), bytes, bandwidth in GiB/s (2**30 bytes per second).
Percentiles interpolate linearly between the two nearest ranks (numpy's default).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from aqua_alloc.obs.events import Event, EventKind
from aqua_alloc.obs.trace_format import Trace
from aqua_alloc.obs.replay import context_label, replay, tier_sort_key

__all__ = [
    "ContextSummary",
    "TtftSummary",
    "TierSummary",
    "LinkSummary",
    "TraceSummary",
    "percentile",
    "summarize",
    "format_summary",
]


@dataclasses.dataclass(frozen=True)
class ContextSummary:
    context: str                 # tag ("(untagged)" for events without one)
    running_ns: int              # time inside scheduler slices
    parked_ns: int               # time parked (PARKED/CONTEXT_PARK .. RESUMED/CONTEXT_RESUME)
    num_moves: int               # finished moves of its bytes
    bytes_moved: int             # sum of their bytes
    peak_bytes: int              # most bytes it held, all tiers together
    ttft_ns: int | None          # first PROMPT_ARRIVED -> next FIRST_TOKEN, if both seen


@dataclasses.dataclass(frozen=True)
class TtftSummary:
    """Time to first token over every prompt (PROMPT_ARRIVED -> next FIRST_TOKEN, same tag)."""

    count: int
    mean_ns: float | None
    p50_ns: float | None
    p99_ns: float | None
    max_ns: int | None


@dataclasses.dataclass(frozen=True)
class TierSummary:
    tier: str                    # "gpu<N>", "host"
    peak_bytes: int              # most bytes resident at once
    final_bytes: int             # bytes resident when the trace ends


@dataclasses.dataclass(frozen=True)
class LinkSummary:
    """Finished moves from one tier to another."""

    src: str
    dst: str
    num_moves: int
    bytes: int
    dur_ns: int                  # sum of move durations
    gib_s: float | None          # bytes / dur (aggregate; None if no duration was recorded)
    min_gib_s: float | None      # slowest single move
    max_gib_s: float | None      # fastest single move


@dataclasses.dataclass(frozen=True)
class TraceSummary:
    duration_ns: int                    # first event .. last event end
    num_events: int
    num_core_events_dropped: int
    num_python_events_dropped: int
    contexts: list[ContextSummary]      # in order of first appearance
    ttft: TtftSummary
    tiers: list[TierSummary]            # gpu0, gpu1, ..., host
    links: list[LinkSummary]            # by src, dst
    num_move_failures: int
    num_alloc_failures: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def percentile(sorted_values: list[int] | list[float], p: float) -> float:
    """The p-th percentile (0..100) of non-empty sorted values, linear interpolation."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = p / 100 * (len(sorted_values) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = rank - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def _ttfts(events: list[Event]) -> dict[str | None, list[int]]:
    """Per tag, the time to first token of each prompt, in order."""
    waiting: dict[str | None, list[int]] = {}
    ttfts: dict[str | None, list[int]] = {}
    for event in events:
        if event.kind == EventKind.PROMPT_ARRIVED:
            waiting.setdefault(event.context, []).append(event.t_ns)
        elif event.kind == EventKind.FIRST_TOKEN and waiting.get(event.context):
            arrived = waiting[event.context].pop(0)
            ttfts.setdefault(event.context, []).append(event.t_ns - arrived)
    return ttfts


def _gib_s(num_bytes: int, dur_ns: int) -> float | None:
    return None if dur_ns <= 0 else num_bytes / 2**30 / (dur_ns / 1e9)


def summarize(trace: Trace | Iterable[Event]) -> TraceSummary:
    """Summarize a trace read from a file, or a list of events."""
    if isinstance(trace, Trace):
        events = trace.events
        dropped_core, dropped_python = trace.num_core_events_dropped, trace.num_python_events_dropped
    else:
        events = sorted(trace, key=lambda e: e.t_ns)
        dropped_core = dropped_python = 0
    rep = replay(events)
    ttfts = _ttfts(events)

    running: dict[str | None, int] = {}
    parked: dict[str | None, int] = {}
    for interval in rep.intervals:
        length = interval.end_ns - interval.start_ns
        if interval.running:
            running[interval.context] = running.get(interval.context, 0) + length
        if interval.parked:
            parked[interval.context] = parked.get(interval.context, 0) + length
    moved: dict[str | None, list[int]] = {}
    for move in rep.moves:
        moved.setdefault(move.context, []).append(move.bytes)

    contexts = []
    for ctx in rep.contexts:
        samples = rep.context_samples.get(ctx, [])
        contexts.append(ContextSummary(
            context=context_label(ctx),
            running_ns=running.get(ctx, 0),
            parked_ns=parked.get(ctx, 0),
            num_moves=len(moved.get(ctx, [])),
            bytes_moved=sum(moved.get(ctx, [])),
            peak_bytes=max((sum(tiers.values()) for _, tiers in samples), default=0),
            ttft_ns=ttfts[ctx][0] if ttfts.get(ctx) else None,
        ))

    all_ttfts = sorted(t for values in ttfts.values() for t in values)
    ttft = TtftSummary(
        count=len(all_ttfts),
        mean_ns=sum(all_ttfts) / len(all_ttfts) if all_ttfts else None,
        p50_ns=percentile(all_ttfts, 50) if all_ttfts else None,
        p99_ns=percentile(all_ttfts, 99) if all_ttfts else None,
        max_ns=all_ttfts[-1] if all_ttfts else None,
    )

    peaks: dict[str, int] = {}
    for _, tiers in rep.tier_samples:
        for tier, num_bytes in tiers.items():
            peaks[tier] = max(peaks.get(tier, 0), num_bytes)
    final = rep.tier_samples[-1][1] if rep.tier_samples else {}
    tiers = [TierSummary(tier, peaks[tier], final.get(tier, 0))
             for tier in sorted(peaks, key=tier_sort_key)]

    by_link: dict[tuple[str, str], list] = {}
    for move in rep.moves:
        by_link.setdefault((move.src, move.dst), []).append(move)
    links = []
    for (src, dst), moves in sorted(by_link.items(),
                                    key=lambda kv: (tier_sort_key(kv[0][0]), tier_sort_key(kv[0][1]))):
        speeds = [m.gib_s for m in moves if m.gib_s is not None]
        num_bytes = sum(m.bytes for m in moves)
        timed_bytes = sum(m.bytes for m in moves if m.dur_ns > 0)
        dur_ns = sum(m.dur_ns for m in moves)
        links.append(LinkSummary(
            src=src, dst=dst, num_moves=len(moves), bytes=num_bytes, dur_ns=dur_ns,
            gib_s=_gib_s(timed_bytes, dur_ns),
            min_gib_s=min(speeds) if speeds else None,
            max_gib_s=max(speeds) if speeds else None,
        ))

    return TraceSummary(
        duration_ns=rep.end_ns - rep.t0_ns,
        num_events=len(events),
        num_core_events_dropped=dropped_core,
        num_python_events_dropped=dropped_python,
        contexts=contexts,
        ttft=ttft,
        tiers=tiers,
        links=links,
        num_move_failures=sum(1 for e in events if e.kind == EventKind.MOVE_FAILED),
        num_alloc_failures=sum(1 for e in events if e.kind == EventKind.ALLOC_FAILED),
    )


def _ms(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.3f} ms"


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.3f} GiB"


def _speed(gib_s: float | None) -> str:
    return "-" if gib_s is None else f"{gib_s:.2f} GiB/s"


def format_summary(summary: TraceSummary) -> str:
    """The summary as a few aligned tables of text."""
    lines = [
        f"trace: {summary.num_events} events over {_ms(summary.duration_ns)}",
    ]
    if summary.num_core_events_dropped or summary.num_python_events_dropped:
        lines.append(f"WARNING: events dropped (buffers full): core "
                     f"{summary.num_core_events_dropped}, python "
                     f"{summary.num_python_events_dropped}; numbers below may be off")
    t = summary.ttft
    lines += ["", f"time to first token: {t.count} prompts"]
    if t.count:
        lines.append(f"  mean {_ms(t.mean_ns)}  p50 {_ms(t.p50_ns)}  "
                     f"p99 {_ms(t.p99_ns)}  max {_ms(t.max_ns)}")

    lines += ["", "contexts:"]
    if summary.contexts:
        width = max(7, *(len(c.context) for c in summary.contexts))
        lines.append(f"  {'context':<{width}}  {'running':>14}  {'parked':>14}  "
                     f"{'moves':>5}  {'moved':>13}  {'peak':>13}  {'ttft':>14}")
        for c in summary.contexts:
            lines.append(f"  {c.context:<{width}}  {_ms(c.running_ns):>14}  "
                         f"{_ms(c.parked_ns):>14}  {c.num_moves:>5}  {_gib(c.bytes_moved):>13}  "
                         f"{_gib(c.peak_bytes):>13}  {_ms(c.ttft_ns):>14}")
    else:
        lines.append("  (none)")

    lines += ["", "tiers:"]
    if summary.tiers:
        lines.append(f"  {'tier':<8}  {'peak':>13}  {'at end':>13}")
        for tier in summary.tiers:
            lines.append(f"  {tier.tier:<8}  {_gib(tier.peak_bytes):>13}  "
                         f"{_gib(tier.final_bytes):>13}")
    else:
        lines.append("  (no segment events)")

    lines += ["", "moves:"]
    if summary.links:
        lines.append(f"  {'link':<16}  {'moves':>5}  {'bytes':>13}  {'bandwidth':>13}  "
                     f"{'slowest':>13}  {'fastest':>13}")
        for link in summary.links:
            lines.append(f"  {link.src + ' -> ' + link.dst:<16}  {link.num_moves:>5}  "
                         f"{_gib(link.bytes):>13}  {_speed(link.gib_s):>13}  "
                         f"{_speed(link.min_gib_s):>13}  {_speed(link.max_gib_s):>13}")
    else:
        lines.append("  (none)")
    if summary.num_move_failures or summary.num_alloc_failures:
        lines.append(f"failures: {summary.num_move_failures} moves rolled back, "
                     f"{summary.num_alloc_failures} allocations found no room")
    return "\n".join(lines)
