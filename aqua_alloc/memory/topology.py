"""Topology: the GPUs, how they reach each other, and the host's memory.

GPU facts come from NVML (``pynvml``, the nvidia-ml-py package): names, memory, and NVLink
peer-to-peer status between pairs. Whether a GPU may map another's memory at all is the
CUDA driver's ``cuDeviceCanAccessPeer``, asked through the core when it runs over CUDA.
Host memory comes from psutil. Nothing here raises for a missing GPU or driver: what could
not be seen is listed in ``notes``.

Device indices are CUDA ordinals. NVML enumerates by PCI bus id, which is CUDA's order only
under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; we match the two by PCI bus id when torch can say it.
"""

from __future__ import annotations

import dataclasses

import psutil


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    index: int          # CUDA ordinal
    name: str
    total_bytes: int
    free_bytes: int


@dataclasses.dataclass(frozen=True)
class Topology:
    gpus: list[GpuInfo]
    peer_access: list[list[bool]]   # [i][j]: GPU i may map GPU j's memory (CUDA)
    nvlink: list[list[bool]]        # [i][j]: NVML reports NVLink P2P between i and j
    host_total_bytes: int
    host_available_bytes: int
    notes: list[str]                # what could not be seen, and why


def _nvml_gpus(notes: list[str]) -> tuple[list[GpuInfo], list[list[bool]]]:
    try:
        import pynvml
    except ImportError:
        notes.append("pynvml (nvidia-ml-py) is not installed: no GPU information from NVML")
        return [], []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        notes.append(f"NVML unavailable ({exc}): no NVIDIA driver on this machine?")
        return [], []
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus = []
        for i, h in enumerate(handles):
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(GpuInfo(index=i, name=name, total_bytes=int(mem.total), free_bytes=int(mem.free)))
        nvlink = [[False] * count for _ in range(count)]
        for i in range(count):
            for j in range(count):
                if i == j:
                    continue
                try:
                    status = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                    nvlink[i][j] = status == pynvml.NVML_P2P_STATUS_OK
                except Exception as exc:
                    notes.append(f"NVLink status of GPUs {i}->{j} unknown ({exc})")
        return gpus, nvlink
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def discover(core_peer_access: list[list[bool]] | None = None) -> Topology:
    """What this machine offers. `core_peer_access`: the driver's peer matrix when known."""
    notes: list[str] = []
    gpus, nvlink = _nvml_gpus(notes)
    n = len(gpus)
    if core_peer_access is not None and len(core_peer_access) == n:
        peer = [list(row) for row in core_peer_access]
    else:
        # Without the driver's answer, NVLink P2P implies access; PCIe P2P is not assumed.
        peer = [[i == j or nvlink[i][j] for j in range(n)] for i in range(n)]
        if n > 1:
            notes.append("peer access from NVML only (the CUDA driver was not asked)")
    vm = psutil.virtual_memory()
    return Topology(gpus=gpus, peer_access=peer, nvlink=nvlink, host_total_bytes=int(vm.total),
                    host_available_bytes=int(vm.available), notes=notes)
