"""aqua_alloc.memory.topology: NVML's view of the machine re-indexed by CUDA ordinal, so
that a process that sees some GPUs (CUDA_VISIBLE_DEVICES) gets their own rows of the
NVLink matrix. NVML is a fake here (no GPU in CI): four GPUs where only 0-1 and 2-3 are
joined by NVLink."""

from __future__ import annotations

import sys
import types

import pytest

from aqua_alloc.memory import topology

GiB = 1 << 30
UUIDS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-dddd"]   # NVML's order (PCI bus id)
LINKED = {(0, 1), (1, 0), (2, 3), (3, 2)}


@pytest.fixture
def fake_nvml(monkeypatch):
    nvml = types.ModuleType("pynvml")
    nvml.NVML_P2P_CAPS_INDEX_NVLINK, nvml.NVML_P2P_STATUS_OK, nvml.NVML_P2P_STATUS_NOT_SUPPORTED = 3, 0, 5
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(UUIDS)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = lambda h: f"NVIDIA H200 #{h}".encode()   # bytes, as older pynvml returns
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=(140 + h) * GiB, free=(100 + h) * GiB)
    nvml.nvmlDeviceGetUUID = lambda h: UUIDS[h]
    nvml.nvmlDeviceGetP2PStatus = lambda a, b, cap: 0 if (a, b) in LINKED else 5
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_gpus_and_nvlink_follow_cuda_ordinals(fake_nvml):
    # CUDA_VISIBLE_DEVICES=3,0,2: ordinal 0 is GPU 3, 1 is GPU 0, 2 is GPU 2.
    topo = topology.discover(uuids=["GPU-dddd", "GPU-aaaa", "GPU-cccc"])
    assert [(g.index, g.name, g.total_bytes) for g in topo.gpus] == [
        (0, "NVIDIA H200 #3", 143 * GiB), (1, "NVIDIA H200 #0", 140 * GiB), (2, "NVIDIA H200 #2", 142 * GiB)]
    # GPU 3 and GPU 2 (ordinals 0 and 2) are linked; GPU 0 (ordinal 1) is linked to neither.
    assert topo.nvlink == [[False, False, True], [False, False, False], [True, False, False]]
    assert topo.peer_access == [[True, False, True], [False, True, False], [True, False, True]]
    assert not any("NVML's (PCI bus order)" in n for n in topo.notes)


def test_the_drivers_peer_matrix_is_taken_once_the_orders_agree(fake_nvml):
    core = [[True, True], [True, True]]   # the driver allows PCIe peer access too
    topo = topology.discover(core, uuids=["GPU-bbbb", "GPU-cccc"])
    assert topo.nvlink == [[False, False], [False, False]] and topo.peer_access == core


@pytest.mark.parametrize("uuids, why", [
    (None, "CUDA's UUIDs could not be read to match them"),
    (["MIG-1234", "GPU-aaaa"], "CUDA devices MIG-1234 are not GPUs NVML lists (MIG instances?)"),
])
def test_unmatched_ordinals_keep_nvmls_order_and_say_so(fake_nvml, monkeypatch, uuids, why):
    monkeypatch.setattr(topology, "cuda_uuids", lambda: None)   # what torch says when it cannot
    topo = topology.discover(uuids=uuids)
    assert [g.index for g in topo.gpus] == [0, 1, 2, 3]
    assert topo.nvlink == [[(i, j) in LINKED for j in range(4)] for i in range(4)]
    assert [n for n in topo.notes if "PCI bus order" in n] == [f"GPU indices are NVML's (PCI bus order): {why}"]


def test_no_gpu_no_note():
    notes: list[str] = []
    assert topology.in_cuda_order([], [], [], None, notes) == ([], []) and notes == []


def test_cuda_uuids_without_cuda_is_none():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: its UUIDs are read (the GPU tests cover them)")
    assert topology.cuda_uuids() is None
