"""A picture of a trace: bytes per tier over time, and where each context's bytes were.

Needs matplotlib (the ``plot`` extra: ``pip install 'aqua_alloc[plot]'``); without it,
:func:`plot_trace` raises :class:`PlotUnavailableError`. Draws through matplotlib's Agg
canvas directly, never pyplot, so it leaves the caller's pyplot state alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from aqua_alloc.obs.events import Event
from aqua_alloc.obs.trace_format import Trace
from aqua_alloc.obs.replay import context_label, replay, tier_sort_key

__all__ = ["PlotUnavailableError", "plot_trace", "figure_size_px"]

WIDTH_PX = 1200
BASE_HEIGHT_PX = 800         # up to 20 contexts; 20 px more per context past that
MAX_HEIGHT_PX = 4000
DPI = 100
_MAX_LABEL = 24              # characters of a context tag shown on the residency chart
# Tier colours: matplotlib's tab10 without red and black, kept for the parked/running marks.
_TIER_COLORS = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9", "C7")


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


def _steps(samples: list[tuple[int, dict[str, int]]], tier: str, t0: int, end: int
           ) -> tuple[list[float], list[float]]:
    """Step series of one tier (seconds, GiB), held until the end of the trace."""
    xs, ys = [], []
    for t, tiers in samples:
        xs.append((t - t0) / 1e9)
        ys.append(tiers.get(tier, 0) / 2**30)
    if xs:
        xs.append((end - t0) / 1e9)
        ys.append(ys[-1])
    return xs, ys


def plot_trace(trace: Trace | Iterable[Event], out: str | os.PathLike[str]) -> Path:
    """Write a picture of ``trace`` (a read trace, or events) to ``out`` in the format its
    suffix names (.png, .svg, .pdf; none: PNG); return its path."""
    Figure, FigureCanvasAgg = _import_matplotlib()
    events = trace.events if isinstance(trace, Trace) else list(trace)
    rep = replay(events)
    t0, end = rep.t0_ns, rep.end_ns
    tiers = rep.tiers
    colors = {tier: _TIER_COLORS[i % len(_TIER_COLORS)] for i, tier in enumerate(tiers)}

    width, height = figure_size_px(len(rep.contexts))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2]})

    # Bytes per tier over time.
    peak = 0.0
    for tier in tiers:
        xs, ys = _steps(rep.tier_samples, tier, t0, end)
        if xs:
            top.step(xs, ys, where="post", label=tier, color=colors[tier])
            peak = max(peak, max(ys))
    for samples, style, what in ((rep.budget_samples, ":", "budget"),
                                 (rep.lend_samples, "-.", "lend budget")):
        for tier in sorted({t for _, values in samples for t in values}, key=tier_sort_key):
            xs, ys = _steps(samples, tier, t0, end)
            top.step(xs, ys, where="post", linestyle=style, color=colors.get(tier, "grey"),
                     label=f"{tier} {what}")
    top.set_ylabel("GiB resident")
    top.set_title("bytes per tier")
    if peak > 0 and top.get_ylim()[1] > 3 * peak:
        # Budgets far above the use would flatten it: scale to the bytes, say so.
        top.set_ylim(0, peak * 1.3)
        top.set_title("bytes per tier (budgets above the axis are cut off)")
    if top.get_legend_handles_labels()[0]:
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    else:
        top.text(0.5, 0.5, "no segment or move events", ha="center", va="center",
                 transform=top.transAxes)

    # Residency: per context, the tier holding most of its bytes; running and parked marks.
    rows = {ctx: i for i, ctx in enumerate(rep.contexts)}
    for ctx, samples in rep.context_samples.items():
        spans: dict[str, list[tuple[float, float]]] = {}
        last_where, last_end = None, None
        for i, (t, held) in enumerate(samples):
            t_next = samples[i + 1][0] if i + 1 < len(samples) else end
            live = {tier: b for tier, b in held.items() if b > 0}
            if not live or t_next <= t:
                continue
            where = max(sorted(live, key=tier_sort_key), key=lambda tier: live[tier])
            if where == last_where and last_end == t:      # extend the bar, no seam
                x, width_s = spans[where][-1]
                spans[where][-1] = (x, width_s + (t_next - t) / 1e9)
            else:
                spans.setdefault(where, []).append(((t - t0) / 1e9, (t_next - t) / 1e9))
            last_where, last_end = where, t_next
        for where, xranges in spans.items():
            bottom.broken_barh(xranges, (rows[ctx] - 0.35, 0.5), color=colors.get(where, "grey"),
                               alpha=0.8)
    marks = (("running", 0.2, "black"), ("parked", -0.45, "tab:red"))   # (flag, row offset, colour)
    for interval in rep.intervals:
        for flag, dy, color in marks:
            if getattr(interval, flag):
                bottom.broken_barh([((interval.start_ns - t0) / 1e9,
                                     (interval.end_ns - interval.start_ns) / 1e9)],
                                   (rows[interval.context] + dy, 0.12), color=color)
    labels = [context_label(c) for c in rep.contexts]
    bottom.set_yticks(range(len(labels)))
    bottom.set_yticklabels([s if len(s) <= _MAX_LABEL else s[:_MAX_LABEL - 1] + "~"
                            for s in labels], fontsize="small")
    if labels:
        bottom.set_ylim(len(labels) - 0.5, -0.7)    # first context on top
    bottom.set_xlabel("seconds since first event")
    bottom.set_title("contexts: where their bytes are (bar colour = tier), "
                     "running (black), parked (red)")
    if tiers:
        from matplotlib.patches import Patch
        bottom.legend(handles=[Patch(color=colors[t], label=t) for t in tiers]
                      + [Patch(color="black", label="running"),
                         Patch(color="tab:red", label="parked")],
                      loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    if not labels:
        bottom.text(0.5, 0.5, "no contexts", ha="center", va="center",
                    transform=bottom.transAxes)
    fig.tight_layout()

    out = Path(out)
    fig.savefig(out, format=out.suffix[1:].lower() or "png", dpi=DPI)
    return out
