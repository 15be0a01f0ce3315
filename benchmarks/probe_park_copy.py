"""Why does a park (device -> host) reach only 0.80 to 0.90 of the raw copy rate while a
resume (host -> device) reaches 0.92 to 1.03? (GPU probe, one GPU, about 20 to 30 s)

bench_move on the H200: park 40.6 / 44.7 / 46.3 GiB/s at 256 MiB / 1 GiB / 4 GiB against a
raw pinned device-to-host copy of about 51 GiB/s; resume at 0.92 / 0.97 / 1.03 of raw. At
4 GiB the park loses about 10% in steady state, more than its one exposed last remap. A
park (Mover::execute, csrc/mover.cpp) issues one cuMemcpyAsync per 64 MiB piece up front on one
stream, from the context's home range (64 MiB device handles, cuMemCreate, one reserved
VA) into pinned host backing (cuMemCreate with a HOST_NUMA location, mapped once at a VA
of its own with access for the GPU), an event after each; then per piece in order: wait
for its event, unmap home, map the host handle at home, set access. So the suspects are:
the destination (VMM host memory instead of cudaHostAlloc memory), the copy's shape
(64 MiB copies with events instead of one), the source (VMM device memory instead of a
cudaMalloc'ed tensor), and page-table work (unmap/map/set-access) while the DMA runs.
This probe measures each on its own, in both directions, in one run:

  raw                     torch device tensor <-> torch pinned memory (cudaHostAlloc), one copy
  raw/64M                 the same as 64 MiB copies, an event recorded after each (the core's shape)
  vmmhost/1h              device tensor <-> VMM host memory, one handle for all of it, one copy
  vmmhost/64M             device tensor <-> 64 MiB VMM host handles, each at a VA of its own
                          (the host pool's layout), one copy per handle
  vmmhost/64M@numaN       the same with host memory on the GPU's own NUMA node N (only when
                          the driver says the GPU's host node is not 0, the node the core uses)
  vmm<->vmm/64M           VMM device segment (64 MiB device handles at one VA) <-> 64 MiB VMM
                          host handles: exactly a park's (or resume's) copies, no remaps
  vmm<->vmm/64M+remap-dev   the same while a second thread cycles unmap / map / set-access
                          of 8 OTHER 64 MiB device-backed ranges, nonstop
  vmm<->vmm/64M+remap-park  the same while the second thread re-backs those 8 ranges
                          device <-> host (unmap, map the other handle, set access): the
                          remap a park or resume does, on other ranges, nonstop
  park-emul / resume-emul the whole move minus bookkeeping: the copies, then per piece in
                          order wait for its event and remap the copied range itself
                          (park: home -> host handle; resume: staging map of the device
                          handle at a shadow VA, copy into it, unstage, device handle at home)
  raw (again)             raw once more at the end, to see drift within the run

Each row: median of --repeat runs (after one warm-up run) of
  wall GiB/s  bytes / host wall time from issue to stream synchronized (what bench_move times)
  dma GiB/s   bytes / CUDA event time from before the first copy to after the last one
              (the copy engine's rate, without the host's last remap)
  ratio       wall GiB/s / raw wall GiB/s of the same direction and size
The remap rows also give how many remap operations the other thread completed while the
copies ran, and the idle (no copy) cost of unmap / map / set-access per 64 MiB is printed
first, to compare with the same operations during copies.

Everything is driven through the CUDA driver API by ctypes (libcuda.so.1, entry points from
cuGetProcAddress as csrc/cuda_backend.cpp does, with the same allocation properties); torch
only makes the device tensor and the pinned buffer of the raw rows. aqua_alloc is not used.

    python benchmarks/probe_park_copy.py [--sizes 256M,1G,4G] [--repeat 5] [--out PATH]

Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import threading
import time
from ctypes import POINTER, byref, c_char_p, c_float, c_int, c_size_t, c_uint, c_uint64, c_void_p

MiB, GiB = 1 << 20, 1 << 30

# ---- CUDA driver API (values from cuda.h, CUDA 13.0) ---------------------------------------
CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_LOCATION_TYPE_HOST = 2
CU_MEM_LOCATION_TYPE_HOST_NUMA = 3
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
CU_STREAM_NON_BLOCKING = 1
CU_EVENT_DEFAULT = 0           # timing events (start/end of a run)
CU_EVENT_DISABLE_TIMING = 2    # per-piece events, as the core takes them
CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2
CU_MEMORYTYPE = {1: "host", 2: "device", 3: "array", 4: "unified"}
CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID = 134
CU_DEVICE_ATTRIBUTE_HOST_NUMA_VMM_SUPPORTED = 141  # ..._HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
API_VERSION = 12000  # the entry-point version cuda_backend.cpp asks cuGetProcAddress for


class MemLocation(ctypes.Structure):
    _fields_ = [("type", c_int), ("id", c_int)]


class AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class AllocProp(ctypes.Structure):  # CUmemAllocationProp (32 bytes, checked against cuda.h)
    _fields_ = [("type", c_int), ("requestedHandleTypes", c_int), ("location", MemLocation),
                ("win32HandleMetaData", c_void_p), ("allocFlags", AllocFlags)]


class AccessDesc(ctypes.Structure):  # CUmemAccessDesc (12 bytes)
    _fields_ = [("location", MemLocation), ("flags", c_int)]


# Entry point -> argument types (every one returns CUresult). CUdeviceptr and
# CUmemGenericAllocationHandle are 64-bit integers; streams, events, contexts are pointers.
SIGNATURES = {
    "cuGetErrorName": [c_int, POINTER(c_char_p)],
    "cuInit": [c_uint],
    "cuDriverGetVersion": [POINTER(c_int)],
    "cuDeviceGet": [POINTER(c_int), c_int],
    "cuDeviceGetAttribute": [POINTER(c_int), c_int, c_int],
    "cuDevicePrimaryCtxRetain": [POINTER(c_void_p), c_int],
    "cuCtxSetCurrent": [c_void_p],
    "cuMemGetAllocationGranularity": [POINTER(c_size_t), POINTER(AllocProp), c_int],
    "cuMemAddressReserve": [POINTER(c_uint64), c_size_t, c_size_t, c_uint64, c_uint64],
    "cuMemAddressFree": [c_uint64, c_size_t],
    "cuMemCreate": [POINTER(c_uint64), c_size_t, POINTER(AllocProp), c_uint64],
    "cuMemRelease": [c_uint64],
    "cuMemMap": [c_uint64, c_size_t, c_size_t, c_uint64, c_uint64],
    "cuMemUnmap": [c_uint64, c_size_t],
    "cuMemSetAccess": [c_uint64, c_size_t, POINTER(AccessDesc), c_size_t],
    "cuMemcpyAsync": [c_uint64, c_uint64, c_size_t, c_void_p],
    "cuStreamCreate": [POINTER(c_void_p), c_uint],
    "cuStreamSynchronize": [c_void_p],
    "cuStreamDestroy": [c_void_p],
    "cuEventCreate": [POINTER(c_void_p), c_uint],
    "cuEventRecord": [c_void_p, c_void_p],
    "cuEventSynchronize": [c_void_p],
    "cuEventElapsedTime": [POINTER(c_float), c_void_p, c_void_p],
    "cuEventDestroy": [c_void_p],
    "cuPointerGetAttribute": [c_void_p, c_int, c_uint64],
}


class CudaError(RuntimeError):
    pass


class Driver:
    """libcuda.so.1 through ctypes. Calls through these function pointers release the GIL, so
    a second Python thread's driver calls really run alongside the main thread's."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        get_proc = lib.cuGetProcAddress_v2
        get_proc.argtypes = [c_char_p, POINTER(c_void_p), c_int, c_uint64, POINTER(c_int)]
        get_proc.restype = c_int
        self._fn = {}
        for name, argtypes in SIGNATURES.items():
            p, status = c_void_p(), c_int()
            r = get_proc(name.encode(), byref(p), API_VERSION, 0, byref(status))
            if r != 0 or not p.value:
                raise CudaError(f"the CUDA driver has no entry point {name} (CUresult {r})")
            self._fn[name] = ctypes.CFUNCTYPE(c_int, *argtypes)(p.value)

    def __call__(self, name: str, *args) -> None:
        r = self._fn[name](*args)
        if r != 0:
            raise CudaError(f"{name} failed: {self.error_name(r)}")

    def try_call(self, name: str, *args) -> int:
        return self._fn[name](*args)

    def error_name(self, r: int) -> str:
        s = c_char_p()
        if self._fn["cuGetErrorName"](r, byref(s)) == 0 and s.value:
            return f"{s.value.decode()} ({r})"
        return f"CUresult {r}"


# ---- VMM helpers: the calls and properties of csrc/cuda_backend.cpp ------------------------

class Vmm:
    def __init__(self, drv: Driver, device: int, num_devices: int) -> None:
        self.drv, self.device, self.num_devices = drv, device, num_devices
        self.host_locations: dict[int, str] = {}  # NUMA node asked -> what the driver took
        self.granularity = 0
        for prop in (self.prop_device(device), self.prop_host(CU_MEM_LOCATION_TYPE_HOST_NUMA, 0)):
            g = c_size_t()
            if drv.try_call("cuMemGetAllocationGranularity", byref(g), byref(prop),
                            CU_MEM_ALLOC_GRANULARITY_MINIMUM) == 0:
                self.granularity = max(self.granularity, g.value)
        self.granularity = self.granularity or 2 * MiB
        self.handles: list[int] = []
        self.reservations: list[tuple[int, int]] = []
        self.mappings: dict[int, int] = {}  # va -> size, for teardown

    @staticmethod
    def prop_device(device: int) -> AllocProp:
        prop = AllocProp()
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type, prop.location.id = CU_MEM_LOCATION_TYPE_DEVICE, device
        return prop

    @staticmethod
    def prop_host(location_type: int, location_id: int) -> AllocProp:
        prop = AllocProp()
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type, prop.location.id = location_type, location_id
        return prop

    def create_device(self, size: int) -> int:
        h = c_uint64()
        self.drv("cuMemCreate", byref(h), size, byref(self.prop_device(self.device)), 0)
        self.handles.append(h.value)
        return h.value

    def create_host(self, size: int, numa_node: int = 0) -> int:
        """Pinned host memory as the backend makes it: HOST_NUMA (node 0 there), else plain
        HOST for drivers that lack HOST_NUMA."""
        h = c_uint64()
        r = self.drv.try_call("cuMemCreate", byref(h), size,
                              byref(self.prop_host(CU_MEM_LOCATION_TYPE_HOST_NUMA, numa_node)), 0)
        where = f"HOST_NUMA id {numa_node}"
        if r != 0:
            self.drv("cuMemCreate", byref(h), size, byref(self.prop_host(CU_MEM_LOCATION_TYPE_HOST, 0)), 0)
            where = f"HOST (HOST_NUMA id {numa_node} refused: {self.drv.error_name(r)})"
        self.host_locations[numa_node] = where
        self.handles.append(h.value)
        return h.value

    def reserve(self, size: int) -> int:
        va = c_uint64()
        self.drv("cuMemAddressReserve", byref(va), size, self.granularity, 0, 0)
        self.reservations.append((va.value, size))
        return va.value

    def map(self, va: int, size: int, handle: int) -> None:
        self.drv("cuMemMap", va, size, 0, handle, 0)
        self.mappings[va] = size

    def unmap(self, va: int, size: int) -> None:
        self.drv("cuMemUnmap", va, size)
        self.mappings.pop(va, None)

    def set_access(self, va: int, size: int, device: int | None = None) -> None:
        desc = AccessDesc()
        desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self.device if device is None else device
        desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.drv("cuMemSetAccess", va, size, byref(desc), 1)

    def host_backing(self, size: int, numa_node: int = 0) -> tuple[int, int]:
        """Backings::create_host_backing (csrc/backings.cpp): create, map once at a VA of its own, access for every
        device. Returns (handle, va)."""
        h = self.create_host(size, numa_node)
        va = self.reserve(size)
        self.map(va, size, h)
        for d in range(self.num_devices):
            self.set_access(va, size, d)
        return h, va

    def device_segment(self, size: int, piece: int) -> tuple[int, list[int]]:
        """A context's home range: one reserved VA, backed by device handles of `piece` bytes."""
        va = self.reserve(size)
        handles = []
        for off in range(0, size, piece):
            h = self.create_device(piece)
            self.map(va + off, piece, h)
            self.set_access(va + off, piece)
            handles.append(h)
        return va, handles

    def teardown(self) -> None:
        for va, size in list(self.mappings.items()):
            self.drv.try_call("cuMemUnmap", va, size)
        for va, size in self.reservations:
            self.drv.try_call("cuMemAddressFree", va, size)
        for h in self.handles:
            self.drv.try_call("cuMemRelease", h)


# ---- a second thread that remaps other ranges while copies run -----------------------------

class RangeCycler(threading.Thread):
    """A thread that calls cycle(i, va) for each of `vas` in turn, nonstop, with `ctx`
    current, until `stop` is set. `running` is set after the first cycle (or a failure); an
    exception ends the thread and is kept in `error` for the main thread to raise."""

    def __init__(self, vmm: Vmm, ctx: c_void_p, vas) -> None:
        super().__init__(daemon=True)
        self.vmm, self.ctx, self.vas = vmm, ctx, vas
        self.stop = threading.Event()
        self.running = threading.Event()
        self.error: BaseException | None = None

    def cycle(self, i: int, va: int) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            self.vmm.drv("cuCtxSetCurrent", self.ctx)
            while not self.stop.is_set():
                for i, va in enumerate(self.vas):
                    self.cycle(i, va)
                    self.running.set()
        except BaseException as e:  # reported by the main thread
            self.error = e
            self.running.set()


class Remapper(RangeCycler):
    """Cycles unmap / map / set-access over `vas` (piece bytes each) until stopped.
    mode 'dev': map the range's device handle back (page-table work only);
    mode 'park': alternate each range between its device handle and a host handle
    (the re-backing a park, then a resume, does). Records (t_unmap, t_map, t_access, t_end)
    per operation, perf_counter seconds."""

    def __init__(self, vmm: Vmm, ctx: c_void_p, vas, dev_handles, host_handles, on_host: list, piece: int,
                 mode: str):
        super().__init__(vmm, ctx, vas)
        self.piece, self.mode = piece, mode
        self.dev_handles, self.host_handles = dev_handles, host_handles
        self.on_host = on_host  # which backing each range has now (shared by every Remapper)
        self.ops: list[tuple[float, float, float, float]] = []

    def cycle(self, i: int, va: int) -> None:
        to_host = self.mode == "park" and not self.on_host[i]
        h = self.host_handles[i] if to_host else self.dev_handles[i]
        t0 = time.perf_counter()
        self.vmm.unmap(va, self.piece)
        t1 = time.perf_counter()
        self.vmm.map(va, self.piece, h)
        t2 = time.perf_counter()
        self.vmm.set_access(va, self.piece)
        t3 = time.perf_counter()
        self.on_host[i] = to_host
        self.ops.append((t0, t1, t2, t3))


def op_stats(ops, t_from: float = float("-inf"), t_to: float = float("inf")) -> dict:
    """Median ms of unmap / map / set-access over the operations that ended in [t_from, t_to]."""
    sel = [o for o in ops if t_from <= o[3] <= t_to]
    if not sel:
        return {"ops": 0}
    med = lambda xs: round(statistics.median(xs) * 1e3, 4)  # noqa: E731
    return {"ops": len(sel), "unmap_ms": med([o[1] - o[0] for o in sel]), "map_ms": med([o[2] - o[1] for o in sel]),
            "set_access_ms": med([o[3] - o[2] for o in sel]), "cycle_ms": med([o[3] - o[0] for o in sel])}


def torch_and_driver(probe: str):
    """(torch, Driver) when PyTorch sees a CUDA GPU and libcuda.so.1 loads; otherwise says
    why nothing is measured and returns None."""
    try:
        import torch
    except ImportError:
        print(f"{probe}: needs PyTorch and a CUDA GPU; torch is not installed: nothing measured")
        return None
    if not torch.cuda.is_available():
        print(f"{probe}: needs a CUDA GPU; none is visible (torch.cuda.is_available() is False): nothing measured")
        return None
    try:
        return torch, Driver()
    except (OSError, CudaError) as e:
        print(f"{probe}: needs the CUDA driver (libcuda.so.1): {e}: nothing measured")
        return None


def open_primary_context(torch, drv: Driver, device: int) -> c_void_p:
    """Makes the primary context torch uses current on this thread and returns it."""
    torch.cuda.set_device(device)
    torch.cuda.init()
    drv("cuInit", 0)
    cu_dev, ctx = c_int(), c_void_p()
    drv("cuDeviceGet", byref(cu_dev), device)
    drv("cuDevicePrimaryCtxRetain", byref(ctx), cu_dev)
    drv("cuCtxSetCurrent", ctx)
    return ctx


# ---- the probe -----------------------------------------------------------------------------

def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": MiB, "G": GiB}.get(s[-1:], 1)
    return int(float(s.rstrip("KMG")) * mult)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256M,1G,4G", help="bytes per move, multiples of --piece")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per row (median), after one warm-up")
    ap.add_argument("--piece", default="64M", help="bytes per copy / handle (the core's AQUA_CHUNK, 64 MiB)")
    ap.add_argument("--remap-ranges", type=int, default=8, help="other ranges the remap thread cycles over")
    ap.add_argument("--out", default="benchmarks/results/probe_park_copy.json")
    a = ap.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    piece = parse_size(a.piece)
    if any(n % piece for n in sizes):
        ap.error("every size must be a multiple of --piece")

    found = torch_and_driver("probe_park_copy")
    if not found:
        return 0
    torch, drv = found

    t_start = time.perf_counter()
    device = 0
    ctx = open_primary_context(torch, drv, device)
    cu_dev = c_int()
    drv("cuDeviceGet", byref(cu_dev), device)
    ver = c_int()
    drv("cuDriverGetVersion", byref(ver))

    def attr(code: int) -> int | None:
        v = c_int()
        return v.value if drv.try_call("cuDeviceGetAttribute", byref(v), code, cu_dev) == 0 else None

    gpu_host_numa = attr(CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID)
    info = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "driver_api_version": ver.value, "host": platform.node(),
            "gpu_host_numa_id": gpu_host_numa,
            "host_numa_nodes": len([d for d in os.listdir("/sys/devices/system/node") if d.startswith("node")])
            if os.path.isdir("/sys/devices/system/node") else None,
            "host_numa_vmm_supported": attr(CU_DEVICE_ATTRIBUTE_HOST_NUMA_VMM_SUPPORTED),
            "sizes": sizes, "piece": piece, "repeat": a.repeat, "remap_ranges": a.remap_ranges}
    print(f"probe_park_copy: {info['device']}, torch {info['torch']}, driver API {ver.value}, "
          f"GPU's host NUMA node {gpu_host_numa}, sizes {[f'{n // MiB}MiB' for n in sizes]}, "
          f"piece {piece // MiB} MiB, repeat {a.repeat}", flush=True)

    result: dict = {"info": info, "rows": []}
    vmm = Vmm(drv, device, torch.cuda.device_count())
    run_and_write(lambda: run_probe(torch, drv, vmm, ctx, sizes, piece, a, gpu_host_numa, result),
                  torch, vmm, a.out, result, t_start)
    return 0


def run_and_write(body, torch, vmm: Vmm, out: str, result: dict, t_start: float) -> None:
    """Runs body(). Either way then writes `result` (with the probe's seconds, and the error
    that ended it, if one did, which is raised again) to `out` as JSON, and frees what `vmm`
    made."""
    try:
        body()
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out} ({result['seconds']} s)", flush=True)
        try:  # copies may still be in flight after a failure: let them end before unmapping
            torch.cuda.synchronize()
        finally:
            vmm.teardown()


def run_probe(torch, drv: Driver, vmm: Vmm, ctx, sizes, piece, a, gpu_host_numa, result) -> None:
    S = max(sizes)
    npieces = S // piece
    t0 = time.perf_counter()
    # raw buffers: cudaMalloc (torch caching allocator) and cudaHostAlloc (torch pinned)
    dev_t = torch.empty(S, dtype=torch.uint8, device="cuda")
    pin_t = torch.empty(S, dtype=torch.uint8, pin_memory=True)
    dev_ptr, pin_ptr = dev_t.data_ptr(), pin_t.data_ptr()
    # VMM host memory: one handle of S bytes; S/piece handles of piece bytes (the host pool)
    _, host1_va = vmm.host_backing(S)
    host_pieces = [vmm.host_backing(piece) for _ in range(npieces)]  # (handle, va)
    numa_pieces = None
    if gpu_host_numa is not None and gpu_host_numa > 0:
        numa_pieces = [vmm.host_backing(piece, gpu_host_numa) for _ in range(npieces)]
    # the context's home range (device handles at one VA) and a shadow VA for resume staging
    home_va, dev_handles = vmm.device_segment(S, piece)
    shadow_va = vmm.reserve(S)
    # other ranges for the remap thread: device-backed, with a host handle each to swap in
    K = a.remap_ranges
    other_va, other_dev = vmm.device_segment(K * piece, piece)
    other_vas = [other_va + i * piece for i in range(K)]
    other_host = [vmm.create_host(piece) for _ in range(K)]
    other_on_host = [False] * K  # each other range starts on its device handle
    torch.cuda.synchronize()
    print(f"setup: {time.perf_counter() - t0:.1f} s (host memory: pinned {S // MiB} MiB, VMM "
          f"{(2 * S + K * piece + (S if numa_pieces else 0)) // MiB} MiB as {vmm.host_locations}; "
          f"granularity {vmm.granularity // MiB} MiB)", flush=True)
    result["info"]["host_locations"] = {str(k): v for k, v in vmm.host_locations.items()}

    def ptr_type(p: int) -> str:
        v = c_uint()
        r = drv.try_call("cuPointerGetAttribute", byref(v), CU_POINTER_ATTRIBUTE_MEMORY_TYPE, p)
        return CU_MEMORYTYPE.get(v.value, str(v.value)) if r == 0 else f"error {drv.error_name(r)}"

    # What cuMemcpyAsync sees each pointer as (a VMM mapping of host memory may read as
    # "device", making its copy a device-to-device one for the driver).
    result["info"]["pointer_types"] = ptypes = {
        "torch device tensor": ptr_type(dev_ptr), "torch pinned": ptr_type(pin_ptr),
        "VMM host (1 handle)": ptr_type(host1_va), "VMM host (piece)": ptr_type(host_pieces[0][1]),
        "VMM device segment": ptr_type(home_va)}
    print("pointer types (cuPointerGetAttribute MEMORY_TYPE): " + ", ".join(f"{k}: {v}" for k, v in ptypes.items()))

    stream = c_void_p()
    drv("cuStreamCreate", byref(stream), CU_STREAM_NON_BLOCKING)  # as the core's mover streams
    ev_start, ev_end = c_void_p(), c_void_p()
    drv("cuEventCreate", byref(ev_start), CU_EVENT_DEFAULT)
    drv("cuEventCreate", byref(ev_end), CU_EVENT_DEFAULT)
    piece_events = []
    for _ in range(npieces):
        e = c_void_p()
        drv("cuEventCreate", byref(e), CU_EVENT_DISABLE_TIMING)
        piece_events.append(e)

    # Idle cost of the remap operations (no copy running), for comparison with the same
    # operations during copies (the remap rows).
    idle = {}
    for mode in ("dev", "park"):
        r = Remapper(vmm, ctx, other_vas, other_dev, other_host, other_on_host, piece, mode)
        r.start()
        time.sleep(0.05)
        r.stop.set()
        r.join()
        if r.error:
            raise r.error
        idle[mode] = op_stats(r.ops[2:])  # the first ones may include lazy driver setup
    result["remap_idle"] = idle
    for mode, st in idle.items():
        print(f"remap-{mode} idle, per {piece // MiB} MiB: unmap {st.get('unmap_ms')} ms, map {st.get('map_ms')} ms, "
              f"set-access {st.get('set_access_ms')} ms ({st['ops']} ops)", flush=True)

    def issue(plan) -> None:
        """The copies of `plan` [(dst, src, bytes)] on the stream; an event after each when
        there are several (as the core records one per piece)."""
        for k, (dst, src, n) in enumerate(plan):
            drv("cuMemcpyAsync", dst, src, n, stream)
            if len(plan) > 1:
                drv("cuEventRecord", piece_events[k], stream)

    def measure(direction: str, name: str, n: int, plan_fn, *, remap: str | None = None,
                prepare=None, body=None, restore=None, raw: dict | None = None) -> dict:
        """Median over a.repeat runs (one warm-up first) of one row. plan_fn(n) -> copies;
        body(n) replaces the plain issue (the emulated moves); prepare/restore run untimed
        before/after each run (setting up and undoing the emulated move's remaps)."""
        walls, dmas, extra = [], [], []
        remapper = None
        if remap:
            remapper = Remapper(vmm, ctx, other_vas, other_dev, other_host, other_on_host, piece, remap)
            remapper.start()
            remapper.running.wait()
        windows = []
        try:
            for rep in range(a.repeat + 1):
                if prepare:
                    prepare(n)
                drv("cuStreamSynchronize", stream)
                t0 = time.perf_counter()
                drv("cuEventRecord", ev_start, stream)
                host_split = body(n) if body else issue(plan_fn(n))
                if not body:
                    drv("cuEventRecord", ev_end, stream)
                drv("cuStreamSynchronize", stream)
                t1 = time.perf_counter()
                ms = c_float()
                drv("cuEventElapsedTime", byref(ms), ev_start, ev_end)
                if restore:
                    restore(n)
                if rep == 0:
                    continue  # warm-up
                walls.append(t1 - t0)
                dmas.append(ms.value / 1e3)
                windows.append((t0, t1))
                if host_split:
                    extra.append(host_split)
        finally:
            if remapper:
                remapper.stop.set()
                remapper.join()
        if remapper and remapper.error:
            raise remapper.error
        wall, dma = statistics.median(walls), statistics.median(dmas)
        row = {"direction": direction, "variant": name, "bytes": n,
               "wall_gib_s": round(n / wall / GiB, 2), "dma_gib_s": round(n / dma / GiB, 2),
               "wall_ms": [round(x * 1e3, 3) for x in walls], "dma_ms": [round(x * 1e3, 3) for x in dmas]}
        if raw:
            row["ratio"] = round(row["wall_gib_s"] / raw["wall_gib_s"], 3)
            row["dma_ratio"] = round(row["dma_gib_s"] / raw["dma_gib_s"], 3)
        if remapper:
            ops = [o for w in windows for o in remapper.ops if w[0] <= o[3] <= w[1]]
            row["remap_during"] = op_stats(ops)
            row["remap_during"]["ops_per_run"] = round(len(ops) / len(windows), 1)
        if extra:
            row["host_ms"] = {k: round(statistics.median(x[k] for x in extra) * 1e3, 3) for k in extra[0]}
        result["rows"].append(row)
        remap_note = ""
        if remapper:
            rd = row["remap_during"]
            remap_note = (f"  remaps {rd['ops_per_run']}/run, cycle {rd.get('cycle_ms')} ms "
                          f"(unmap {rd.get('unmap_ms')}, map {rd.get('map_ms')}, access {rd.get('set_access_ms')})")
        if extra:
            remap_note += "  host: " + ", ".join(f"{k} {v} ms" for k, v in row["host_ms"].items())
        print(f"{direction:4s} {name:31s} {n // MiB:6d} MiB  wall {row['wall_gib_s']:6.2f} GiB/s  "
              f"dma {row['dma_gib_s']:6.2f} GiB/s  ratio {row.get('ratio', 1.0):5.3f}{remap_note}", flush=True)
        return row

    def pieces(n: int, dsts, srcs):
        return [(dsts[k], srcs[k], piece) for k in range(n // piece)]

    dev_at = [dev_ptr + k * piece for k in range(npieces)]
    pin_at = [pin_ptr + k * piece for k in range(npieces)]
    home_at = [home_va + k * piece for k in range(npieces)]
    shadow_at = [shadow_va + k * piece for k in range(npieces)]
    hostp_at = [va for _, va in host_pieces]
    hostp_h = [h for h, _ in host_pieces]

    def remap_home(k: int, handle) -> None:  # piece k's home range onto another handle
        vmm.unmap(home_at[k], piece)
        vmm.map(home_at[k], piece, handle)
        vmm.set_access(home_at[k], piece)

    # ---- the emulated park: copies home -> host pieces, then per piece in order: wait,
    # unmap home, map the host handle at home, set access (Mover::execute, prestaged host)
    def park_body(n: int) -> dict:
        m = n // piece
        issue(pieces(n, hostp_at, home_at))
        drv("cuEventRecord", ev_end, stream)
        wait = remap_s = 0.0
        for k in range(m):
            t0 = time.perf_counter()
            drv("cuEventSynchronize", piece_events[k])
            t1 = time.perf_counter()
            remap_home(k, hostp_h[k])
            t2 = time.perf_counter()
            wait, remap_s = wait + t1 - t0, remap_s + t2 - t1
        return {"wait": wait, "remap": remap_s}

    def unpark(n: int) -> None:  # untimed: home back on its device handles
        for k in range(n // piece):
            remap_home(k, dev_handles[k])

    def park_remaps_only(n: int) -> None:  # untimed: home on the host handles (a parked context)
        for k in range(n // piece):
            remap_home(k, hostp_h[k])

    # ---- the emulated resume: home maps the host handles (parked); per piece: stage the
    # device handle at the shadow VA, copy home -> shadow, event; then per piece in order:
    # wait, unstage (unmap shadow), unmap home, map the device handle at home, set access
    def resume_body(n: int) -> dict:
        m = n // piece
        t0 = time.perf_counter()
        for k in range(m):
            vmm.map(shadow_at[k], piece, dev_handles[k])
            vmm.set_access(shadow_at[k], piece)
            drv("cuMemcpyAsync", shadow_at[k], home_at[k], piece, stream)
            drv("cuEventRecord", piece_events[k], stream)
        drv("cuEventRecord", ev_end, stream)
        stage = time.perf_counter() - t0
        wait = remap_s = 0.0
        for k in range(m):
            t0 = time.perf_counter()
            drv("cuEventSynchronize", piece_events[k])
            t1 = time.perf_counter()
            vmm.unmap(shadow_at[k], piece)
            remap_home(k, dev_handles[k])
            t2 = time.perf_counter()
            wait, remap_s = wait + t1 - t0, remap_s + t2 - t1
        return {"stage+issue": stage, "wait": wait, "remap": remap_s}

    for n in sizes:
        # device -> host (the park direction), then host -> device (the resume direction):
        # the same variants with source and destination swapped.
        for direction in ("d2h", "h2d"):
            park = direction == "d2h"

            def copies(device_side, host_side):  # one direction's (dst, src) plan of pieces
                return (lambda n: pieces(n, host_side, device_side)) if park else \
                       (lambda n: pieces(n, device_side, host_side))
            whole = (lambda n: [(pin_ptr, dev_ptr, n)]) if park else (lambda n: [(dev_ptr, pin_ptr, n)])
            vmm_pair = "vmmdev->vmmhost/64M" if park else "vmmhost->vmmdev/64M"
            raw = measure(direction, "raw", n, whole)
            measure(direction, "raw/64M", n, copies(dev_at, pin_at), raw=raw)
            measure(direction, "vmmhost/1h", n,
                    (lambda n: [(host1_va, dev_ptr, n)]) if park else (lambda n: [(dev_ptr, host1_va, n)]), raw=raw)
            measure(direction, "vmmhost/64M", n, copies(dev_at, hostp_at), raw=raw)
            if numa_pieces:
                measure(direction, f"vmmhost/64M@numa{gpu_host_numa}", n,
                        copies(dev_at, [va for _, va in numa_pieces]), raw=raw)
            measure(direction, vmm_pair, n, copies(home_at, hostp_at), raw=raw)
            for remap in ("dev", "park"):
                measure(direction, f"{vmm_pair}+remap-{remap}", n, copies(home_at, hostp_at), remap=remap, raw=raw)
            if park:
                measure(direction, "park-emul", n, None, body=park_body, restore=unpark, raw=raw)
            else:
                measure(direction, "resume-emul", n, None, prepare=park_remaps_only, body=resume_body, raw=raw)
            measure(direction, "raw (again)", n, whole, raw=raw)

    # ---- summary table ----
    print()
    print(f"{'dir':4s} {'variant':32s} {'size':>7s} {'wall GiB/s':>10s} {'dma GiB/s':>10s} {'ratio':>6s} "
          f"{'dma ratio':>9s}  remaps/run")
    for r in result["rows"]:
        rd = r.get("remap_during", {})
        print(f"{r['direction']:4s} {r['variant']:32s} {r['bytes'] // MiB:5d}Mi {r['wall_gib_s']:10.2f} "
              f"{r['dma_gib_s']:10.2f} {r.get('ratio', 1.0):6.3f} {r.get('dma_ratio', 1.0):9.3f}  "
              f"{rd.get('ops_per_run', '')}")
    print("ratio: wall GiB/s over the raw row of the same direction and size; dma: CUDA event time of the "
          "copies alone (no final host remap).")
    for e in piece_events:
        drv.try_call("cuEventDestroy", e)
    drv.try_call("cuEventDestroy", ev_start)
    drv.try_call("cuEventDestroy", ev_end)
    drv.try_call("cuStreamDestroy", stream)
    del dev_t, pin_t


if __name__ == "__main__":
    sys.exit(main())
