"""benchmarks/topology_check.py on CPU: ``nvidia-smi topo -m`` text parsed to exact matrices,
each check failing by name against info JSON that disagrees, and the exit statuses of the
script run on saved outputs (the check itself is for a machine with 4 to 8 GPUs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import topology_check as tc  # noqa: E402

UNDERLINE, PLAIN = "\x1b[4m", "\x1b[0m"  # nvidia-smi underlines the header and the row names
LEGEND = """
Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node
  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)
  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)
  PIX  = Connection traversing at most a single PCIe bridge
  NV#  = Connection traversing a bonded set of # NVLinks
"""


def header(*cells: str) -> str:
    return f"\t{UNDERLINE}" + "\t".join(cells) + PLAIN


def row(name: str, *cells: str) -> str:
    return f"{UNDERLINE}{name}\t{PLAIN}" + "\t".join(cells)


# An 8-GPU H200 box as nvidia-smi prints it: every GPU pair NV18, four NICs (rows and
# columns), CPU and NUMA affinity, the legend and the NIC legend.
H200_8 = "\n".join([
    header("GPU0", "GPU1", "GPU2", "GPU3", "GPU4", "GPU5", "GPU6", "GPU7", "NIC0", "NIC1", "NIC2", "NIC3",
           "CPU Affinity", "NUMA Affinity", "GPU NUMA ID"),
    row("GPU0", " X ", "NV18", "NV18", "NV18", "NV18", "NV18", "NV18", "NV18", "PXB", "NODE", "SYS", "SYS",
        "0-47,96-143", "0", "", "N/A"),
    row("GPU1", "NV18", " X ", "NV18", "NV18", "NV18", "NV18", "NV18", "NV18", "PXB", "NODE", "SYS", "SYS",
        "0-47,96-143", "0", "", "N/A"),
    row("GPU2", "NV18", "NV18", " X ", "NV18", "NV18", "NV18", "NV18", "NV18", "NODE", "PXB", "SYS", "SYS",
        "0-47,96-143", "0", "", "N/A"),
    row("GPU3", "NV18", "NV18", "NV18", " X ", "NV18", "NV18", "NV18", "NV18", "NODE", "PXB", "SYS", "SYS",
        "0-47,96-143", "0", "", "N/A"),
    row("GPU4", "NV18", "NV18", "NV18", "NV18", " X ", "NV18", "NV18", "NV18", "SYS", "SYS", "PXB", "NODE",
        "48-95,144-191", "1", "", "N/A"),
    row("GPU5", "NV18", "NV18", "NV18", "NV18", "NV18", " X ", "NV18", "NV18", "SYS", "SYS", "PXB", "NODE",
        "48-95,144-191", "1", "", "N/A"),
    row("GPU6", "NV18", "NV18", "NV18", "NV18", "NV18", "NV18", " X ", "NV18", "SYS", "SYS", "NODE", "PXB",
        "48-95,144-191", "1", "", "N/A"),
    row("GPU7", "NV18", "NV18", "NV18", "NV18", "NV18", "NV18", "NV18", " X ", "SYS", "SYS", "NODE", "PXB",
        "48-95,144-191", "1", "", "N/A"),
    row("NIC0", "PXB", "PXB", "NODE", "NODE", "SYS", "SYS", "SYS", "SYS", " X ", "NODE", "SYS", "SYS"),
    row("NIC1", "NODE", "NODE", "PXB", "PXB", "SYS", "SYS", "SYS", "SYS", "NODE", " X ", "SYS", "SYS"),
    row("NIC2", "SYS", "SYS", "SYS", "SYS", "PXB", "PXB", "NODE", "NODE", "SYS", "SYS", " X ", "NODE"),
    row("NIC3", "SYS", "SYS", "SYS", "SYS", "NODE", "NODE", "PXB", "PXB", "SYS", "SYS", "NODE", " X "),
]) + "\n" + LEGEND + """
NIC Legend:

  NIC0: mlx5_0
  NIC1: mlx5_1
  NIC2: mlx5_2
  NIC3: mlx5_3
"""

H200_2 = "\n".join([
    header("GPU0", "GPU1", "CPU Affinity", "NUMA Affinity", "GPU NUMA ID"),
    row("GPU0", " X ", "NV18", "0-47,96-143", "0", "", "N/A"),
    row("GPU1", "NV18", " X ", "0-47,96-143", "0", "", "N/A"),
]) + "\n" + LEGEND

# Four GPUs, some pairs NVLink with different link counts, the others over PCIe.
MIXED_4 = "\n".join([
    header("GPU0", "GPU1", "GPU2", "GPU3", "CPU Affinity", "NUMA Affinity", "GPU NUMA ID"),
    row("GPU0", " X ", "NV4", "NV2", "SYS", "0-31", "0", "", "N/A"),
    row("GPU1", "NV4", " X ", "PHB", "SYS", "0-31", "0", "", "N/A"),
    row("GPU2", "NV2", "PHB", " X ", "NV4", "32-63", "1", "", "N/A"),
    row("GPU3", "SYS", "SYS", "NV4", " X ", "32-63", "1", "", "N/A"),
]) + "\n" + LEGEND

MIXED_4_CONNECTION = [["X", "NV4", "NV2", "SYS"],
                      ["NV4", "X", "PHB", "SYS"],
                      ["NV2", "PHB", "X", "NV4"],
                      ["SYS", "SYS", "NV4", "X"]]
MIXED_4_NVLINKS = [[0, 4, 2, 0],
                   [4, 0, 0, 0],
                   [2, 0, 0, 4],
                   [0, 0, 4, 0]]

GiB = 1 << 30

# `python -m aqua_alloc info --json` on the 2-GPU box, as it prints it.
INFO_2 = {
    "gpus": [{"index": 0, "name": "NVIDIA H200", "total_bytes": 150 * GiB, "free_bytes": 149 * GiB},
             {"index": 1, "name": "NVIDIA H200", "total_bytes": 150 * GiB, "free_bytes": 149 * GiB}],
    "peer_access": [[True, True], [True, True]],
    "nvlink": [[False, True], [True, False]],
    "host_total_bytes": 2048 * GiB, "host_available_bytes": 2000 * GiB,
    "settings": {"enabled": True},
    "plan": {"gpus": [{"index": 0, "local_budget_bytes": 140 * GiB, "lend_bytes": 0,
                       "tiers": ["gpu0", "gpu1 (NVLink)", "host"]},
                      {"index": 1, "local_budget_bytes": 140 * GiB, "lend_bytes": 0,
                       "tiers": ["gpu1", "gpu0 (NVLink)", "host"]}],
             "host_budget_bytes": 1900 * GiB, "host_reserve_bytes": GiB},
    "coordinator": {"socket": "/tmp/aqua.sock", "ledger": None, "error": None},
    "notes": ["peer access from NVML only (the CUDA driver was not asked)"],
}


def info_json(nvlinks: list[list[int]], peer_access: list[list[bool]] | None = None) -> dict:
    """info --json for a machine whose NVLink pairs are those of ``nvlinks`` (> 0), with the
    tiers aqua_alloc's cli builds: itself, NVLink peers, PCIe peers, host. Peer access as
    discover() has it without the driver (NVLink pairs only) unless given."""
    n = len(nvlinks)
    nvlink = [[i != j and nvlinks[i][j] > 0 for j in range(n)] for i in range(n)]
    if peer_access is None:
        peer_access = [[i == j or nvlink[i][j] for j in range(n)] for i in range(n)]
    plan = []
    for d in range(n):
        peers = [p for p in range(n) if p != d and peer_access[d][p]]
        tiers = ([f"gpu{d}"] + [f"gpu{p} (NVLink)" for p in peers if nvlink[d][p]]
                 + [f"gpu{p} (PCIe)" for p in peers if not nvlink[d][p]] + ["host"])
        plan.append({"index": d, "local_budget_bytes": 140 * GiB, "lend_bytes": 0, "tiers": tiers})
    return {"gpus": [{"index": i, "name": "NVIDIA H200", "total_bytes": 150 * GiB, "free_bytes": 149 * GiB}
                     for i in range(n)],
            "peer_access": peer_access, "nvlink": nvlink, "plan": {"gpus": plan}, "notes": []}


def everyone(n: int) -> list[list[bool]]:
    """Peer access between every pair, as the CUDA driver answers on an NVLink or PCIe box."""
    return [[True] * n for _ in range(n)]


def checks_of(topo_text: str, info: dict) -> dict[str, tc.Check]:
    return {c.name: c for c in tc.run_checks(tc.parse_topo(topo_text), tc.read_info(info))}


def failed_of(topo_text: str, info: dict) -> list[str]:
    return tc.failed(tc.run_checks(tc.parse_topo(topo_text), tc.read_info(info)))


# --------------------------------------------------------------------------------------
# parsing nvidia-smi topo -m


def test_the_8_gpu_h200_box_parses_to_nv18_everywhere_nics_and_legend_left_out():
    topo = tc.parse_topo(H200_8)
    assert topo.num_gpus == 8
    assert topo.connection == [["X" if i == j else "NV18" for j in range(8)] for i in range(8)]
    assert topo.nvlinks == [[0 if i == j else 18 for j in range(8)] for i in range(8)]


def test_the_2_gpu_box_parses_exactly():
    topo = tc.parse_topo(H200_2)
    assert topo.to_dict() == {"num_gpus": 2, "connection": [["X", "NV18"], ["NV18", "X"]],
                              "nvlinks": [[0, 18], [18, 0]]}


def test_the_mixed_box_gives_each_pair_its_connection_and_link_count():
    topo = tc.parse_topo(MIXED_4)
    assert topo.connection == MIXED_4_CONNECTION
    assert topo.nvlinks == MIXED_4_NVLINKS


def test_a_copy_without_escape_codes_and_with_spaces_for_tabs_reads_the_same():
    plain = re.sub(r"\x1b\[[0-9;]*m", "", H200_8).replace("\t", "    ")
    assert "\t" not in plain and "\x1b" not in plain
    assert tc.parse_topo(plain) == tc.parse_topo(H200_8)


@pytest.mark.parametrize("text, message", [
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n",
     "no header line naming GPU0: not the output of nvidia-smi topo -m"),
    (MIXED_4.replace(row("GPU3", "SYS", "SYS", "NV4", " X ", "32-63", "1", "", "N/A") + "\n", ""),
     "no row for GPU3"),
    (H200_2.replace(row("GPU1", "NV18", " X ", "0-47,96-143", "0", "", "N/A"), row("GPU1", "NV18")),
     "line 3: row GPU1 has only 1 of 2 GPU columns"),
    (MIXED_4.replace("PHB", "BOGUS", 1), "line 3: GPU1 to GPU2 is 'BOGUS'; expected NV<k>, PIX, PXB, PHB, NODE, SYS"),
    (H200_2.replace("NV18", " X ", 1), "line 2: GPU0 to GPU1 is 'X'"),
    (H200_2.replace("GPU1\t", "GPU2\t", 1), "line 1: GPU columns GPU0 GPU2, expected GPU0 to GPU1 in order"),
    (H200_2.replace(f"{UNDERLINE}GPU1\t", f"{UNDERLINE}GPU0\t", 1), "line 3: row GPU0 appears twice"),
])
def test_a_malformed_matrix_is_named(text, message):
    with pytest.raises(tc.TopoFormatError) as error:
        tc.parse_topo(text)
    assert message in str(error.value)


# --------------------------------------------------------------------------------------
# checks


@pytest.mark.parametrize("topo_text, info", [
    (H200_8, info_json(tc.parse_topo(H200_8).nvlinks)),
    (H200_8, info_json(tc.parse_topo(H200_8).nvlinks, everyone(8))),
    (H200_2, INFO_2),
    (MIXED_4, info_json(MIXED_4_NVLINKS)),
    (MIXED_4, info_json(MIXED_4_NVLINKS, everyone(4))),  # PCIe peers too, after the NVLink ones
])
def test_info_that_agrees_passes_every_check(topo_text, info):
    checks = checks_of(topo_text, info)
    assert list(checks) == ["gpu_count", "nvlink_matches", "nvlink_peer_access", "tier_order", "tier_complete"]
    assert [c.name for c in checks.values() if c.ok is not True] == []


def test_the_reasons_of_passing_checks_count_what_was_checked():
    checks = checks_of(H200_8, info_json(tc.parse_topo(H200_8).nvlinks))
    assert checks["gpu_count"].reason == "8 GPUs in both"
    assert checks["nvlink_matches"].reason == "56 of 56 ordered pairs NVLink in both"
    assert checks["nvlink_peer_access"].reason == "peer access on all 56 NVLink pairs"
    assert checks_of(MIXED_4, info_json(MIXED_4_NVLINKS))["nvlink_matches"].reason == \
        "6 of 12 ordered pairs NVLink in both"


def test_an_nvlink_pair_info_misses_fails_nvlink_matches():
    # The driver still grants peer access, so gpu5 is in gpu3's tiers (as a PCIe peer,
    # after the NVLink ones): only the matrix is wrong.
    info = info_json(tc.parse_topo(H200_8).nvlinks, everyone(8))
    info["nvlink"][3][5] = info["nvlink"][5][3] = False
    assert failed_of(H200_8, info) == ["nvlink_matches"]
    assert checks_of(H200_8, info)["nvlink_matches"].reason == \
        "gpu3->gpu5: topo NV18, info no NVLink; gpu5->gpu3: topo NV18, info no NVLink"


def test_an_nvlink_pair_nvml_misses_also_has_no_peer_access():
    # Peer access from NVML only: no NVLink, no access, so gpu5 is not in gpu3's tiers.
    nvlinks = tc.parse_topo(H200_8).nvlinks
    nvlinks[3][5] = nvlinks[5][3] = 0
    info = info_json(nvlinks)
    assert "gpu5" not in " ".join(info["plan"]["gpus"][3]["tiers"])
    assert failed_of(H200_8, info) == ["nvlink_matches", "nvlink_peer_access"]
    assert checks_of(H200_8, info)["nvlink_peer_access"].reason == \
        "gpu3->gpu5 (NV18): no peer access; gpu5->gpu3 (NV18): no peer access"


def test_an_nvlink_info_claims_where_topo_says_sys_fails_nvlink_matches_and_the_order_it_gives():
    # info's tiers for gpu3 rank gpu0 (SYS to nvidia-smi) with gpu2 (NV4), and first by index.
    nvlinks = [list(r) for r in MIXED_4_NVLINKS]
    nvlinks[0][3] = nvlinks[3][0] = 1
    checks = checks_of(MIXED_4, info_json(nvlinks))
    assert tc.failed(list(checks.values())) == ["nvlink_matches", "tier_order"]
    assert checks["nvlink_matches"].reason == "gpu0->gpu3: topo SYS, info NVLink; gpu3->gpu0: topo SYS, info NVLink"
    assert checks["tier_order"].reason == "gpu3: gpu0 (SYS) before NVLink peer gpu2 (NV4)"


def test_a_pcie_peer_ranked_before_an_nvlink_peer_fails_tier_order():
    info = info_json(MIXED_4_NVLINKS, everyone(4))
    assert info["plan"]["gpus"][0]["tiers"] == ["gpu0", "gpu1 (NVLink)", "gpu2 (NVLink)", "gpu3 (PCIe)", "host"]
    info["plan"]["gpus"][0]["tiers"] = ["gpu0", "gpu3 (PCIe)", "gpu1 (NVLink)", "gpu2 (NVLink)", "host"]
    assert failed_of(MIXED_4, info) == ["tier_order"]
    assert checks_of(MIXED_4, info)["tier_order"].reason == "gpu0: gpu3 (SYS) before NVLink peer gpu1 (NV4)"


def test_tier_order_goes_by_nvidia_smi_not_by_infos_labels():
    # gpu1's tiers call gpu2 an NVLink peer and put it first; nvidia-smi says PHB.
    info = info_json(MIXED_4_NVLINKS, everyone(4))
    info["plan"]["gpus"][1]["tiers"] = ["gpu1", "gpu2 (NVLink)", "gpu0 (NVLink)", "gpu3 (PCIe)", "host"]
    assert failed_of(MIXED_4, info) == ["tier_order"]
    assert checks_of(MIXED_4, info)["tier_order"].reason == "gpu1: gpu2 (PHB) before NVLink peer gpu0 (NV4)"


def test_a_different_gpu_count_fails_gpu_count_and_runs_nothing_else():
    checks = checks_of(H200_8, info_json(MIXED_4_NVLINKS))
    assert tc.failed(list(checks.values())) == ["gpu_count"]
    assert checks["gpu_count"].reason == "nvidia-smi sees 8 GPUs, info 4"
    assert {name: c.ok for name, c in checks.items() if name != "gpu_count"} == {
        "nvlink_matches": None, "nvlink_peer_access": None, "tier_order": None, "tier_complete": None}
    ranking = tc.nvlink_ranking(tc.parse_topo(H200_8), tc.read_info(info_json(MIXED_4_NVLINKS)))
    assert [p["gpu"] for p in ranking[2]["nvlink_peers"]] == [0, 1, 3, 4, 5, 6, 7]  # index order, not info's tiers


def test_a_matrix_of_the_wrong_shape_fails_gpu_count():
    info = info_json(MIXED_4_NVLINKS)
    info["nvlink"] = info["nvlink"][:3]
    assert failed_of(MIXED_4, info) == ["gpu_count"]
    assert checks_of(MIXED_4, info)["gpu_count"].reason == "4 GPUs, but info's nvlink is 3 rows of 4"


def test_tiers_that_miss_repeat_or_add_a_gpu_fail_tier_complete():
    info = info_json(MIXED_4_NVLINKS)
    tiers = {g["index"]: g for g in info["plan"]["gpus"]}
    tiers[0]["tiers"] = ["gpu0", "gpu1 (NVLink)", "host"]                          # gpu2 missing
    tiers[1]["tiers"] = ["gpu1", "gpu0 (NVLink)", "gpu0 (NVLink)", "host"]         # gpu0 twice
    tiers[2]["tiers"] = ["gpu0 (NVLink)", "gpu3 (NVLink)", "gpu1 (PCIe)", "host"]  # not itself first; gpu1 no access
    del info["plan"]["gpus"][3]
    assert failed_of(MIXED_4, info) == ["tier_complete"]
    assert checks_of(MIXED_4, info)["tier_complete"].reason == (
        "gpu0: peer access but not listed: gpu2; gpu1: listed twice: gpu0; "
        "gpu2: tiers start with gpu0 (NVLink), not gpu2; gpu2: listed without peer access: gpu1; "
        "gpu3: not in the plan")


def test_info_without_a_plan_fails_both_tier_checks():
    info = dict(INFO_2, plan=None, notes=["budgets do not fit this machine: ValueError: too big"])
    assert failed_of(H200_2, info) == ["tier_order", "tier_complete"]
    assert checks_of(H200_2, info)["tier_order"].reason == "info has no plan (see its notes)"


def test_nvlink_peers_are_reported_with_their_links_in_tier_order_not_checked():
    info = info_json(MIXED_4_NVLINKS)
    ranking = tc.nvlink_ranking(tc.parse_topo(MIXED_4), tc.read_info(info))
    assert ranking == [
        {"index": 0, "nvlink_peers": [{"gpu": 1, "links": 4}, {"gpu": 2, "links": 2}], "most_links_first": True},
        {"index": 1, "nvlink_peers": [{"gpu": 0, "links": 4}], "most_links_first": True},
        {"index": 2, "nvlink_peers": [{"gpu": 0, "links": 2}, {"gpu": 3, "links": 4}], "most_links_first": False},
        {"index": 3, "nvlink_peers": [{"gpu": 2, "links": 4}], "most_links_first": True},
    ]
    assert failed_of(MIXED_4, info) == []  # gpu2 puts NV2 before NV4: aqua_alloc ranks them equally


@pytest.mark.parametrize("data, message", [
    ([], "expected a JSON object, got list"),
    ({"gpus": [], "peer_access": []}, "no list 'nvlink'"),
    (dict(INFO_2, nvlink=[[0, 1], [1, 0]]), "'nvlink' is not a matrix of true/false"),
    (dict(INFO_2, plan={"gpus": [{"index": 0}]}), "'plan' has no list 'gpus' of {index, tiers}"),
])
def test_json_that_is_not_info_is_named(data, message):
    with pytest.raises(tc.InfoFormatError, match=re.escape(message)):
        tc.read_info(data)


def test_info_runs_with_cuda_ordinals_in_pci_bus_order(monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"], seen["env"] = command, kwargs["env"]
        return subprocess.CompletedProcess(command, 1, stdout=json.dumps(INFO_2), stderr="")

    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    monkeypatch.setattr(tc.subprocess, "run", fake_run)
    assert tc.run_info() == (INFO_2, 1)  # exit 1 (info could not see everything) still gives its JSON
    assert seen["command"][1:] == ["-m", "aqua_alloc", "info", "--json"]
    assert seen["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


# --------------------------------------------------------------------------------------
# the script


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "topology_check.py"), *args],
                          check=False, capture_output=True, text=True, timeout=120, env=env)


def saved(tmp_path: Path, topo_text: str, info: dict) -> list[str]:
    (tmp_path / "topo.txt").write_text(topo_text)
    (tmp_path / "info.json").write_text(json.dumps(info))
    return ["--topo-file", str(tmp_path / "topo.txt"), "--info-file", str(tmp_path / "info.json")]


def test_the_script_passes_agreeing_outputs_with_exit_0(tmp_path):
    done = run_script(*saved(tmp_path, H200_8, info_json(tc.parse_topo(H200_8).nvlinks)),
                      "--out", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "topology check: PASS"
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["ok"], result["failed"]) == (True, [])
    assert [c["name"] for c in result["checks"] if c["ok"]] == [
        "gpu_count", "nvlink_matches", "nvlink_peer_access", "tier_order", "tier_complete"]
    assert result["topo"]["nvlinks"][0] == [0, 18, 18, 18, 18, 18, 18, 18]
    assert result["topo"]["text"] == H200_8
    assert result["info"]["nvlink"][0] == [False] + [True] * 7
    assert result["info"]["exit"] is None  # read from a file, not run


def test_the_script_names_a_failed_check_with_exit_1(tmp_path):
    info = info_json(MIXED_4_NVLINKS, everyone(4))
    info["plan"]["gpus"][0]["tiers"] = ["gpu0", "gpu3 (PCIe)", "gpu1 (NVLink)", "gpu2 (NVLink)", "host"]
    done = run_script(*saved(tmp_path, MIXED_4, info), "--out", str(tmp_path / "r.json"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "  FAIL tier_order: gpu0: gpu3 (SYS) before NVLink peer gpu1 (NV4)" in done.stdout.splitlines()
    assert done.stdout.splitlines()[-1] == "topology check: FAIL (tier_order)"
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["ok"], result["failed"]) == (False, ["tier_order"])
    assert result["topo"]["connection"] == MIXED_4_CONNECTION


def test_the_script_refuses_a_malformed_topo_file_with_exit_2(tmp_path):
    args = saved(tmp_path, H200_2.replace("NV18", "NVX", 1), INFO_2)
    done = run_script(*args, "--out", str(tmp_path / "r.json"))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [(
        f"topology_check.py: error: {tmp_path / 'topo.txt'}: line 2: GPU0 to GPU1 is 'NVX'; "
        "expected NV<k>, PIX, PXB, PHB, NODE, SYS")]
    assert not (tmp_path / "r.json").exists()


def test_the_script_says_when_nvidia_smi_cannot_be_run_with_exit_2(tmp_path):
    args = saved(tmp_path, H200_2, INFO_2)[2:]  # info from the file, topo from nvidia-smi
    done = run_script(*args, env={"PATH": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["topology_check.py: error: nvidia-smi topo -m: nvidia-smi is not on PATH"]


def test_an_info_file_that_is_not_json_is_named_with_exit_2(tmp_path, capsys):
    args = saved(tmp_path, H200_2, INFO_2)
    (tmp_path / "info.json").write_text("GPUs: 2\n")  # info without --json
    assert tc.main(args) == 2
    assert capsys.readouterr().err == (f"topology_check.py: error: --info-file {tmp_path / 'info.json'}: "
                                       "not JSON: Expecting value: line 1 column 1 (char 0)\n")


def test_the_script_refuses_a_bad_argument_with_exit_2():
    done = run_script("--bogus")
    assert done.returncode == 2
    assert "unrecognized arguments: --bogus" in done.stderr
