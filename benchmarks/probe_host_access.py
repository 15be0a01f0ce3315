"""What does granting the GPU access to pinned host memory cost, and what does it cost the
copies it overlaps? (GPU probe, one GPU, about 30 s)

A park to host ends each 64 MiB piece with cuMemSetAccess on host memory at the context's
home address: about 0.57 ms per 64 MiB when idle (probe_park_copy), about 0.86 ms while
copies run, and a device-to-host copy that overlaps it runs at about 0.93 of the link. That
is what keeps parks of 256 MiB to 1 GiB at 0.88 to 0.89 of the raw copy (bench_move). This
probe asks which of the knobs the driver API has changes either cost:

  part 1, idle (no copy running), 256 MiB of host memory mapped at one reserved range:
    location        HOST_NUMA (what the core creates) or HOST
    handle bytes    2 MiB, 64 MiB (the core's piece) or 256 MiB
    prestaged       the handles are also mapped at a VA of their own with access (the host
                    pool's layout) or not
    calls           one cuMemSetAccess per handle, or one over the whole 256 MiB
  and, for reference, device memory in 64 MiB handles, and read-only access.
  Each row: median ms per 64 MiB of map, set-access and unmap, over --repeat cycles.

  part 2, a 1 GiB device-to-host copy (64 MiB copies on one stream, CUDA event time) while a
  second thread re-backs 8 other 64 MiB ranges device <-> host nonstop (unmap, map, set
  access: the remap of a park then a resume), for the host memory of part 1's variants; and
  the copy on a high-priority stream, or in 16 MiB copies. Each row: copy GiB/s, its ratio to
  the same copy with no remapping, and the remapper's set-access ms per 64 MiB meanwhile.

  part 4, a park's remaps only (each range device -> host once, 16 ranges during one 1 GiB
  copy), in groups of 1, 2 or 4 ranges per set-access call, with the copies on one stream or
  round-robin on two: copy time lost and set-access time, per 64 MiB remapped.

  part 3, the link itself: one 1 GiB device-to-host copy against two 512 MiB halves on two
  streams at once (does a second copy engine add bandwidth?).

    python benchmarks/probe_host_access.py [--repeat 5] [--out PATH]

Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from ctypes import byref, c_uint64

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_park_copy import (  # noqa: E402  (the driver bindings and VMM helpers)
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE, CU_MEM_LOCATION_TYPE_DEVICE, CU_MEM_LOCATION_TYPE_HOST,
    CU_MEM_LOCATION_TYPE_HOST_NUMA, AccessDesc, RangeCycler, Vmm, open_primary_context, run_and_write, torch_and_driver)

MiB, GiB = 1 << 20, 1 << 30
CU_MEM_ACCESS_FLAGS_PROT_READ = 1
LOCATIONS = {"numa": CU_MEM_LOCATION_TYPE_HOST_NUMA, "host": CU_MEM_LOCATION_TYPE_HOST}


class Backing:
    """`total` bytes of host (or device) memory in handles of `handle_bytes`, optionally each
    also mapped at a VA of its own with access (the host pool's layout)."""

    def __init__(self, vmm: Vmm, kind: str, handle_bytes: int, total: int, prestaged: bool) -> None:
        self.vmm, self.handle_bytes = vmm, handle_bytes
        prop = vmm.prop_device(vmm.device) if kind == "device" else vmm.prop_host(LOCATIONS[kind], 0)
        self.handles = []
        for _ in range(total // handle_bytes):
            h = c_uint64()
            vmm.drv("cuMemCreate", byref(h), handle_bytes, byref(prop), 0)
            vmm.handles.append(h.value)
            self.handles.append(h.value)
            if prestaged:
                va = vmm.reserve(handle_bytes)
                vmm.map(va, handle_bytes, h.value)
                vmm.set_access(va, handle_bytes)

    def map_at(self, va: int) -> None:
        for i, h in enumerate(self.handles):
            self.vmm.map(va + i * self.handle_bytes, self.handle_bytes, h)

    def unmap_at(self, va: int) -> None:
        for i in range(len(self.handles)):
            self.vmm.unmap(va + i * self.handle_bytes, self.handle_bytes)

    def set_access_at(self, va: int, one_call: bool, flags: int = CU_MEM_ACCESS_FLAGS_PROT_READWRITE) -> None:
        desc = AccessDesc()
        desc.location.type, desc.location.id, desc.flags = CU_MEM_LOCATION_TYPE_DEVICE, self.vmm.device, flags
        spans = [(va, self.handle_bytes * len(self.handles))] if one_call else \
            [(va + i * self.handle_bytes, self.handle_bytes) for i in range(len(self.handles))]
        for start, size in spans:
            self.vmm.drv("cuMemSetAccess", start, size, byref(desc), 1)


def idle_costs(vmm: Vmm, backing: Backing, va: int, repeat: int, one_call: bool, flags: int) -> dict:
    """Median ms per 64 MiB of map / set-access / unmap at `va`, over `repeat` cycles after one."""
    per = backing.handle_bytes * len(backing.handles) / (64 * MiB)
    t = {"map": [], "set_access": [], "unmap": []}
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        backing.map_at(va)
        t1 = time.perf_counter()
        backing.set_access_at(va, one_call, flags)
        t2 = time.perf_counter()
        backing.unmap_at(va)
        t3 = time.perf_counter()
        if i:
            t["map"].append(t1 - t0)
            t["set_access"].append(t2 - t1)
            t["unmap"].append(t3 - t2)
    return {k + "_ms": round(statistics.median(v) * 1e3 / per, 4) for k, v in t.items()}


class Rebacker(RangeCycler):
    """Re-backs each of `vas` (64 MiB each) alternately with its device and its host backing,
    nonstop: unmap, map, one set-access over the range. Records set-access seconds of the
    host re-backings, with their end times."""

    def __init__(self, vmm: Vmm, ctx, vas, dev: list[Backing], host: list[Backing]) -> None:
        super().__init__(vmm, ctx, vas)
        self.dev, self.host = dev, host
        self.on_host = [False] * len(vas)
        self.host_access: list[tuple[float, float]] = []  # (end, seconds)

    def cycle(self, i: int, va: int) -> None:
        old = self.host[i] if self.on_host[i] else self.dev[i]
        new = self.dev[i] if self.on_host[i] else self.host[i]
        old.unmap_at(va)
        new.map_at(va)
        t0 = time.perf_counter()
        new.set_access_at(va, one_call=True)
        t1 = time.perf_counter()
        self.on_host[i] = not self.on_host[i]
        if self.on_host[i]:
            self.host_access.append((t1, t1 - t0))

    def finish(self) -> None:
        self.stop.set()
        self.join()
        for i, va in enumerate(self.vas):  # leave every range on its device backing
            if self.on_host[i]:
                self.host[i].unmap_at(va)
                self.dev[i].map_at(va)
                self.dev[i].set_access_at(va, one_call=True)
                self.on_host[i] = False
        if self.error:
            raise self.error


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="cycles (part 1) or copies (parts 2, 3) per row, median")
    ap.add_argument("--out", default="benchmarks/results/probe_host_access.json")
    a = ap.parse_args()
    found = torch_and_driver("probe_host_access")
    if not found:
        return 0
    torch, drv = found
    t_start = time.perf_counter()
    ctx = open_primary_context(torch, drv, 0)
    vmm = Vmm(drv, 0, torch.cuda.device_count())
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "repeat": a.repeat,
                    "idle": [], "copy": [], "link": []}
    print(f"probe_host_access: {result['device']}, torch {result['torch']}, repeat {a.repeat}", flush=True)
    run_and_write(lambda: run(torch, vmm, ctx, a.repeat, result), torch, vmm, a.out, result, t_start)
    return 0


def run(torch, vmm: Vmm, ctx, repeat: int, result: dict) -> None:
    total = 256 * MiB
    va = vmm.reserve(total)
    # part 1: idle costs
    print("part 1: idle, ms per 64 MiB (256 MiB mapped at one range)", flush=True)
    variants = [("device", 64 * MiB, False, False, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)]
    for kind in ("numa", "host"):
        for hb in (2 * MiB, 64 * MiB, 256 * MiB):
            for prestaged in (True, False):
                for one_call in ((True, False) if hb == 2 * MiB else (False,)):
                    variants.append((kind, hb, prestaged, one_call, CU_MEM_ACCESS_FLAGS_PROT_READWRITE))
    variants.append(("numa", 64 * MiB, True, False, CU_MEM_ACCESS_FLAGS_PROT_READ))
    variants.append(("numa", 64 * MiB, True, True, CU_MEM_ACCESS_FLAGS_PROT_READWRITE))
    for kind, hb, prestaged, one_call, flags in variants:
        backing = Backing(vmm, kind, hb, total, prestaged)
        row = {"memory": kind, "handle_mib": hb // MiB, "prestaged": prestaged,
               "set_access_calls": "one" if one_call else "per handle",
               "access": "read" if flags == CU_MEM_ACCESS_FLAGS_PROT_READ else "read-write"}
        row.update(idle_costs(vmm, backing, va, repeat, one_call, flags))
        result["idle"].append(row)
        print(f"  {kind:6s} handle {hb // MiB:4d} MiB  prestaged {str(prestaged):5s}  set-access "
              f"{row['set_access_calls']:10s} {row['access']:10s}  map {row['map_ms']:.4f}  "
              f"set-access {row['set_access_ms']:.4f}  unmap {row['unmap_ms']:.4f}", flush=True)

    # part 2: a device-to-host copy while other ranges are re-backed
    print("part 2: 1 GiB device-to-host copy while 8 other 64 MiB ranges are re-backed device <-> host",
          flush=True)
    n = GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    src.random_(0, 256)
    k, piece = 8, 64 * MiB
    others = vmm.reserve(k * piece)
    vas = [others + i * piece for i in range(k)]
    dev = [Backing(vmm, "device", piece, piece, False) for _ in range(k)]
    for b, v in zip(dev, vas):
        b.map_at(v)
        b.set_access_at(v, one_call=True)
    hosts = {(kind, hb): [Backing(vmm, kind, hb, piece, True) for _ in range(k)]
             for kind, hb in (("numa", 64 * MiB), ("host", 64 * MiB), ("numa", 2 * MiB))}
    normal, high = torch.cuda.Stream(), torch.cuda.Stream(priority=-1)

    def copy_gib_s(stream, chunk: int) -> float:
        """GiB/s of n bytes in `chunk` copies on `stream`, CUDA event time, median of repeat."""
        times = []
        for _ in range(repeat):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                e0.record()
                for off in range(0, n, chunk):
                    dst[off:off + chunk].copy_(src[off:off + chunk], non_blocking=True)
                e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        return n / statistics.median(times) / GiB

    base = {}
    for name, stream, chunk in (("normal", normal, piece), ("high", high, piece), ("normal", normal, 16 * MiB)):
        base[(name, chunk)] = copy_gib_s(stream, chunk)
    for host_key in list(hosts) + [None]:
        for name, stream, chunk in (("normal", normal, piece), ("high", high, piece), ("normal", normal, 16 * MiB)):
            if host_key is None and (name, chunk) != ("normal", piece):
                continue
            rb = Rebacker(vmm, ctx, vas, dev, hosts[host_key] if host_key else dev)
            rb.start()
            time.sleep(0.01)
            t0 = time.perf_counter()
            gib_s = copy_gib_s(stream, chunk)
            t1 = time.perf_counter()
            rb.finish()
            during = [s for end, s in rb.host_access if t0 <= end <= t1]
            row = {"rebacked_with": f"{host_key[0]}/{host_key[1] // MiB}MiB" if host_key else "device only",
                   "stream": name, "copy_mib": chunk // MiB, "gib_s": round(gib_s, 2),
                   "alone_gib_s": round(base[(name, chunk)], 2), "ratio": round(gib_s / base[(name, chunk)], 3),
                   "host_set_access_ms": round(statistics.median(during) * 1e3, 4) if during else None,
                   "host_set_accesses": len(during)}
            result["copy"].append(row)
            print(f"  rebacked with {row['rebacked_with']:11s} stream {name:6s} copies {chunk // MiB:3d} MiB  "
                  f"{gib_s:6.2f} GiB/s  alone {base[(name, chunk)]:6.2f}  ratio {row['ratio']:.3f}  host set-access "
                  f"{row['host_set_access_ms']} ms per 64 MiB ({len(during)} during)", flush=True)

    # part 4: what a park's home remaps cost the copies, per 64 MiB remapped
    print("part 4: 1 GiB device-to-host copy while 16 other 64 MiB ranges go device -> host once each, "
          "in groups of `batch` (unmap and map each, one set-access over the group)", flush=True)
    m = 16
    park_va = vmm.reserve(m * piece)
    park_vas = [park_va + i * piece for i in range(m)]
    park_dev = [Backing(vmm, "device", piece, piece, False) for _ in range(m)]
    park_host = [Backing(vmm, "numa", piece, piece, True) for _ in range(m)]
    for b, v in zip(park_dev, park_vas):
        b.map_at(v)
        b.set_access_at(v, one_call=True)
    streams = [normal, torch.cuda.Stream()]

    def copy_on(num_streams: int) -> tuple[float, float]:
        """(event seconds, host time the copy was seen done) of n bytes in 64 MiB copies
        spread round-robin over num_streams streams."""
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(normal)
        for j, off in enumerate(range(0, n, piece)):
            st = streams[j % num_streams]
            if j < num_streams and st is not normal:
                st.wait_event(e0)
            with torch.cuda.stream(st):
                dst[off:off + piece].copy_(src[off:off + piece], non_blocking=True)
        for st in streams[1:num_streams]:
            ev = torch.cuda.Event()
            ev.record(st)
            normal.wait_event(ev)
        e1.record(normal)
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3, time.perf_counter()

    for num_streams in (1, 2):
        alone = statistics.median(copy_on(num_streams)[0] for _ in range(repeat))
        for batch in (1, 2, 4):
            losses, access_ms = [], []
            for _ in range(repeat):
                done: list[tuple[float, int, float]] = []  # (end, pieces, set-access seconds)

                def park_all() -> None:
                    vmm.drv("cuCtxSetCurrent", ctx)
                    for g in range(0, m, batch):
                        for i in range(g, g + batch):
                            park_dev[i].unmap_at(park_vas[i])
                            park_host[i].map_at(park_vas[i])
                        desc = AccessDesc()
                        desc.location.type, desc.location.id = CU_MEM_LOCATION_TYPE_DEVICE, vmm.device
                        desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                        t0 = time.perf_counter()
                        vmm.drv("cuMemSetAccess", park_vas[g], batch * piece, byref(desc), 1)
                        t1 = time.perf_counter()
                        done.append((t1, batch, t1 - t0))

                th = threading.Thread(target=park_all)
                th.start()
                t_copy, t_seen = copy_on(num_streams)
                th.join()
                during = [(k_, a_) for end, k_, a_ in done if end <= t_seen]
                pieces_during = sum(k_ for k_, _ in during)
                if pieces_during:
                    losses.append((t_copy - alone) * 1e3 / pieces_during)
                    access_ms.append(sum(a_ for _, a_ in during) * 1e3 / pieces_during)
                for i in range(m):  # back on the device, untimed
                    park_host[i].unmap_at(park_vas[i])
                    park_dev[i].map_at(park_vas[i])
                    park_dev[i].set_access_at(park_vas[i], one_call=True)
            row = {"streams": num_streams, "batch": batch, "alone_gib_s": round(n / alone / GiB, 2),
                   "copy_ms_lost_per_64mib": round(statistics.median(losses), 4) if losses else None,
                   "set_access_ms_per_64mib": round(statistics.median(access_ms), 4) if access_ms else None}
            result.setdefault("park_remaps", []).append(row)
            print(f"  {num_streams} stream(s), groups of {batch}: copy alone {row['alone_gib_s']} GiB/s; copy time "
                  f"lost {row['copy_ms_lost_per_64mib']} ms and set-access {row['set_access_ms_per_64mib']} ms "
                  f"per 64 MiB remapped", flush=True)

    # part 3: one copy against two halves on two streams
    print("part 3: the link", flush=True)
    one = copy_gib_s(normal, n)
    other = torch.cuda.Stream()
    times = []
    for _ in range(repeat):
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record(normal)
        other.wait_event(e0)
        with torch.cuda.stream(normal):
            dst[: n // 2].copy_(src[: n // 2], non_blocking=True)
        with torch.cuda.stream(other):
            dst[n // 2:].copy_(src[n // 2:], non_blocking=True)
            e2.record()
        normal.wait_event(e2)
        e1.record(normal)
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    two = n / statistics.median(times) / GiB
    result["link"] = {"one_copy_gib_s": round(one, 2), "two_streams_gib_s": round(two, 2)}
    print(f"  one 1 GiB copy {one:.2f} GiB/s; two 512 MiB copies on two streams {two:.2f} GiB/s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
