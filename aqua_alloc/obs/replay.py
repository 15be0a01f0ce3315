"""Replay: the one interpretation of an event list, shared by the trace writer, the summary
and the plot.

- a context is *running* between SLICE_START and SLICE_END, and *parked* between
  PARKED/CONTEXT_PARK and RESUMED/CONTEXT_RESUME (FINISHED and CONTEXT_RELEASE end both);
- bytes per tier: SEGMENT_ALLOC adds ``bytes`` and SEGMENT_FREE removes them, split by
  tier as the MAP (``dst``) / UNMAP (``src``) events of the segment's pieces just before
  say, else on the segment event's own tier; MOVE_END moves ``bytes`` from ``src`` to
  ``dst`` at ``t_ns + dur_ns``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from aqua_alloc.obs.events import Event, EventKind

__all__ = ["UNTAGGED", "UNKNOWN_TIER", "Interval", "Move", "Replay", "replay", "context_label", "tier_sort_key"]

UNTAGGED = "(untagged)"     # label of events that carry no context tag
UNKNOWN_TIER = "unknown"    # tier of a segment event that names none

_RUN_KINDS = {EventKind.SLICE_START: True, EventKind.SLICE_END: False}
_PARK_KINDS = {
    EventKind.PARKED: True, EventKind.CONTEXT_PARK: True,
    EventKind.RESUMED: False, EventKind.CONTEXT_RESUME: False,
}
_END_KINDS = frozenset({EventKind.FINISHED, EventKind.CONTEXT_RELEASE})
_BYTES_KINDS = frozenset({EventKind.SEGMENT_ALLOC, EventKind.SEGMENT_FREE, EventKind.MOVE_END})
_UNTAGGED_TRACK_KINDS = frozenset(_RUN_KINDS) | frozenset(_PARK_KINDS) | _BYTES_KINDS



def context_label(context: str | None) -> str:
    return UNTAGGED if context is None else context


def tier_sort_key(tier: str) -> tuple[int, int, str]:
    """gpu0 < gpu1 < ... < gpu10 < host < anything else."""
    if tier.startswith("gpu") and tier[3:].isdigit():
        return (0, int(tier[3:]), "")
    if tier == "host":
        return (1, 0, "")
    return (2, 0, tier)




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
