"""A picture of a trace: bytes per tier over time, and what each context did.

Needs matplotlib (the ``plot`` extra: ``pip install 'aqua_alloc[plot]'``); without it,
:func:`plot_trace` raises :class:`PlotUnavailableError`. Draws through matplotlib's Agg
canvas directly, never pyplot, so it leaves the caller's pyplot state alone.

What is drawn (:func:`build_figure`):

- the time axis spans the run: from its first to its last event, leaving out budget
  settings recorded before or after it (``enable()`` sets budgets, and the lend budgets are
  re-published while the process lives, seconds away from any prompt); in s, or in ms for a
  run shorter than 2 s; both panels share it;
- "bytes per tier" (top): GiB on each tier, with the budgets of those tiers; only when the
  trace has memory events (a CPU run has none, and then has only the bottom panel);
- "contexts" (bottom): a row per context, in its own colour (the row's label is in it too):
  solid while running, light while parked; under it a strip in the grey of the tier
  holding most of its bytes (tiers are greys, so they never look like a context); above
  it a marker per move (v: to host, ^: to a GPU), at the moment the bytes arrived.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from aqua_alloc.obs.events import Event, EventKind
from aqua_alloc.obs.trace_format import Trace
from aqua_alloc.obs.replay import Replay, context_label, replay, tier_sort_key

__all__ = ["PlotUnavailableError", "plot_trace", "build_figure", "figure_size_px",
           "context_colors", "tier_colors", "run_span_ns", "MAX_LEGEND_ENTRIES"]

WIDTH_PX = 1200
BASE_HEIGHT_PX = 800         # up to 20 contexts; 20 px more per context past that
MAX_HEIGHT_PX = 4000
DPI = 100
MAX_LEGEND_ENTRIES = 12      # past this a legend ends with "+N more"
_MAX_LABEL = 24              # characters of a context tag shown on the context chart
_SECONDS_FROM_NS = 2_000_000_000   # a run this long or longer is drawn in s, else in ms
# Context colours: matplotlib's tab10, cycling (light shades would vanish when parked).
_CONTEXT_PALETTE = "tab10"
# Tier colours are greys (darkest: gpu0), so that a tier never looks like a context.
_DARKEST_GPU, _LIGHTEST_GPU = 0.1, 0.5      # grey levels (0 black, 1 white)
_HOST_GREY = "0.78"
# Rows of the context chart (y grows downwards; row i spans i - 0.5 .. i + 0.5), in rows.
_MOVE_Y = -0.36              # move markers, above the bar
_STATE_BAR = (-0.27, 0.4)    # running / parked bar: (offset of its top, height)
_TIER_STRIP = (0.16, 0.28)   # where the bytes are, under the bar
_MIN_WIDTH = 1 / 250         # a state that lasts 0 s is still drawn this wide (x-axis fraction)


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def figure_size_px(num_contexts: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for a trace with that many contexts."""
    height = BASE_HEIGHT_PX + 20 * max(0, num_contexts - 20)
    return WIDTH_PX, min(height, MAX_HEIGHT_PX)


def _import_matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotUnavailableError(
            f"trace plot needs matplotlib, which is not installed ({e}); "
            "install it with: pip install 'aqua_alloc[plot]'"
        ) from None
    return Figure, FigureCanvasAgg


def context_colors(contexts: list[str | None]) -> dict[str | None, tuple[float, ...]]:
    """Context -> RGBA: distinct for up to 10 contexts, then cycling (neighbours differ)."""
    import matplotlib
    palette = matplotlib.colormaps[_CONTEXT_PALETTE].colors
    return {ctx: (*palette[i % len(palette)], 1.0) for i, ctx in enumerate(contexts)}


def tier_colors(tiers: list[str]) -> dict[str, str]:
    """Tier -> grey, distinct per tier: GPUs from near black to mid grey, host light."""
    gpus = [t for t in tiers if t != "host"]
    step = (_LIGHTEST_GPU - _DARKEST_GPU) / max(len(gpus) - 1, 1)
    colors = {t: f"{_DARKEST_GPU + i * step:.2f}" for i, t in enumerate(gpus)}
    colors["host"] = _HOST_GREY
    return colors


def run_span_ns(events: list[Event]) -> tuple[int, int]:
    """(first, last) ns of the run: every event but budget settings (all of them when
    there is nothing else); the last counts a move's duration."""
    run = [e for e in events if e.kind != EventKind.BUDGET] or events
    if not run:
        return 0, 0
    return min(e.t_ns for e in run), max(e.t_ns + e.dur_ns for e in run)


def _legend(ax: Any, handles: list[Any], labels: list[str]) -> None:
    """A legend right of the axes, at most MAX_LEGEND_ENTRIES long."""
    if len(handles) > MAX_LEGEND_ENTRIES:
        from matplotlib.patches import Patch
        rest = len(handles) - (MAX_LEGEND_ENTRIES - 1)
        handles = handles[:MAX_LEGEND_ENTRIES - 1] + [Patch(visible=False)]
        labels = labels[:MAX_LEGEND_ENTRIES - 1] + [f"+{rest} more"]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")


def _steps(samples: list[tuple[int, dict[str, int]]], tier: str, t0: int, end: int,
           unit_ns: float) -> tuple[list[float], list[float]]:
    """Step series of one tier (time in the axis unit, GiB), held until ``end``."""
    xs = [(t - t0) / unit_ns for t, _ in samples]
    ys = [values.get(tier, 0) / 2**30 for _, values in samples]
    if xs:
        xs.append(max((end - t0) / unit_ns, xs[-1]))
        ys.append(ys[-1])
    return xs, ys


def _draw_tiers(ax: Any, rep: Replay, greys: dict[str, str], t0: int, end: int,
                unit_ns: float) -> None:
    """Top panel: GiB per tier, and the budgets of the tiers that held bytes."""
    from matplotlib.lines import Line2D
    tiers = rep.tiers
    peak = 0.0
    for tier in tiers:
        xs, ys = _steps(rep.tier_samples, tier, t0, end, unit_ns)
        ax.step(xs, ys, where="post", color=greys[tier], linewidth=1.5, label=tier)
        peak = max(peak, max(ys))
    handles, labels = ax.get_legend_handles_labels()
    for samples, style, what in ((rep.budget_samples, ":", "budget"),
                                 (rep.lend_samples, "-.", "lend budget")):
        drawn = False
        for tier in sorted({t for _, v in samples for t in v} & set(tiers), key=tier_sort_key):
            xs, ys = _steps(samples, tier, t0, end, unit_ns)
            ax.step(xs, ys, where="post", linestyle=style, color=greys[tier])
            drawn = True
        if drawn:      # one entry per line style, not one per tier
            handles.append(Line2D([], [], linestyle=style, color="0.3"))
            labels.append(f"{what} (tier's grey)")
    ax.set_ylabel("GiB resident")
    ax.set_title("bytes per tier")
    if peak > 0 and ax.get_ylim()[1] > 3 * peak:
        # Budgets far above the use would flatten it: scale to the bytes, say so.
        ax.set_ylim(0, peak * 1.3)
        ax.set_title("bytes per tier (budgets above the axis are cut off)")
    _legend(ax, handles, labels)


def _residency(samples: list[tuple[int, dict[str, int]]], end: int
               ) -> list[tuple[str, int, int]]:
    """(tier holding most of the bytes, start ns, end ns) spans; the last state lasts to
    ``end``, and is kept even when it starts there (a trace can end with a move)."""
    spans: list[tuple[str, int, int]] = []
    for i, (t, held) in enumerate(samples):
        t_next = samples[i + 1][0] if i + 1 < len(samples) else max(end, t)
        live = {tier: b for tier, b in held.items() if b > 0}
        if not live or (t_next <= t and i + 1 < len(samples)):
            continue
        where = max(sorted(live, key=tier_sort_key), key=lambda tier: live[tier])
        if spans and spans[-1][0] == where and spans[-1][2] == t:    # extend, no seam
            spans[-1] = (where, spans[-1][1], t_next)
        else:
            spans.append((where, t, t_next))
    return spans


def _draw_contexts(ax: Any, rep: Replay, greys: dict[str, str], t0: int, end: int,
                   unit_ns: float, min_width: float) -> None:
    """Bottom panel: a row per context (first on top): states, residency, moves."""
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D
    rows = {ctx: i for i, ctx in enumerate(rep.contexts)}
    colors = context_colors(rep.contexts)

    def x(t: int) -> float:
        return (t - t0) / unit_ns

    def width(start: int, stop: int) -> float:
        return max((stop - start) / unit_ns, min_width)

    # Artists are named (gid) "<what>:<context label>[:<tier>]", so that tests can find them.
    top, height = _STATE_BAR
    for state, alpha in (("parked", 0.3), ("running", 1.0)):          # running on top
        by_ctx: dict[str | None, list[tuple[float, float]]] = {}
        for interval in rep.intervals:
            if getattr(interval, state):
                by_ctx.setdefault(interval.context, []).append(
                    (x(interval.start_ns), width(interval.start_ns, interval.end_ns)))
        for ctx, xranges in by_ctx.items():
            ax.broken_barh(xranges, (rows[ctx] + top, height), facecolor=colors[ctx],
                           alpha=alpha, linewidth=0, gid=f"{state}:{context_label(ctx)}")
    states = [s for s in ("running", "parked") if any(getattr(i, s) for i in rep.intervals)]
    top, height = _TIER_STRIP
    tiers_shown: set[str] = set()
    for ctx, samples in rep.context_samples.items():
        by_tier: dict[str, list[tuple[float, float]]] = {}
        for tier, start, stop in _residency(samples, end):
            by_tier.setdefault(tier, []).append((x(start), width(start, stop)))
        for tier, xranges in by_tier.items():
            ax.broken_barh(xranges, (rows[ctx] + top, height), facecolor=greys[tier],
                           linewidth=0, gid=f"tier:{context_label(ctx)}:{tier}")
        tiers_shown.update(by_tier)
    # Every move, one marker each, when its bytes arrived (start + duration); markers a
    # sixth of a row high, 3.5 to 8 points (scatter takes points^2).
    row_pt = ax.get_window_extent().height * 72 / ax.figure.dpi / max(len(rows), 1)
    size = min(max(row_pt / 6, 3.5), 8.0) ** 2
    moves_to_host = [m for m in rep.moves if m.dst == "host"]
    moves_to_gpu = [m for m in rep.moves if m.dst != "host"]
    for moves, marker in ((moves_to_host, "v"), (moves_to_gpu, "^")):
        if moves:
            ax.scatter([x(m.start_ns + m.dur_ns) for m in moves],
                       [rows[m.context] + _MOVE_Y for m in moves],
                       marker=marker, s=size, color="black", linewidths=0, zorder=3,
                       gid="moves")

    labels = [context_label(c) for c in rep.contexts]
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([s if len(s) <= _MAX_LABEL else s[:_MAX_LABEL - 1] + "~"
                        for s in labels], fontsize="small")
    for tick, ctx in zip(ax.get_yticklabels(), rep.contexts):
        tick.set_color(colors[ctx])
    ax.set_ylim(max(len(labels), 1) - 0.5, -0.5)    # first context on top
    handles = [Patch(color="0.45", alpha=1.0 if state == "running" else 0.3,
                     label=f"{state} (row colour{', light' if state == 'parked' else ''})")
               for state in states]
    handles += [Patch(color=greys[t], label=f"bytes on {t}")
                for t in sorted(tiers_shown, key=tier_sort_key)]
    if moves_to_host:
        handles.append(Line2D([], [], marker="v", color="black", linestyle="",
                              label=f"move to host ({len(moves_to_host)})"))
    if moves_to_gpu:
        handles.append(Line2D([], [], marker="^", color="black", linestyle="",
                              label=f"move to a GPU ({len(moves_to_gpu)})"))
    _legend(ax, handles, [h.get_label() for h in handles])
    if not labels:
        ax.text(0.5, 0.5, "no contexts", ha="center", va="center", transform=ax.transAxes)


def build_figure(trace: Trace | Iterable[Event]) -> Any:
    """The matplotlib Figure of ``trace`` (a read trace, or events), on an Agg canvas."""
    Figure, FigureCanvasAgg = _import_matplotlib()
    events = sorted(trace.events if isinstance(trace, Trace) else trace, key=lambda e: e.t_ns)
    rep = replay(events)
    t0, end = run_span_ns(events)
    span_ns = end - t0
    unit_ns, unit = (1e9, "s") if span_ns >= _SECONDS_FROM_NS else (1e6, "ms")
    span = span_ns / unit_ns
    pad = span * 0.01 if span > 0 else 0.5       # x-axis margin, in the axis unit

    width, height = figure_size_px(len(rep.contexts))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    has_memory = bool(rep.tier_samples)
    greys = tier_colors(rep.tiers)
    if has_memory:
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2]})
        _draw_tiers(top, rep, greys, t0, end, unit_ns)
    else:
        bottom = fig.subplots(1, 1)
    _draw_contexts(bottom, rep, greys, t0, end, unit_ns, min_width=(span or 1.0) * _MIN_WIDTH)

    title = "contexts: running (solid), parked (light)"
    if has_memory:
        title += ", tier of their bytes (grey strip), moves (markers)"
    else:
        title += "; no memory events in this trace (a CPU run?), so no bytes per tier"
    bottom.set_title(title)
    bottom.set_xlim(-pad, span + pad)        # shared: both panels show the run
    xlabel = f"time since the run's first event ({unit})"
    skipped = [e for e in events if e.t_ns < t0 or e.t_ns > end]
    if skipped:
        xlabel += f"; {len(skipped)} budget events before or after the run are off the axis"
    bottom.set_xlabel(xlabel)
    fig.tight_layout()
    return fig


def plot_trace(trace: Trace | Iterable[Event], out: str | os.PathLike[str]) -> Path:
    """Write a picture of ``trace`` (a read trace, or events) to ``out`` in the format its
    suffix names (.png, .svg, .pdf; none: PNG); return its path."""
    fig = build_figure(trace)
    out = Path(out)
    fig.savefig(out, format=out.suffix[1:].lower() or "png", dpi=DPI)
    return out
