"""``python -m aqua_alloc``: info, trace summarize, trace plot; errors are one line, no traceback.

In-process tests call :func:`aqua_alloc.cli.main`; a few run the module in a subprocess to
check exit statuses and stderr the way a user sees them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from aqua_alloc import cli

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "small_trace.json"
GiB = 2**30
MS = 1_000_000


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUA_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "aqua_alloc", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, status: int, text: str) -> None:
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    assert text in proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------------------
# Errors seen from outside.


def test_missing_file_is_one_line(tmp_path):
    proc = run_module("trace", "summarize", str(tmp_path / "nope.json"))
    assert_one_line_error(proc, 1, "No such file or directory")
    assert proc.stderr.count("\n") == 1


def test_malformed_and_empty_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(FIXTURE.read_text()[:1000])
    empty = tmp_path / "empty.json"
    empty.write_text("")
    proc = run_module("trace", "plot", str(bad), "-o", str(tmp_path / "x.png"))
    assert_one_line_error(proc, 1, "not valid JSON (truncated?)")
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
    proc = run_module("trace", "summarize", str(empty))
    assert_one_line_error(proc, 1, "empty.json: empty file")


@pytest.mark.parametrize("args, text", [
    ((), "the following arguments are required: COMMAND"),
    (("trace",), "the following arguments are required: ACTION"),
    (("trace", "plot", "t.json"), "the following arguments are required: -o/--output"),
    (("trace", "summarise", "t.json"), "invalid choice: 'summarise'"),
    (("info", "--bogus"), "unrecognized arguments: --bogus"),
])
def test_bad_arguments_exit_2(args, text, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(list(args))
    assert info.value.code == 2
    assert text in capsys.readouterr().err


def test_bad_arguments_from_outside():
    assert_one_line_error(run_module("trace", "summarize"), 2,
                          "the following arguments are required: FILE")


def test_demo_bad_device_is_one_line():
    assert_one_line_error(run_module("demo", "--device", "tpu"), 2, "invalid choice: 'tpu'")
    # The demo itself runs end to end in tests/test_demo.py.


def test_info_runs_on_this_machine():
    proc = run_module("info")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("GPUs: ")


# --------------------------------------------------------------------------------------
# trace summarize / plot.


def test_summarize_json_has_exact_numbers(capsys):
    assert cli.main(["trace", "summarize", str(FIXTURE), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["duration_ns"] == 100 * MS
    assert [(c["context"], c["running_ns"], c["parked_ns"], c["bytes_moved"], c["ttft_ns"])
            for c in s["contexts"]] == [("a", 39 * MS, 40 * MS, 4 * GiB, 10 * MS),
                                        ("b", 39 * MS, 40 * MS, GiB, 40 * MS)]
    assert (s["ttft"]["count"], s["ttft"]["mean_ns"], s["ttft"]["p50_ns"]) == (2, 25 * MS, 25 * MS)
    assert {t["tier"]: t["peak_bytes"] for t in s["tiers"]} == {
        "gpu0": 3 * GiB, "gpu1": 2 * GiB, "host": GiB}
    assert [(l["src"], l["dst"], l["gib_s"]) for l in s["links"]] == [
        ("gpu0", "gpu1", 200.0), ("gpu0", "host", 50.0), ("gpu1", "gpu0", 400.0)]


def test_summarize_text(capsys):
    assert cli.main(["trace", "summarize", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "time to first token: 2 prompts" in out
    assert "gpu0 -> host" in out and "50.00 GiB/s" in out


def test_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "t.png"
    assert cli.main(["trace", "plot", str(FIXTURE), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1200, 800)
    assert capsys.readouterr().out == f"wrote {out}\n"


@pytest.mark.parametrize("name, magic", [("t.svg", b"<?xml"), ("t.pdf", b"%PDF-"), ("T.PNG", b"\x89PNG")])
def test_plot_format_follows_the_suffix(tmp_path, capsys, name, magic):
    pytest.importorskip("matplotlib")
    out = tmp_path / name
    assert cli.main(["trace", "plot", str(FIXTURE), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(magic)


@pytest.mark.parametrize("name", ["t.jpg", "t", "t.png.txt"])
def test_plot_refuses_a_suffix_it_cannot_write_before_reading_anything(tmp_path, capsys, name):
    out = tmp_path / name
    with pytest.raises(SystemExit) as info:
        cli.main(["trace", "plot", str(tmp_path / "missing.json"), "-o", str(out)])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"aqua-alloc trace plot: error: argument -o/--output: {str(out)!r}: its suffix chooses the format; "
        "expected .png, .svg, .pdf")
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["trace", "plot", str(FIXTURE), "-o", str(tmp_path / "t.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("aqua-alloc: error: trace plot needs matplotlib")
    assert err.count("\n") == 1


def test_plot_to_unwritable_place_is_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "no" / "such" / "dir" / "t.png"
    assert cli.main(["trace", "plot", str(FIXTURE), "-o", str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"aqua-alloc: error: cannot write {out}")


def test_directory_instead_of_file(tmp_path, capsys):
    assert cli.main(["trace", "summarize", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# info with a monkeypatched topology and settings.


@dataclasses.dataclass
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclasses.dataclass
class Topology:
    gpus: list
    peer_access: list
    nvlink: list
    host_total_bytes: int
    host_available_bytes: int
    notes: list


def fake_modules(monkeypatch, topology=None, discover_error=None, settings_error=None):
    topo_mod = types.ModuleType("aqua_alloc.memory.topology")

    def discover():
        if discover_error:
            raise discover_error
        return topology

    topo_mod.discover = discover
    config_mod = types.ModuleType("aqua_alloc.memory.config")

    class Settings:
        @classmethod
        def from_env(cls):
            if settings_error:
                raise settings_error
            return cls()

        def describe(self):
            return {"enabled": True, "tiers": ["gpu0", "gpu1", "host"],
                    "peer_budget_bytes": {"gpu1": 60 * GiB}}

    config_mod.Settings = Settings

    def resolve(settings, device_total, device_free, host_total, host_available):
        return types.SimpleNamespace(
            local_budget=dict(device_total), lend={d: f - GiB for d, f in device_free.items()},
            host_budget=host_available - GiB, host_reserve=GiB)

    config_mod.resolve = resolve
    monkeypatch.setitem(sys.modules, "aqua_alloc.memory.topology", topo_mod)
    monkeypatch.setitem(sys.modules, "aqua_alloc.memory.config", config_mod)


TWO_GPUS = Topology(
    gpus=[GpuInfo(0, "NVIDIA H200", 140 * GiB, 130 * GiB), GpuInfo(1, "NVIDIA H200", 140 * GiB, 139 * GiB)],
    peer_access=[[True, True], [True, True]],
    nvlink=[[False, True], [True, False]],
    host_total_bytes=2048 * GiB, host_available_bytes=2000 * GiB,
    notes=[],
)


def test_info_shows_gpus_matrices_memory_and_settings(monkeypatch, capsys):
    fake_modules(monkeypatch, TWO_GPUS)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GPUs: 2" in out
    gpu1 = next(line for line in out.splitlines() if line.startswith("  gpu1  NVIDIA H200"))
    assert gpu1.split()[-6:] == ["total", "140.00", "GiB", "free", "139.00", "GiB"]
    nvlink = out.split("NVLink (row to column):\n")[1].splitlines()
    assert nvlink[1].split() == ["gpu0", "-", "yes"]
    assert nvlink[2].split() == ["gpu1", "yes", "-"]
    assert "host memory: total 2048.00 GiB, available 2000.00 GiB" in out
    assert 'tiers: ["gpu0", "gpu1", "host"]' in out
    assert ("  gpu0: local budget 140.00 GiB, lends 129.00 GiB; "
            "parks to gpu0, gpu1 (NVLink), host") in out
    assert "  host: budget 1999.00 GiB, reserved ahead 1.00 GiB" in out
    assert "notes" not in out


def test_info_json(monkeypatch, capsys):
    fake_modules(monkeypatch, TWO_GPUS)
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["gpus"][1] == {"index": 1, "name": "NVIDIA H200",
                               "total_bytes": 140 * GiB, "free_bytes": 139 * GiB}
    assert info["nvlink"] == [[False, True], [True, False]]
    assert info["settings"]["peer_budget_bytes"] == {"gpu1": 60 * GiB}
    assert info["plan"]["gpus"][1] == {"index": 1, "local_budget_bytes": 140 * GiB,
                                       "lend_bytes": 138 * GiB,
                                       "tiers": ["gpu1", "gpu0 (NVLink)", "host"]}


def test_info_pcie_peers_come_after_nvlink_peers(monkeypatch, capsys):
    gpus = [GpuInfo(i, "GPU", 8 * GiB, 8 * GiB) for i in range(3)]
    everyone = [[True] * 3 for _ in range(3)]
    nvlink_0_2 = [[False, False, True], [False, False, False], [True, False, False]]
    fake_modules(monkeypatch, Topology(gpus, everyone, nvlink_0_2, 64 * GiB, 64 * GiB, []))
    assert cli.main(["info", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["gpus"][0]["tiers"] == ["gpu0", "gpu2 (NVLink)", "gpu1 (PCIe)", "host"]
    assert plan["gpus"][1]["tiers"] == ["gpu1", "gpu0 (PCIe)", "gpu2 (PCIe)", "host"]


def test_info_without_gpus_says_what_it_cannot_see(monkeypatch, capsys):
    fake_modules(monkeypatch, Topology([], [], [], 64 * GiB, 60 * GiB,
                                       ["no NVIDIA driver: pynvml could not initialise"]))
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GPUs: 0" in out
    assert "  - no NVIDIA driver: pynvml could not initialise" in out


def test_info_reports_failures_without_traceback(monkeypatch, capsys):
    fake_modules(monkeypatch, discover_error=RuntimeError("nvml exploded"),
                 settings_error=ValueError("AQUA_PEER_BUDGET: not a size: 'lots'"))
    assert cli.main(["info"]) == 1
    out = capsys.readouterr().out
    assert "topology discovery failed: RuntimeError: nvml exploded" in out
    assert "AQUA_* settings are invalid: ValueError: AQUA_PEER_BUDGET" in out
