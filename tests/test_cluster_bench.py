"""benchmarks/cluster_serve.py (issue 23's run of one process per GPU) on CPU: its inputs
named in errors, the environment each process gets, the checks that judge a run, and a
whole run on simulated GPUs: a coordinator, two lenders that each take memory back twice
(reclaim, own allocations growing), and two servers whose parked bytes must survive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import cluster_serve as cs  # noqa: E402
from coordinator_daemon import clean_env  # noqa: E402

MiB = 1 << 20


def run_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "cluster_serve.py"), *args], env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("text, option, message", [
    ("0,x", "--servers", "--servers='0,x': expected GPU indices separated by commas, e.g. 0,1"),
    ("", "--lenders", "--lenders='': expected distinct GPU indices (0 or more), at least one"),
    ("1,1", "--lenders", "--lenders='1,1': expected distinct GPU indices"),
    ("-1", "--servers", "--servers='-1': expected distinct GPU indices"),
])
def test_a_wrong_gpu_list_is_named(text, option, message):
    with pytest.raises(ValueError) as e:
        cs.parse_gpus(text, option)
    assert message in str(e.value)


def test_gpu_lists_and_roles():
    assert cs.parse_gpus("2, 3", "--lenders") == [2, 3]
    cs.check_roles([0, 1], [2, 3], 4)
    with pytest.raises(ValueError, match=r"GPU 1 is both a server \(--servers\) and a lender \(--lenders\)"):
        cs.check_roles([0, 1], [1, 2], 4)
    with pytest.raises(ValueError, match=r"GPU 4, 5: this machine has 4 GPU\(s\), 0 to 3"):
        cs.check_roles([0, 4], [5], 4)
    with pytest.raises(ValueError, match=r"this machine has no CUDA GPU \(--sim runs the same on simulated GPUs\)"):
        cs.check_roles([0], [1], 0)


def test_each_process_gets_its_gpu_and_role():
    lender = cs.member_env("lender", 2, [2, 3], "/s", 0.2, simulated=False, num_gpus=4)
    assert lender == {"AQUA_COORDINATOR": "/s", "AQUA_COORDINATOR_INTERVAL": "0.2", "AQUA_HOST_RESERVE": "64MiB",
                      "AQUA_COORDINATOR_GPUS": "0", "CUDA_VISIBLE_DEVICES": "2"}
    server = cs.member_env("server", 1, [2, 3], "/s", 0.2, simulated=False, num_gpus=4)
    assert server["AQUA_COORDINATOR_GPUS"] == "none"
    assert server["CUDA_VISIBLE_DEVICES"] == "1,2,3"  # its own GPU first, the lenders as its peers
    sim_lender = cs.member_env("lender", 3, [2, 3], "/s", 1.0, simulated=True, num_gpus=4)
    assert sim_lender["AQUA_COORDINATOR_GPUS"] == "3" and sim_lender["AQUA_BACKEND"] == "sim"
    assert sim_lender["AQUA_SIM_DEVICES"] == "4" and "CUDA_VISIBLE_DEVICES" not in sim_lender
    with pytest.raises(ValueError, match="role='owner': expected lender or server"):
        cs.member_env("owner", 0, [], "/s", 1.0, simulated=True, num_gpus=1)


def test_a_servers_tiers_are_named_by_physical_gpu():
    names = cs.physical_tiers(1, [2, 3])
    assert names == {"gpu0": "gpu1", "gpu1": "gpu2", "gpu2": "gpu3"}
    rows = [{"system": "aqua-peer", "failed": 0, "peak_bytes": {"gpu0": 5, "gpu2": 7, "host": 1}, "extra": 1}]
    summary = cs.summarize_server(rows, names)
    assert summary[0]["peak_bytes"] == {"gpu1": 5, "gpu3": 7, "host": 1}
    assert summary[0]["system"] == "aqua-peer" and summary[0]["failed"] == 0 and "extra" not in summary[0]


def ledger(borrowed: int, borrows: list[dict] | None = None) -> dict:
    rows = borrows if borrows is not None else ([{"client": 3, "held": borrowed, "asked": 0}] if borrowed else [])
    return {"clients": [], "reclaims": [], "reclaim_timeout_s": 5.0,
            "gpus": [{"gpu": "sim:2", "owner": 1, "owner_pid": 1, "offer": 1024 * MiB, "borrowed": borrowed,
                      "available": 1024 * MiB - borrowed, "borrows": rows}]}


def passing_result() -> dict:
    return {"exit_codes": {"server0": 0, "lender2": 0}, "lender_gpus": {"lender2": "sim:2"}, "error": None,
            "ledger_before": ledger(0), "ledger_during": [cs.compact(0.5, ledger(256 * MiB))],
            "ledger_problems": [], "ledger_after": ledger(0),
            "lender_actions": [{"action": "reclaim", "gpu": "sim:2", "state": "done"},
                               {"action": "grow", "gpu": "sim:2", "state": "done"}],
            "servers": {"server0": {"intact": True, "not_intact": [], "failures": [],
                                    "peak_bytes": {"gpu0": 32 * MiB, "gpu2": 16 * MiB, "host": 8 * MiB}}},
            "departures": {"server0": {"joined": 1, "left_holding": []}}}


def test_the_checks_pass_a_good_run_and_name_each_fault():
    assert cs.check_run(passing_result(), simulated=True) == []
    bad = passing_result()
    bad["exit_codes"]["server0"] = 1
    bad["error"] = "ClusterError: lender2 exited"
    bad["lender_actions"][1]["state"] = "timeout"
    bad["ledger_after"] = ledger(64 * MiB)
    bad["ledger_problems"] = [(1.0, ["sim:2: borrows sum to more than the offer"])]
    bad["servers"]["server0"] = {"intact": False, "not_intact": ["server0-c1"], "failures": ["c2: boom"],
                                 "peak_bytes": {"gpu0": 32 * MiB, "gpu2": 0}}
    bad["departures"]["server0"] = {"joined": 1, "left_holding": [(64 * MiB, "sim:2")]}
    bad["departures"]["server1"] = {"joined": 0, "left_holding": []}
    assert cs.check_run(bad, simulated=True) == [
        "server0 exited with 1",
        "no server placed bytes on sim:2 (gpu2): parked contexts did not spread over the lenders",
        f"server0 left the coordinator still holding {64 * MiB} bytes of sim:2 (not given back when it disabled "
        "aqua_alloc)",
        "server1 never joined the coordinator",
        "grow on sim:2: timeout",
        "the run stopped: ClusterError: lender2 exited",
        "ledger during at 1.0 s: invariants broken: ['sim:2: borrows sum to more than the offer']",
        f"ledger after: servers left but borrows remain: {bad['ledger_after']['gpus']}",
        "server0: contexts not intact: ['server0-c1']",
        "server0: 1 moves failed: ['c2: boom']",
    ]
    broken = passing_result()
    broken["ledger_after"] = ledger(256 * MiB, borrows=[{"client": 3, "held": 512 * MiB, "asked": 0}])
    failures = cs.check_run(broken, simulated=True)
    assert failures[0].startswith("ledger after: invariants broken")


def test_the_checks_judge_bench_serve_rows_on_a_gpu():
    result = passing_result()
    peaks = {"gpu0": 3 << 30, "gpu2": 1 << 30, "host": 0}
    result["servers"]["server0"] = [
        {"system": "fcfs", "skipped": None, "failed": 0, "outputs_identical": True, "peak_bytes": {"gpu0": 1}},
        {"system": "aqua-peer", "skipped": None, "failed": 2, "outputs_identical": True, "peak_bytes": peaks},
        {"system": "hf-cb", "skipped": "no continuous batching", "failed": 0, "outputs_identical": None},
    ]
    assert cs.check_run(result, simulated=False) == ["server0: aqua-peer: 2 requests failed",
                                                     "server0: hf-cb skipped: no continuous batching"]
    result["servers"]["server0"] = [{"system": "aqua-peer", "skipped": None, "failed": 0, "outputs_identical": False,
                                     "peak_bytes": {"gpu0": 1, "gpu2": 0}},
                                    {"system": "fcfs", "skipped": None, "failed": 0, "outputs_identical": True,
                                     "peak_bytes": {"gpu2": 5}}]   # fcfs's bytes are not parked contexts
    assert cs.check_run(result, simulated=False) == [
        "no server placed bytes on sim:2 (gpu2): parked contexts did not spread over the lenders",
        "server0: aqua-peer: outputs differ from the solo runs"]


def test_the_coordinators_log_tells_who_left_holding_bytes():
    log = "\n".join([
        "2026-12-05 01:25:36,904 aqua_alloc coordinator[1] INFO: joined: pid 5078 (client 5) owns no GPU",
        "2026-12-05 01:25:36,908 aqua_alloc coordinator[1] INFO: joined: pid 5079 (client 6) owns no GPU",
        "2026-12-05 01:25:40,000 aqua_alloc coordinator[1] INFO: left: pid 5078 (client 5)",
        "2026-12-05 01:25:41,000 aqua_alloc coordinator[1] INFO: joined: pid 5078 (client 7) owns no GPU",
        "2026-12-05 01:25:42,000 aqua_alloc coordinator[1] INFO: left: pid 5079 (client 6) held 268435456 bytes of "
        "GPU-abc; they return to the offer",
        "2026-12-05 01:25:42,000 aqua_alloc coordinator[1] INFO: left: pid 5079 (client 6)",
        "2026-12-05 01:25:43,000 aqua_alloc coordinator[1] INFO: joined: pid 9999 (client 8) owns GPU-abc",
    ])
    assert cs.departures(log, {"server0": 5078, "server1": 5079, "server2": 4242}) == {
        "server0": {"joined": 2, "left_holding": []},
        "server1": {"joined": 1, "left_holding": [(268435456, "GPU-abc")]},
        "server2": {"joined": 0, "left_holding": []},
    }


@pytest.mark.parametrize("args, message", [
    (["--servers", "0,1", "--lenders", "1,2"], "GPU 1 is both a server (--servers) and a lender (--lenders)"),
    (["--trigger", "lots"], "--trigger"),
    (["--interval", "0"], "--interval: expected a number of seconds above 0"),
    (["--gap-s", "-1"], "--gap-s: expected a number of seconds, 0 or more"),
])
def test_a_wrong_argument_is_named_and_nothing_starts(tmp_path, args, message):
    done = run_script("--sim", "--out", str(tmp_path), *args, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_whole_run_on_simulated_gpus(tmp_path):
    done = run_script("--sim", "--sim-seconds", "8", "--gap-s", "0.5", "--hold-s", "0.5", "--name", "run",
                      "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["ok"] and result["failures"] == []
    assert result["lender_gpus"] == {"lender2": "sim:2", "lender3": "sim:3"}
    assert result["exit_codes"] == {"server0": 0, "server1": 0, "lender2": 0, "lender3": 0}
    # Both lenders lent, and each took memory back both ways, every byte back.
    for label, key in result["lender_gpus"].items():
        assert cs.placed_on(result["servers"], cs.lender_tier(label), simulated=True) > 0
        mine = {a["action"]: a for a in result["lender_actions"] if a["gpu"] == key}
        assert set(mine) == {"reclaim", "grow", "shrink"}
        assert mine["reclaim"]["state"] == "done" and mine["reclaim"]["pending"] > 0
        assert mine["reclaim"]["bytes_back"] == mine["reclaim"]["nbytes"]
        assert mine["reclaim"]["others_before"] is None   # the simulated backend cannot see other processes
        assert mine["grow"]["state"] == "done" and mine["grow"]["num_reclaims"] >= 1
        assert mine["grow"]["pending"] >= mine["grow"]["into_margin"] > 0
        assert 0 <= mine["grow"]["asked_after_s"] <= mine["grow"]["back_after_s"]
        assert mine["shrink"]["freed"] == mine["grow"]["grown"]
    # The servers parked on the lenders, every context's bytes survived every move, and each
    # gave back what it borrowed before it left the coordinator.
    for name in ("server0", "server1"):
        server = result["servers"][name]
        assert server["intact"] and server["failures"] == [] and server["num_moves"] > 0
        assert result["departures"][name] == {"joined": 1, "left_holding": []}
    assert result["ledger_problems"] == [] and len(result["ledger_during"]) > 10
    # Before: the lenders offer, nobody borrows; after: the servers left, nothing is borrowed.
    for step in ("ledger_before", "ledger_after"):
        assert len(result[step]["clients"]) == 2 and all(not g["borrows"] for g in result[step]["gpus"])
    assert sorted(os.listdir(tmp_path / "run")) == ["coordinator.log", "lender2.log", "lender3.log", "server0.json",
                                                    "server0.log", "server1.json", "server1.log"]
    assert "PASS" in done.stdout


def test_a_lender_gives_its_grown_memory_to_the_driver_when_it_shrinks(monkeypatch):
    """On CUDA, shrink must drop the last reference to the grown tensor before
    torch.cuda.empty_cache(): otherwise the memory stays in torch's cache, the driver's free
    memory does not rise, and the lender's elastic offer never grows back."""
    import weakref

    import torch

    import cluster_lender

    lender = object.__new__(cluster_lender.Lender)   # no coordinator needed for this
    lender.simulated, lender.grown_bytes = False, 4096
    lender._grown = torch.empty(4096, dtype=torch.uint8)
    alive_at_empty_cache = []
    ref = weakref.ref(lender._grown)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: alive_at_empty_cache.append(ref() is not None))
    assert lender.shrink() == {"freed": 4096}
    assert alive_at_empty_cache == [False]
    assert lender._grown is None and lender.grown_bytes == 0
