"""The move benchmark's choices on CPU (issue 23): which tiers --peers measures, which peer the
switches run over, and the physical GPUs rows name under a rotated CUDA_VISIBLE_DEVICES.
(The benchmark itself needs a GPU.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_move as bm  # noqa: E402

GiB = 1 << 30
ALL_NVLINK_4 = [[i != j for j in range(4)] for i in range(4)]  # NVML's matrix: every pair linked
NO_NVLINK_4 = [[False] * 4 for _ in range(4)]


def nvlink_pairs(n: int, pairs: list[tuple[int, int]]) -> list[list[bool]]:
    """An n x n NVML matrix (physical indices) with NVLink on `pairs`, both ways."""
    m = [[False] * n for _ in range(n)]
    for i, j in pairs:
        m[i][j] = m[j][i] = True
    return m


# physical_gpus / gpu_label


@pytest.mark.parametrize("visible, num_gpus, physical", [
    (None, 4, [0, 1, 2, 3]),                  # unset: ordinals
    ("3,0,1,2", 4, [3, 0, 1, 2]),             # the source GPU rotated first
    ("7,0,1,2,3,4,5,6", 8, [7, 0, 1, 2, 3, 4, 5, 6]),
    (" 5, 2", 2, [5, 2]),                     # spaces around entries
    ("6,4,2", 2, [6, 4]),                     # more entries than torch counts: the first ones
    ("GPU-8f2c,GPU-11ab", 2, [0, 1]),         # UUIDs: ordinals
    ("MIG-GPU-8f2c/1/0", 1, [0]),
    ("3,GPU-11ab", 2, [0, 1]),                # not all integers: ordinals
    ("-1,0", 2, [0, 1]),
    ("", 0, []),
])
def test_physical_gpus_follow_cuda_visible_devices_when_it_lists_integers(visible, num_gpus, physical):
    assert bm.physical_gpus(visible, num_gpus) == physical


def test_rows_name_host_or_the_physical_gpu_of_the_tier():
    physical = bm.physical_gpus("3,0,1,2", 4)
    assert [bm.gpu_label(t, physical) for t in ("host", "gpu1", "gpu2", "gpu3")] == ["host", 0, 1, 2]
    assert bm.gpu_label("gpu0", physical) == 3


# lending_peers / nearest_peer


def test_lending_peers_are_the_other_gpus_with_a_lend_budget_lowest_first():
    assert bm.lending_peers([80 * GiB, 0, 40 * GiB, 1]) == [2, 3]   # GPU 0's own budget does not count
    assert bm.lending_peers([80 * GiB]) == []


@pytest.mark.parametrize("lend_budgets, nvlink, nearest", [
    ([GiB, GiB, GiB, GiB], ALL_NVLINK_4, 1),                    # all linked: the lowest
    ([GiB, GiB, GiB, GiB], nvlink_pairs(4, [(0, 2)]), 2),       # NVLink before a lower index
    ([GiB, 0, GiB, GiB], nvlink_pairs(4, [(0, 1), (0, 3)]), 3),  # linked but not lending
    ([GiB, GiB, GiB, GiB], NO_NVLINK_4, 1),                     # no NVLink: the first lending
    ([GiB, GiB, 0, GiB], [], 1),                                # NVML unseen: the first lending
    ([GiB, GiB, GiB, GiB], nvlink_pairs(4, [(1, 3)]), 1),       # a link between two peers is not GPU 0's
    ([GiB, GiB, GiB], [[False, True], [True, False]], 1),       # a matrix smaller than the GPUs: as far as it goes
    ([GiB, GiB, GiB], [[False, False], [False, False]], 1),     # ... and no NVLink beyond it
    ([GiB, 0, 0, 0], ALL_NVLINK_4, None),                       # nobody lends
    ([GiB], [], None),                                          # one GPU
])
def test_nearest_peer_is_the_first_lending_peer_with_nvlink_else_the_first_lending(lend_budgets, nvlink, nearest):
    assert bm.nearest_peer(lend_budgets, nvlink) == nearest


# choose_tiers


def test_peers_first_measures_host_and_the_first_lending_peer_as_before():
    rows, switches = bm.choose_tiers("first", [GiB, 0, GiB, GiB], nvlink_pairs(4, [(0, 3)]))
    assert rows == switches == ["host", "gpu2"]   # NVLink does not move --peers first off the first lender
    assert bm.choose_tiers("first", [GiB], []) == (["host"], ["host"])


def test_peers_all_measures_every_lending_peer_and_switches_over_the_nearest():
    budgets = [GiB, GiB, 0, GiB, GiB, GiB, GiB, GiB]
    nvlink = nvlink_pairs(8, [(0, 5), (0, 7)])  # by ordinal, as topology.discover() gives it
    physical = [6, 0, 1, 2, 3, 4, 5, 7]       # source GPU 6 first; GPU 4 is ordinal 5
    rows, switches = bm.choose_tiers("all", budgets, nvlink)
    assert rows == ["host", "gpu1", "gpu3", "gpu4", "gpu5", "gpu6", "gpu7"]
    assert switches == ["host", "gpu5"]
    assert [bm.gpu_label(t, physical) for t in rows] == ["host", 0, 2, 3, 4, 5, 7]


def test_peers_all_without_a_lending_peer_measures_host_alone():
    assert bm.choose_tiers("all", [GiB, 0, 0, 0], ALL_NVLINK_4) == (["host"], ["host"])


@pytest.mark.parametrize("peers", ["nearest", "ALL", "", "first,all"])
def test_a_wrong_peers_choice_is_named_with_what_is_accepted(peers):
    message = f"--peers {peers!r}: expected one of first, all"
    with pytest.raises(ValueError) as refused:
        bm.check_peers(peers)
    assert str(refused.value) == message
    with pytest.raises(ValueError) as refused:
        bm.choose_tiers(peers, [GiB, GiB], ALL_NVLINK_4)
    assert str(refused.value) == message


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "bench_move.py"), *args],
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_command_line_refuses_a_wrong_peers_choice_before_it_needs_a_gpu():
    done = run_bench("--peers", "nearest")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "bench_move.py: error: --peers 'nearest': expected one of first, all"


@pytest.mark.skipif(bm.torch.cuda.is_available(), reason="would run the benchmark on this GPU")
@pytest.mark.parametrize("peers", ["first", "all"])
def test_the_command_line_accepts_each_peers_choice(peers):
    done = run_bench("--peers", peers)
    assert done.returncode == 2
    assert done.stderr == "bench_move: needs a CUDA GPU; none here\n"
