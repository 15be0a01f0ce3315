"""``python -m aqua_alloc demo`` on CPU, run in a subprocess the way a user runs it: the table,
the files it writes, Ctrl-C while it serves, and a bad ``--out``.

What can fail here: exit statuses, exact lines, exact counts of requests and trace events.
No test measures time.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sigint import ABORTS, run_and_interrupt

from aqua_alloc import cli
from aqua_alloc.obs.events import EventKind
from aqua_alloc.obs.trace_reader import read_trace

REPO = Path(__file__).resolve().parents[1]
NUM_REQUESTS = 12   # the CPU demo's cap: rows 1..12 of the excerpt, all in its first minute


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "aqua_alloc", "demo", *args]


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUA_")}
    env["PYTHONPATH"] = str(REPO)
    env["CUDA_VISIBLE_DEVICES"] = ""   # the CPU path, even on a machine with a GPU
    return env


def test_demo_on_cpu_end_to_end(tmp_path):
    out_dir = tmp_path / "new" / "results"   # missing: the demo creates it
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(demo_command("--out", str(out_dir)), env=demo_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert ("No CUDA GPU here: running the scheduling part only, on a tiny model (parking contexts needs a "
            "CUDA GPU).") in lines
    assert "outputs identical: yes" in lines
    assert [line.split()[:3] for line in lines if line.startswith(("fcfs ", "aqua "))] == [
        ["fcfs", str(NUM_REQUESTS), str(NUM_REQUESTS)], ["aqua", str(NUM_REQUESTS), str(NUM_REQUESTS)]]
    assert sum(line.startswith("aqua/fcfs mean TTFT: ") and line.endswith(" (lower is better)")
               for line in lines) == 1
    assert sum(line.startswith("aqua/fcfs tokens/s: ") for line in lines) == 1
    trace_path = out_dir / "demo-trace.json"
    assert f"wrote {out_dir / 'demo.json'} and {trace_path}" in lines
    assert f"read the trace with: python -m aqua_alloc trace summarize {trace_path}" in lines

    # The files: the rows, the trace of the aqua run; nothing anywhere else.
    assert sorted(p.name for p in out_dir.iterdir()) == ["demo-trace.json", "demo.json"]
    assert list(cwd.iterdir()) == []
    result = json.loads((out_dir / "demo.json").read_text())
    assert (result["device"], result["load"], result["outputs_identical"]) == ("cpu", 0.8, True)
    assert [(row["system"], row["requests"], row["completed"]) for row in result["rows"]] == [
        ("fcfs", NUM_REQUESTS, NUM_REQUESTS), ("aqua", NUM_REQUESTS, NUM_REQUESTS)]
    assert [r["id"] for r in result["requests"]] == list(range(1, NUM_REQUESTS + 1))
    assert all(r["prompt_tokens"] <= 64 and r["output_tokens"] <= 32 for r in result["requests"])

    # Each scheduled prompt (the warm-up and every request) arrived, got its first token and
    # finished exactly once.
    events = read_trace(trace_path).events
    tags = ["demo-warmup"] + [f"demo-r{i}" for i in range(1, NUM_REQUESTS + 1)]
    for kind in (EventKind.PROMPT_ARRIVED, EventKind.FIRST_TOKEN, EventKind.FINISHED):
        counts = collections.Counter(e.context for e in events if e.kind == kind)
        assert counts == {tag: 1 for tag in tags}, kind
    assert cli.main(["trace", "summarize", str(trace_path)]) == 0


@pytest.mark.parametrize("phase", ["fcfs", "aqua"])
def test_ctrl_c_while_serving_exits_130_without_an_abort(tmp_path, phase):
    """SIGINT once the demo prints that it serves ``phase``: fcfs runs generate in the main
    thread; aqua runs it in a worker thread per request (an earlier demo aborted there)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    returncode, out, err = run_and_interrupt(demo_command(), demo_env(), cwd, tmp_path / "stderr.txt",
                                             lambda line: line.startswith(f"serving: {phase}"))
    assert f"serving: {phase}" in out, out + err
    assert not [text for text in ABORTS if text in err], err
    assert returncode != -signal.SIGABRT and returncode != -signal.SIGKILL, (returncode, err)
    if "outputs identical" in out:   # the whole run ended before the signal came
        pytest.skip("the demo finished before SIGINT arrived; nothing was left to interrupt")
    assert returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted: every worker stopped", err
    assert list(cwd.iterdir()) == []   # no --out: nothing written


def test_out_naming_a_file_is_refused(tmp_path):
    path = tmp_path / "results"
    path.write_text("keep me")
    proc = subprocess.run(demo_command("--out", str(path)), env=demo_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"aqua-alloc: error: --out {path}: exists and is not a directory\n"
    assert proc.stdout == ""
    assert path.read_text() == "keep me"
