"""Replays the context memory operations of a recorded aqua_alloc trace on simulated GPUs and
reports where each context's bytes were while it ran: what a placement change does to a
real workload, on a CPU, before a GPU run measures it.

    python benchmarks/replay_placement_sim.py TRACE.json --out RESULT.json [--label NAME]

The trace's core events are issued again, in order, against the core that is imported
(run it with PYTHONPATH pointing at a build of another commit to compare cores):
``segment_alloc`` (the same bytes, in the same context), ``segment_free``, ``context_park``,
``context_resume``, ``context_release``. No kernel runs and no time passes between events;
so the pinned pool is refilled at each park, to the reserve (the background thread had the
previous slice, at least 240 ms on the H200 run, to do it; it makes about 1 GiB in 250 ms:
csrc/host_pool.h), and not otherwise. The settings are those of the run (bench_serve:
``local_budget`` = its KV budget, ``lend`` 0, the defaults otherwise).

For each scheduler slice (``slice_start`` .. ``slice_end`` of the trace) it records the
running context's bytes on host at the slice's start, in the replay and in the recorded
run (the trace's own map and move events), and weighs them by the slice's recorded
duration. Bytes on host during a slice are read over PCIe at every step (on the H200 run:
decode steps of 59 to 66 ms against 49 ms with the context at home).
"""

from __future__ import annotations

import argparse
import bisect
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

MiB, GiB = 1 << 20, 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path, help="an aqua_alloc trace (JSON) of a bench_serve aqua run")
    p.add_argument("--out", type=Path, required=True, help="where to write the result (JSON)")
    p.add_argument("--label", default="", help="a name for the core replayed (e.g. its commit)")
    p.add_argument("--local-budget", type=int, default=3 * GiB, help="GPU bytes for contexts (the run's --kv-budget)")
    p.add_argument("--host-reserve", type=int, default=1 * GiB, help="pinned host bytes made ahead (AQUA_HOST_RESERVE)")
    p.add_argument("--host-budget", type=int, default=64 * GiB, help="host bytes for contexts")
    p.add_argument("--chunk", type=int, default=64 * MiB, help="largest piece (AQUA_CHUNK)")
    return p.parse_args(argv)


def recorded_host_bytes(replayed) -> dict[str, tuple[list[int], list[int]]]:
    """Per context: sample times and host bytes at each, from the recorded trace."""
    out = {}
    for ctx, samples in replayed.context_samples.items():
        out[ctx] = ([t for t, _ in samples], [tiers.get("host", 0) for _, tiers in samples])
    return out


def at(series: tuple[list[int], list[int]] | None, t_ns: int) -> int:
    """The sampled value at t_ns (the last sample at or before it; 0 before the first)."""
    if not series:
        return 0
    times, values = series
    i = bisect.bisect_right(times, t_ns) - 1
    return values[i] if i >= 0 else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import aqua_alloc as aq  # the core under test: whichever aqua_alloc is on the path
    import aqua_alloc.memory.sim as sim
    from aqua_alloc.memory import native
    from aqua_alloc.obs.events import EventKind
    from aqua_alloc.obs.replay import replay
    from aqua_alloc.obs.trace_reader import read_trace

    trace = read_trace(args.trace)
    recorded = recorded_host_bytes(replay(trace.events))
    aq.enable(backend="sim", sim_devices=1, sim_device_bytes=args.local_budget + 2 * GiB,
              sim_host_bytes=args.host_budget + 4 * GiB, chunk=args.chunk, local_budget=args.local_budget,
              lend=0, host_budget=args.host_budget, host_reserve=args.host_reserve, lend_poll_ms=0)
    lib = native.lib()

    def refill_pool() -> None:
        # Fill to the reserve now, then stop the background thread (reserve 0): the pool
        # changes only here and through the core's own moves.
        native.check(lib.aqua_host_pool_reserve(args.host_reserve, 0), "refilling the host pool")
        native.check(lib.aqua_host_pool_reserve(0, 0), "stopping the host pool thread")

    refill_pool()
    ptr_of: dict[int, int] = {}                      # recorded segment address -> simulated one
    slices: list[dict] = []
    open_slice: dict[str, dict] = {}
    num_issued = 0
    live: set[str] = set()                            # contexts created and not released
    t_start = time.perf_counter()
    for e in trace.events:
        k, tag = e.kind, e.context
        if k == EventKind.CONTEXT_CREATE:
            with aq.context(tag, device=0):
                live.add(tag)
        elif k == EventKind.SEGMENT_ALLOC:
            with aq.context(tag, device=0):
                ptr_of[e.args["addr"]] = sim.malloc(e.bytes, device=0)
        elif k == EventKind.SEGMENT_FREE:
            sim.free(ptr_of.pop(e.args["addr"]))
        elif k == EventKind.CONTEXT_PARK:
            refill_pool()
            aq.park(tag)
        elif k == EventKind.CONTEXT_RESUME:
            aq.resume(tag)
        elif k == EventKind.CONTEXT_RELEASE:
            aq.release(tag)
            live.discard(tag)
        elif k == EventKind.SLICE_START:
            where = aq.where(tag) if tag in live else {}  # a prompt's first slice starts before its context
            open_slice[tag] = {"context": tag, "t_ns": e.t_ns - trace.t0_ns, "bytes": sum(where.values()),
                               "host_bytes": where.get("host", 0),
                               "recorded_host_bytes": at(recorded.get(tag), e.t_ns)}
        elif k == EventKind.SLICE_END and tag in open_slice:
            s = open_slice.pop(tag)
            s["dur_ns"] = e.t_ns - trace.t0_ns - s["t_ns"]
            slices.append(s)
        else:
            continue
        num_issued += 1
    stats = aq.stats()["tiers"]
    wall_s = time.perf_counter() - t_start

    total_ns = sum(s["dur_ns"] for s in slices) or 1

    def host_share(key: str) -> float:
        """Slice-time-weighted share of the running context's bytes that were on host."""
        return sum(s["dur_ns"] * s[key] / s["bytes"] for s in slices if s["bytes"]) / total_ns

    result = {
        "benchmark": "replay_placement_sim",
        "label": args.label,
        "trace": str(args.trace),
        "settings": {k: getattr(args, k) for k in ("local_budget", "host_reserve", "host_budget", "chunk")},
        "versions": {"python": platform.python_version(), "aqua_alloc": getattr(aq, "__version__", "?"),
                     "aqua_alloc_path": str(Path(aq.__file__).parent), "commit": git_commit(Path(aq.__file__))},
        "num_events_issued": num_issued,
        "num_slices": len(slices),
        "host_share_replayed": host_share("host_bytes"),
        "host_share_recorded": host_share("recorded_host_bytes"),
        "slices_with_host_bytes_replayed": sum(1 for s in slices if s["host_bytes"]),
        "slices_with_host_bytes_recorded": sum(1 for s in slices if s["recorded_host_bytes"]),
        "gpu0_bytes_in": stats["gpu0"]["bytes_in"], "gpu0_bytes_out": stats["gpu0"]["bytes_out"],
        "gpu0_moves_in": stats["gpu0"]["num_moves_in"], "gpu0_moves_out": stats["gpu0"]["num_moves_out"],
        "host_pool_total": stats["host"]["pool_total"],
        "replay_wall_s": wall_s,
        "slices": slices,
    }
    aq.disable()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.label or 'core'}: {len(slices)} slices; running context's bytes on host (slice-time weighted): "
          f"replayed {result['host_share_replayed']:.3f}, recorded {result['host_share_recorded']:.3f}; "
          f"slices with any on host: replayed {result['slices_with_host_bytes_replayed']}, recorded "
          f"{result['slices_with_host_bytes_recorded']}; GPU moves in {result['gpu0_moves_in']} "
          f"({result['gpu0_bytes_in'] / GiB:.1f} GiB), out {result['gpu0_moves_out']} "
          f"({result['gpu0_bytes_out'] / GiB:.1f} GiB); host pool {result['host_pool_total'] / GiB:.2f} GiB; "
          f"{wall_s:.1f} s")
    return 0


def git_commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
