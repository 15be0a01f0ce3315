"""Topology: the GPUs, how they reach each other, and the host's memory.

GPU facts come from NVML (``pynvml``, the nvidia-ml-py package): names, memory, and NVLink
peer-to-peer status between pairs. Whether a GPU may map another's memory at all is the
CUDA driver's ``cuDeviceCanAccessPeer``, asked through the core when it runs over CUDA.
Host memory comes from psutil. Nothing here raises for a missing GPU or driver: what could
not be seen is listed in ``notes``.

Device indices are CUDA ordinals. NVML enumerates every GPU of the machine by PCI bus id;
CUDA enumerates those ``CUDA_VISIBLE_DEVICES`` leaves, fastest first unless
``CUDA_DEVICE_ORDER=PCI_BUS_ID``. The two are matched by GPU UUID (CUDA's through torch),
so that a process that sees GPUs 2 and 3 as ordinals 0 and 1 gets their rows of the NVLink
matrix. When they cannot be matched (no torch, MIG instances), NVML's order is kept and a
note says so.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

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


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nvml_gpus(notes: list[str]) -> tuple[list[GpuInfo], list[list[bool]], list[str]]:
    """Every GPU NVML sees, in its order (PCI bus id), their NVLink matrix and their UUIDs."""
    try:
        import pynvml
    except ImportError:
        notes.append("pynvml (nvidia-ml-py) is not installed: no GPU information from NVML")
        return [], [], []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        notes.append(f"NVML unavailable ({exc}): no NVIDIA driver on this machine?")
        return [], [], []
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus, uuids = [], []
        for i, h in enumerate(handles):
            name = _text(pynvml.nvmlDeviceGetName(h))
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(GpuInfo(index=i, name=name, total_bytes=int(mem.total), free_bytes=int(mem.free)))
            uuids.append(_text(pynvml.nvmlDeviceGetUUID(h)))
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
        return gpus, nvlink, uuids
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def peer_rank(can_access: bool, nvlinked: bool) -> int:
    """How much a GPU prefers a peer as the tier for its parked contexts (lower first; -1:
    never): NVLink peers, then peers over PCIe; a peer it cannot map, never."""
    return -1 if not can_access else (0 if nvlinked else 1)


def cuda_uuids() -> list[str] | None:
    """Each CUDA ordinal's GPU UUID as NVML and ``nvidia-smi -L`` write it (``GPU-...``);
    None when torch or CUDA cannot say."""
    try:
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        uuids = []
        for d in range(torch.cuda.device_count()):
            uuid = str(getattr(torch.cuda.get_device_properties(d), "uuid", "") or "")
            if not uuid:
                return None  # a torch that does not report UUIDs
            uuids.append(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        return uuids
    except Exception:  # a broken driver: discover() reports what NVML saw
        return None


def in_cuda_order(gpus: list[GpuInfo], nvlink: list[list[bool]], nvml_uuids: Sequence[str],
                  uuids: Sequence[str] | None, notes: list[str]) -> tuple[list[GpuInfo], list[list[bool]]]:
    """NVML's GPUs and NVLink matrix re-indexed by CUDA ordinal: CUDA's ordinal d is the GPU
    whose UUID is ``uuids[d]``; GPUs CUDA does not see are left out. When a UUID is not
    NVML's (a MIG instance) or ``uuids`` is None, NVML's order is kept and a note says so."""
    if uuids is None:
        if gpus:
            notes.append("GPU indices are NVML's (PCI bus order): CUDA's UUIDs could not be read to match them")
        return gpus, nvlink
    row = {u: i for i, u in enumerate(nvml_uuids)}
    unknown = [u for u in uuids if u not in row]
    if unknown:
        notes.append(f"GPU indices are NVML's (PCI bus order): CUDA devices {', '.join(unknown)} are not GPUs "
                     "NVML lists (MIG instances?)")
        return gpus, nvlink
    order = [row[u] for u in uuids]
    return ([dataclasses.replace(gpus[i], index=d) for d, i in enumerate(order)],
            [[nvlink[i][j] for j in order] for i in order])


def discover(core_peer_access: list[list[bool]] | None = None, uuids: Sequence[str] | None = None) -> Topology:
    """What this machine offers, indexed by CUDA ordinal. `core_peer_access`: the driver's
    peer matrix when known; `uuids`: each CUDA ordinal's GPU UUID (default: asked of torch
    when NVML sees a GPU)."""
    notes: list[str] = []
    gpus, nvlink, nvml_uuids = _nvml_gpus(notes)
    if gpus and uuids is None:
        uuids = cuda_uuids()
    gpus, nvlink = in_cuda_order(gpus, nvlink, nvml_uuids, uuids, notes)
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
