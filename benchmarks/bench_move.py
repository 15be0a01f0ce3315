r"""Move benchmark: park/resume bandwidth of a context against the raw copy of the same link.

For contexts of 64 MiB .. 8 GiB and each available tier pair (local->host; local->peer
when a second GPU exists) it times:
- park: evict(tag, tier) of a parked context, GiB/s;
- resume: resume(tag) back to the local GPU, GiB/s;
- raw: the same bytes copied by cudaMemcpyAsync between a device buffer and pinned host
  memory (host) or a peer device buffer (peer), measured in the same run, GiB/s;
and their ratio. Then the latency of a context switch between two contexts of 1 GiB and of
2 MiB over each tier, two ways: explicit (park and evict one, then resume the other) and under a budget
that holds one context (park one, resume the other: the core evicts the first in the same
move, both link directions at once). Every move is checked: the context's
checksum after the moves equals the one before. With ``--device-keep 0,4GiB`` everything
is measured once per value in the same run (AQUA_DEVICE_KEEP: move backings kept mapped
and reused, against released after each move).

Writes benchmarks/results/bench_move-<gpu-name>-<n>gpu.json (rows as issue 3 specifies)
and prints a table. For the sizes in --timeline (default 256 MiB) it also prints one park's
and one resume's phases from the core's spans (aq.allocator.move_spans), in ms from the call. Run: python benchmarks/bench_move.py [--sizes 64M,256M,1G,4G,8G]

Contexts live on GPU 0 (CUDA ordinal 0). --peers first (the default) measures host and the
first peer that lends (lend_budget > 0); --peers all measures host and every peer that lends,
while the switches run over host and the nearest peer only (the one the core spills to first:
the first lending peer with NVLink from GPU 0 as NVML reports it, else the first lending peer).
Every row and switch names physical GPUs: src_gpu (the context's GPU) and dst_gpu (where it
is parked: a GPU, or "host"), taken from CUDA_VISIBLE_DEVICES when that is a list of integers
(the ordinal otherwise); the file records visible_devices. So runs with the source GPU put
first in CUDA_VISIBLE_DEVICES merge into every pair of a machine (issue 23):

    N=$(nvidia-smi -L | wc -l)
    for s in $(seq 0 $((N - 1))); do
      vis=$s; for d in $(seq 0 $((N - 1))); do [ "$d" = "$s" ] || vis="$vis,$d"; done  # e.g. 3,0,1,2
      CUDA_VISIBLE_DEVICES=$vis python benchmarks/bench_move.py --peers all \
        --out benchmarks/results/bench_move-pairs-src$s-${N}gpu.json
    done
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

import aqua_alloc as aq
from aqua_alloc.memory import native as _native
from aqua_alloc.memory import topology
from aqua_alloc.memory.config import parse_size

MiB, GiB = 1 << 20, 1 << 30


def timed(fn, repeat: int) -> list[float]:
    """Wall seconds of fn() each time, with the device idle before and after."""
    out = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def checksum(t: torch.Tensor) -> int:
    return sum(int(p.view(torch.int64).sum().item()) for p in getattr(t, "_aqua_parts", [t]))


def raw_host_gib_s(nbytes: int, repeat: int) -> tuple[float, float]:
    """(device->host, host->device) GiB/s of one cudaMemcpyAsync of nbytes, pinned host."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2h = timed(lambda: host.copy_(dev, non_blocking=True), repeat)
    h2d = timed(lambda: dev.copy_(host, non_blocking=True), repeat)
    del dev, host
    return nbytes / statistics.median(d2h) / GiB, nbytes / statistics.median(h2d) / GiB


def raw_peer_gib_s(nbytes: int, peer: int, repeat: int) -> tuple[float, float]:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{peer}")
    out = timed(lambda: b.copy_(a, non_blocking=True), repeat)
    back = timed(lambda: a.copy_(b, non_blocking=True), repeat)
    del a, b
    return nbytes / statistics.median(out) / GiB, nbytes / statistics.median(back) / GiB


def make_context(tag: str, nbytes: int) -> torch.Tensor:
    """A context holding `nbytes` of random bytes. PyTorch's caching allocator gives requests
    of 1 to 10 MiB a 20 MiB segment, so a context of 2 MiB is made of two 1 MiB tensors,
    which share one 2 MiB segment."""
    with aq.context(tag, device=0):
        if nbytes <= 2 * MiB:
            parts = [torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda:0") for _ in range(2)]
            t = parts[0]
            t._aqua_parts = parts  # both halves: kept alive and checksummed together
        else:
            t = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    for part in getattr(t, "_aqua_parts", [t]):
        part.view(torch.int32).random_()
    return t


def log_timeline(what: str, move, nbytes: int, log) -> None:
    """move() once more, with the core's spans: each phase's start and length in ms from the
    call, to show where a park's (or resume's) time goes beyond its copies."""
    torch.cuda.synchronize()
    aq.allocator.move_spans(record=True)
    t_call = time.monotonic_ns()
    move()
    t_return = time.monotonic_ns()
    torch.cuda.synchronize()
    t_sync = time.monotonic_ns()
    spans = aq.allocator.move_spans(record=False)
    ms = lambda ns: (ns - t_call) / 1e6  # noqa: E731
    log(f"  timeline of one {nbytes / MiB:.0f} MiB {what} (ms from the call; phase@start+length):")
    for i in range(0, len(spans), 6):
        log("    " + "  ".join(f"{p}@{ms(t0):.3f}+{(t1 - t0) / 1e6:.3f}" for p, t0, t1 in spans[i:i + 6]))
    log(f"    returned @{ms(t_return):.3f}, device idle @{ms(t_sync):.3f}")


def bench_pair(tier: str, nbytes: int, repeat: int, log, timeline_sizes=()) -> list[dict]:
    tag = f"bench-{tier}-{nbytes}"
    t = make_context(tag, nbytes)
    ptr, before = t.data_ptr(), checksum(t)
    aq.park(tag)
    parks, resumes = [], []
    for _ in range(repeat):
        parks += timed(lambda: aq.evict(tag, tier), 1)
        resumes += timed(lambda: aq.resume(tag), 1)
        aq.park(tag)
    if nbytes in timeline_sizes:
        log_timeline("park", lambda: aq.evict(tag, tier), nbytes, log)
        log_timeline("resume", lambda: aq.resume(tag), nbytes, log)
        aq.park(tag)
    assert t.data_ptr() == ptr and checksum(t) == before, f"{tag}: bytes changed across moves"
    if tier == "host":
        raw_out, raw_back = raw_host_gib_s(nbytes, repeat)
    else:
        raw_out, raw_back = raw_peer_gib_s(nbytes, int(tier[3:]), repeat)
    del t
    aq.release(tag)
    gc.collect()
    prof = aq.allocator.move_profile(reset=True)
    log(f"  profile of {nbytes / MiB:.0f} MiB moves: " + ", ".join(
        f"{k} {v['ms']:.1f} ms/{v['calls']}" for k, v in prof.items()))
    pair = f"local->{'host' if tier == 'host' else 'peer'}"
    rows = []
    for direction, times, raw in (("park", parks, raw_out), ("resume", resumes, raw_back)):
        gib_s = nbytes / statistics.median(times) / GiB
        rows.append(dict(tier_pair=pair, direction=direction, bytes=nbytes, gib_s=round(gib_s, 2),
                         raw_gib_s=round(raw, 2), ratio=round(gib_s / raw, 3)))
        log(f"{pair:13s} {direction:6s} {nbytes / MiB:8.0f} MiB  {gib_s:7.2f} GiB/s  raw {raw:7.2f} GiB/s  "
            f"ratio {gib_s / raw:5.3f}  (median of {len(times)}: {[round(x * 1e3, 2) for x in times]} ms)")
    return rows


def bench_switch(tier: str, nbytes: int, repeat: int, log, method: str) -> dict:
    """Switch from A (running, local) to B (parked on `tier`).

    method "evict+resume": park and evict A explicitly, then resume B (two moves, one after
    the other). method "resume": the local budget holds one context; park A and resume B:
    the core evicts A in the same move as B comes home (both directions of the link at
    once), which is what the scheduler's switches do. There the core evicts A to its best
    spill tier, a lending peer before host: for tier "host", no peer lends during the switch
    (on one GPU this changes nothing). The row says which tiers the evicted contexts used."""
    peers = [d for d in range(1, torch.cuda.device_count())] if tier == "host" else []
    for peer in peers:
        aq.lend(peer, 0)
    try:
        return _switches(tier, nbytes, repeat, log, method)
    finally:
        for peer in peers:
            aq.lend(peer, None)  # elastic again, as enable() leaves it (main() sets no fixed lend)


def _switches(tier: str, nbytes: int, repeat: int, log, method: str) -> dict:
    a, b = make_context("switch-a", nbytes), make_context("switch-b", nbytes)
    sums = (checksum(a), checksum(b))
    aq.evict("switch-b", tier)
    budget = aq.stats()["tiers"]["gpu0"]["budget"]
    context_bytes = sum(aq.where("switch-a").values())  # the segments PyTorch asked for
    if method == "resume":
        _native.check(_native.lib().aqua_set_local_budget(0, context_bytes), "local budget of one context")
    aq.allocator.move_profile(reset=True)
    times, used = [], set()
    for i in range(repeat):
        out, into = ("switch-a", "switch-b") if i % 2 == 0 else ("switch-b", "switch-a")

        def switch():
            aq.park(out)
            if method == "evict+resume":
                aq.evict(out, tier)
            result = aq.resume(into)
            assert result.bytes_elsewhere == 0, result

        times += timed(switch, 1)
        used.update(t for t, n in aq.where(out).items() if n and t != "gpu0")
    assert (checksum(a), checksum(b)) == sums, "switch: bytes changed"
    prof = aq.allocator.move_profile(reset=True)
    _native.check(_native.lib().aqua_set_local_budget(0, budget), "restoring the local budget")
    del a, b
    aq.release("switch-a")
    aq.release("switch-b")
    gc.collect()
    ms = statistics.median(times) * 1e3
    log(f"switch {context_bytes / MiB:.0f} MiB contexts over {tier} ({method}; evicted to {', '.join(sorted(used))}): "
        f"{ms:.2f} ms (median of {len(times)}: {[round(x * 1e3, 2) for x in times]})")
    log("  profile: " + ", ".join(f"{k} {v['ms']:.1f} ms/{v['calls']}" for k, v in prof.items()))
    return dict(switch_bytes=context_bytes, tier=tier, method=method, tiers_used=sorted(used), ms=round(ms, 3))


PEERS = ("first", "all")  # --peers: the first lending peer (as before issue 23), or every lending peer


def check_peers(peers: str) -> str:
    """`peers` when --peers accepts it; ValueError naming the option and what it accepts."""
    if peers not in PEERS:
        raise ValueError(f"--peers {peers!r}: expected one of {', '.join(PEERS)}")
    return peers


def physical_gpus(visible_devices: str | None, num_gpus: int) -> list[int]:
    """The physical index of each CUDA ordinal 0 .. num_gpus-1: its entry in CUDA_VISIBLE_DEVICES
    when that is a list of integers ("3,0,1,2": ordinal 0 is GPU 3), else the ordinal itself
    (unset, GPU UUIDs, MIG instances)."""
    entries = [e.strip() for e in (visible_devices or "").split(",")]
    if len(entries) >= num_gpus and all(e.isdecimal() for e in entries):
        return [int(e) for e in entries[:num_gpus]]
    return list(range(num_gpus))


def gpu_label(tier: str, physical: list[int]) -> int | str:
    """A row's name of tier "host" or "gpu<ordinal>": "host", or the physical GPU index."""
    return "host" if tier == "host" else physical[int(tier[3:])]


def lending_peers(lend_budgets: list[int]) -> list[int]:
    """Ordinals of GPU 0's peers that lend (lend_budget > 0, bytes; indexed by ordinal), lowest first."""
    return [p for p in range(1, len(lend_budgets)) if lend_budgets[p] > 0]


def nvlinked(nvlink: list[list[bool]], src: int, dst: int) -> bool:
    """NVLink from ordinal src to dst (topology.discover()'s matrix, by CUDA ordinal); a matrix
    too small for them: no."""
    return src < len(nvlink) and dst < len(nvlink[src]) and bool(nvlink[src][dst])


def nearest_peer(lend_budgets: list[int], nvlink: list[list[bool]]) -> int | None:
    """The lending peer a context of GPU 0 spills to first, as the core ranks peers (NVLink peers
    first, then the lowest ordinal): the first lending peer with NVLink from GPU 0, else the first
    lending peer; None when none lends. `nvlink`: topology.discover()'s matrix, by CUDA ordinal."""
    lending = lending_peers(lend_budgets)
    return min(lending, key=lambda p: (topology.peer_rank(True, nvlinked(nvlink, 0, p)), p), default=None)


def choose_tiers(peers: str, lend_budgets: list[int], nvlink: list[list[bool]]) -> tuple[list[str], list[str]]:
    """(tiers with park/resume rows, tiers the switches run over), host first. --peers first: host
    and the first lending peer for both (nvlink unused); --peers all: rows for host and every
    lending peer, switches over host and the nearest peer."""
    lending = lending_peers(lend_budgets)
    if check_peers(peers) == "first":
        tiers = ["host"] + [f"gpu{p}" for p in lending[:1]]
        return tiers, tiers
    nearest = nearest_peer(lend_budgets, nvlink)
    return ["host"] + [f"gpu{p}" for p in lending], ["host"] + ([f"gpu{nearest}"] if nearest is not None else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64MiB,256MiB,1GiB,4GiB,8GiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunk", default="64MiB", help="AQUA_CHUNK: largest piece a segment moves in")
    parser.add_argument("--timeline", default="256MiB",
                        help="sizes whose park and resume timelines (the core's phase spans) are printed; "
                             "'' for none")
    parser.add_argument("--device-keep", default="0",
                        help="AQUA_DEVICE_KEEP values, comma-separated (e.g. '0,4GiB'): every row and switch is "
                             "measured once per value, in the same run, each tagged with it")
    parser.add_argument("--peers", default="first",
                        help="first: rows for host and the first lending peer; all: for host and every lending "
                             "peer, switches over host and the nearest peer")
    parser.add_argument("--out", default=None, help="result JSON path (default: benchmarks/results/...)")
    args = parser.parse_args()
    try:
        check_peers(args.peers)
    except ValueError as e:
        parser.error(str(e))
    if not torch.cuda.is_available():
        print("bench_move: needs a CUDA GPU; none here", file=sys.stderr)
        return 2
    sizes = [parse_size(s, "--sizes", allow_percent=False) for s in args.sizes.split(",")]
    keeps = [parse_size(s, "--device-keep", allow_percent=False) for s in args.device_keep.split(",") if s.strip()]
    if not keeps:
        parser.error("--device-keep: give at least one size (0: backings released after each move)")
    timeline_sizes = {parse_size(s, "--timeline", allow_percent=False) for s in args.timeline.split(",") if s}
    n = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(f"bench_move: {name} x{n}, torch {torch.__version__}, sizes {args.sizes}, repeat {args.repeat}, "
        f"chunk {args.chunk}")
    t0 = time.perf_counter()
    aq.enable(backend="cuda", host_reserve=max(sizes) * 2 + GiB, chunk=args.chunk)
    log(f"enable(): {time.perf_counter() - t0:.2f} s (pinned host backing made ahead: "
        f"{aq.stats()['tiers']['host']['pool_total'] / GiB:.1f} GiB)")
    torch.cuda.synchronize()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = physical_gpus(visible, n)
    lend_budgets = [aq.stats()["tiers"][f"gpu{d}"]["lend_budget"] for d in range(n)]
    nvlink: list[list[bool]] = []
    if args.peers == "all":
        topo = topology.discover()   # NVML: which peer is nearest
        nvlink = topo.nvlink
        linked = [physical[p] for p in range(1, n) if nvlinked(nvlink, 0, p)]
        log(f"--peers all: ordinals 0..{n - 1} are GPUs {physical} (CUDA_VISIBLE_DEVICES={visible}); NVLink from "
            f"GPU {physical[0]} to GPUs {linked}" + ("" if nvlink else f" (NVML: {'; '.join(topo.notes)})"))
    tiers, switch_tiers = choose_tiers(args.peers, lend_budgets, nvlink)
    if args.peers == "all":
        log(f"rows over {', '.join(tiers)}; switches over {', '.join(switch_tiers)}")
    if n < 2:
        log("peer tier: skipped (one GPU on this machine)")

    def ends(tier: str) -> dict:
        """The physical GPUs a row or switch of `tier` names."""
        return {"src_gpu": physical[0], "dst_gpu": gpu_label(tier, physical)}

    def pair_text(item: dict) -> str:
        dst = item["dst_gpu"]
        return f"GPU {item['src_gpu']} -> {'host' if dst == 'host' else f'GPU {dst}'}"

    rows, switches = [], []
    for keep in keeps:
        # Device keep: idle move backings each GPU keeps mapped for reuse (csrc/backings.h).
        _native.check(_native.lib().aqua_set_device_keep(keep), "--device-keep")
        log(f"device keep {keep / MiB:.0f} MiB")
        first_row, first_switch = len(rows), len(switches)
        for tier in tiers:
            if args.peers == "all":
                log(f"tier {tier}: {pair_text(ends(tier))}")
            # Warm up the mover stream, events and the driver's paths.
            bench_pair(tier, 64 * MiB, 2, lambda _line: None)
            aq.allocator.move_profile(reset=True)
            for nbytes in sizes:
                rows += [dict(row, **ends(tier)) for row in bench_pair(tier, nbytes, args.repeat, log, timeline_sizes)]
            if tier in switch_tiers:
                for method in ("evict+resume", "resume"):
                    switches.append(dict(bench_switch(tier, GiB, args.repeat * 2, log, method), **ends(tier)))
        for tier in switch_tiers:
            for method in ("evict+resume", "resume"):
                switches.append(dict(bench_switch(tier, 2 * MiB, args.repeat * 4, log, method), **ends(tier)))
        for item in rows[first_row:] + switches[first_switch:]:
            item["device_keep"] = keep

    result = {"gpu": name, "num_gpus": n, "torch": torch.__version__, "chunk": args.chunk,
              "device_keep": keeps, "rows": rows, "switches": switches, "peers": args.peers,
              "visible_devices": visible}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"bench_move-{name.replace(' ', '_')}-{n}gpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {out}")
    log("")
    # With several peers the rows differ by GPU alone: name them (--peers first prints as before).
    gpus = (lambda item: f"  {pair_text(item)}") if args.peers == "all" else (lambda _: "")
    log(f"{'keep':>6s} {'tier pair':13s} {'dir':6s} {'size':>9s} {'GiB/s':>7s} {'raw':>7s} {'ratio':>6s}")
    for r in rows:
        log(f"{r['device_keep'] / MiB:5.0f}M {r['tier_pair']:13s} {r['direction']:6s} {r['bytes'] / MiB:7.0f}Mi "
            f"{r['gib_s']:7.2f} {r['raw_gib_s']:7.2f} {r['ratio']:6.3f}{gpus(r)}")
    for s in switches:
        log(f"keep {s['device_keep'] / MiB:.0f} MiB: switch {s['switch_bytes'] / MiB:.0f} MiB over {s['tier']} "
            f"({s['method']}; evicted to {', '.join(s['tiers_used'])}): {s['ms']:.2f} ms{gpus(s)}")
    _native.lib().aqua_shutdown(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
