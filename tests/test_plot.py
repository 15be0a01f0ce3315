"""The trace plot's figure: colours, legends, time axis, panels and moves (CPU, no pixels).

Each test builds the matplotlib Figure (``plot.build_figure``) and checks what is drawn on
it, as a person looking at the PNG would: distinct colours, short legends, an axis that
spans the run, no empty panel, one marker per move.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from aqua_alloc.obs import plot, trace_reader                       # noqa: E402
from aqua_alloc.obs.events import Event, EventKind as K             # noqa: E402
from aqua_alloc.obs.replay import replay                            # noqa: E402

from test_trace import FIXTURE, GiB, MS, T0, e, known_events, random_core_events   # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def named(ax, prefix: str) -> list:
    """Artists of ``ax`` whose gid starts with ``prefix``."""
    return [c for c in ax.collections if (c.get_gid() or "").startswith(prefix)]


def num_moves_drawn(fig) -> int:
    return sum(len(c.get_offsets()) for ax in fig.axes for c in named(ax, "moves"))


def legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def scheduled_cpu_run(num_prompts: int, num_gpus: int = 8) -> list[Event]:
    """What a CPU run after enable(backend="sim") records: local, lend and host budgets
    at enable, seconds of set-up, then prompts in slices (no memory events), and lend
    budgets re-published after the run."""
    events = []
    for i in range(num_gpus):
        events += [e(0, K.BUDGET, dst=f"gpu{i}", bytes=GiB, args={"budget": "local"}),
                   e(0, K.BUDGET, dst=f"gpu{i}", bytes=GiB // 2, args={"budget": "lend"})]
    events.append(e(0, K.BUDGET, dst="host", bytes=4 * GiB))
    start = 3400.0                      # ms: model build and warm-up before the first prompt
    for p in range(num_prompts):
        tag = f"user-{p}"
        events.append(e(start + p, K.PROMPT_ARRIVED, tag))
        for k in range(3):
            t = start + 20 * k + p
            events += [e(t, K.SLICE_START, tag), e(t + 0.5, K.SLICE_END, tag)]
        events.append(e(start + 41 + p, K.FINISHED, tag))
    events.append(e(start + 200, K.BUDGET, dst="gpu0", bytes=GiB // 2, args={"budget": "lend"}))
    return sorted(events, key=lambda x: x.t_ns)


# --------------------------------------------------------------------------------------
# Colours and legends.


@pytest.mark.parametrize("num_contexts", [1, 2, 7, 10])
def test_each_context_has_its_own_colour(num_contexts):
    contexts = [f"user-{i}" for i in range(num_contexts)]
    colors = plot.context_colors(contexts)
    assert len(set(colors.values())) == num_contexts
    fig = plot.build_figure(scheduled_cpu_run(num_contexts))
    (ax,) = fig.axes
    bars = {c.get_gid(): tuple(c.get_facecolor()[0][:3]) for c in named(ax, "running:")}
    assert len(bars) == num_contexts and len(set(bars.values())) == num_contexts
    labels = {t.get_text(): t.get_color() for t in ax.get_yticklabels()}
    assert labels == {c: colors[c] for c in contexts}       # the row label is the legend


def test_colours_cycle_past_the_palette_and_neighbours_differ():
    contexts = [f"c{i}" for i in range(33)]
    colors = [plot.context_colors(contexts)[c] for c in contexts]
    assert len(set(colors)) == 10
    assert all(a != b for a, b in zip(colors, colors[1:]))


def test_legends_stay_short():
    # The CPU run: 17 budget settings and 12 prompts; once 17 grey budget entries.
    fig = plot.build_figure(scheduled_cpu_run(12))
    assert [legend_labels(ax) for ax in fig.axes] == [["running (row colour)"]]
    # Nine tiers that held bytes, each with budgets: one entry per tier, one per line style.
    events = random_core_events(seed=4, steps=400)
    events += [e(0, K.BUDGET, dst=f"gpu{i}", bytes=8 * GiB) for i in range(8)]
    events += [e(0, K.BUDGET, dst=f"gpu{i}", bytes=GiB, args={"budget": "lend"})
               for i in range(8)]
    fig = plot.build_figure(events)
    top, bottom = fig.axes
    assert legend_labels(top) == [f"gpu{i}" for i in range(8)] + [
        "host", "budget (tier's grey)", "lend budget (tier's grey)"]
    assert len(legend_labels(bottom)) <= plot.MAX_LEGEND_ENTRIES


def test_a_long_legend_ends_with_how_many_more():
    from matplotlib.figure import Figure
    ax = Figure().subplots()
    handles = [ax.plot([0, 1], [i, i])[0] for i in range(20)]
    plot._legend(ax, handles, [f"line {i}" for i in range(20)])
    labels = legend_labels(ax)
    assert len(labels) == plot.MAX_LEGEND_ENTRIES
    assert labels[-1] == f"+{20 - plot.MAX_LEGEND_ENTRIES + 1} more"


def test_tiers_are_distinct_greys():
    tiers = [f"gpu{i}" for i in range(8)] + ["host"]
    greys = plot.tier_colors(tiers)
    assert len(set(greys.values())) == len(tiers)
    assert all(g.replace(".", "", 1).isdigit() for g in greys.values())    # greys, no hue


# --------------------------------------------------------------------------------------
# Time axis and panels.


def test_time_axis_spans_the_run_not_the_set_up_before_it():
    # Budgets set at enable() 3.4 s before the first prompt (and re-published after the
    # last) once squeezed the run into the last few per cent of the axis.
    events = scheduled_cpu_run(4)
    run = [x for x in events if x.kind != K.BUDGET]
    first, last = run[0].t_ns, run[-1].t_ns
    assert plot.run_span_ns(events) == (first, last)
    (ax,) = plot.build_figure(events).axes
    span_ms = (last - first) / MS
    lo, hi = ax.get_xlim()
    assert lo <= 0 and hi >= span_ms and hi - lo <= 1.05 * span_ms
    assert ax.get_xlabel().startswith("time since the run's first event (ms)")
    assert "18 budget events before or after the run are off the axis" in ax.get_xlabel()


def test_time_axis_in_seconds_for_a_long_run_shared_by_both_panels():
    events = [e(0, K.SEGMENT_ALLOC, "a", dst="gpu0", bytes=GiB),
              e(1000, K.MOVE_END, "a", src="gpu0", dst="host", bytes=GiB, dur_ns=500 * MS),
              e(2500, K.SEGMENT_FREE, "a", src="host", bytes=GiB)]
    top, bottom = plot.build_figure(events).axes
    assert top.get_xlim() == bottom.get_xlim()
    lo, hi = bottom.get_xlim()
    assert lo <= 0 and 2.5 <= hi <= 2.5 * 1.05
    assert bottom.get_xlabel() == "time since the run's first event (s)"


def test_the_run_ends_when_the_last_move_does():
    events = [e(0, K.SLICE_START, "a"),
              e(10, K.MOVE_END, "a", src="gpu0", dst="host", bytes=GiB, dur_ns=30 * MS)]
    assert plot.run_span_ns(events) == (T0, T0 + 40 * MS)


@pytest.mark.parametrize("make, num_panels", [
    (lambda: scheduled_cpu_run(3), 1),                  # no memory events: contexts only
    (lambda: [e(0, K.SLICE_START, "a"), e(5, K.SLICE_END, "a")], 1),
    (lambda: trace_reader.read_trace(FIXTURE), 2),
    (known_events, 2),
])
def test_the_bytes_panel_only_when_there_are_memory_events(make, num_panels):
    fig = plot.build_figure(make())
    assert len(fig.axes) == num_panels
    if num_panels == 1:
        assert "no memory events in this trace" in fig.axes[0].get_title()
    else:
        assert fig.axes[0].get_title().startswith("bytes per tier")


def test_no_events_still_draws():
    (ax,) = plot.build_figure([]).axes
    lo, hi = ax.get_xlim()
    assert lo < hi
    assert any(t.get_text() == "no contexts" for t in ax.texts)


# --------------------------------------------------------------------------------------
# Moves.


@pytest.mark.parametrize("make", [
    known_events,
    lambda: trace_reader.read_trace(FIXTURE).events,
    lambda: random_core_events(seed=4, steps=400),
])
def test_one_marker_per_move(make):
    events = make()
    num_moves = len(replay(events).moves)
    assert num_moves > 0
    fig = plot.build_figure(events)
    assert num_moves_drawn(fig) == num_moves
    to_host = sum(1 for m in replay(events).moves if m.dst == "host")
    labels = legend_labels(fig.axes[-1])
    assert f"move to host ({to_host})" in labels
    assert f"move to a GPU ({num_moves - to_host})" in labels


def test_a_move_that_ends_the_trace_shows_in_the_context_bar():
    # The last state of a context was dropped when it began at the trace's end: a trace
    # ending with a move never showed where the bytes went.
    events = [e(0, K.SEGMENT_ALLOC, "a", dst="gpu0", bytes=GiB), e(0, K.SLICE_START, "a"),
              e(40, K.SLICE_END, "a"), e(40, K.PARKED, "a"),
              e(40, K.MOVE_END, "a", src="gpu0", dst="host", bytes=GiB, dur_ns=10 * MS)]
    fig = plot.build_figure(events)
    bottom = fig.axes[-1]
    (host,) = named(bottom, "tier:a:host")
    (x0, _), (x1, _) = host.get_paths()[0].vertices.min(0), host.get_paths()[0].vertices.max(0)
    assert x0 == pytest.approx(50.0)                    # ms: when the move's bytes arrived
    assert x1 - x0 >= 50.0 * plot._MIN_WIDTH * 0.99     # visible, though it lasts 0 s
    assert num_moves_drawn(fig) == 1


def test_plot_of_the_committed_gpu_traces_draws_every_move(tmp_path):
    for name in ("bench_serve-conv-1gpu-h200.trace-aqua-host-round2.json",
                 "bench_serve-conv-loads0.5-0.95-1gpu-h200.trace-aqua-host-load0.95.json"):
        trace = trace_reader.read_trace(REPO / "benchmarks" / "results" / name)
        fig = plot.build_figure(trace)
        assert num_moves_drawn(fig) == len(replay(trace.events).moves) > 0
        assert len(fig.axes) == 2
