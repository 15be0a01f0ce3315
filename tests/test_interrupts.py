"""Ctrl-C at several moments of a CPU run, sent as a user's terminal would (SIGINT to the
process) once the run prints the line of a phase: a scheduled workload (worker threads and
the main thread in ``Scheduler.generate``, tests/scheduled_workload.py) and the serving
benchmark on its tiny model. Each exits 130 with its one line on stderr: no abort, no
traceback, every thread joined, the scheduler left consistent. The demo's Ctrl-C is tested in
tests/test_demo.py.

What can fail here: exit statuses, exact lines, exact states. No test measures time.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from sigint import ABORTS, run_and_interrupt

REPO = Path(__file__).resolve().parents[1]
INTERRUPTED = "interrupted: every worker stopped"


def env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env["CUDA_VISIBLE_DEVICES"] = ""   # the CPU path, even on a machine with a GPU
    return env


def interrupt_at(command: list[str], marker: str, cwd: Path) -> tuple[int, str, str]:
    """Run ``command``; send SIGINT once a line of its stdout starts with ``marker`` (after
    the time stamp of a benchmark's log line, '[   1.2s] '). Returns (status, stdout, stderr)."""
    status, out, err = run_and_interrupt(command, env(), cwd, cwd / "stderr.txt",
                                         lambda line: line.split("] ", 1)[-1].startswith(marker))
    assert marker in out, out + err
    assert not [text for text in ABORTS if text in err], err
    return status, out, err


@pytest.mark.parametrize("marker", ["main step 1", "main step 30", "main done"])
def test_scheduled_workload_exits_130_with_the_scheduler_consistent(tmp_path, marker):
    """SIGINT at the main thread's first token, while its prompt runs among the workers', and
    once it is done while the workers still run."""
    status, out, err = interrupt_at([sys.executable, str(REPO / "tests" / "scheduled_workload.py")], marker, tmp_path)
    if "all done" in out:
        pytest.skip("the workload finished before SIGINT arrived; nothing was left to interrupt")
    assert status == 130, (status, err)
    assert err.strip().splitlines() == [INTERRUPTED], err
    after = json.loads(out.strip().splitlines()[-1])
    assert after["running"] is None and after["waiting"] == [] and after["threads"] == []
    states = after["states"]
    # The workers' prompts failed with SchedulerShutdown (or finished first); the main
    # thread's left as cancelled, or had finished when the signal came.
    assert {states[f"w{i}"] for i in range(3)} <= {"failed", "finished"}, states
    assert states["main"] == ("finished" if "main done" in out.splitlines() else "cancelled"), states


# The serving benchmark on its tiny model: each case runs only the system it interrupts, 12
# requests at load 0.2 (arrivals over about 2 s), one line per request (--verbose).
BENCH = [sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--model", "tiny", "--device", "cpu",
         "--trace", "conv-excerpt", "--max-requests", "12", "--max-output", "64", "--loads", "0.2",
         "--check", "2", "--min-requests", "4", "--budget-s", "0", "--no-plots", "--verbose"]


@pytest.mark.parametrize("system, marker", [
    ("fcfs", "fcfs@0.2: set up"),               # the replay starts: one worker thread
    ("threads", "  threads@0.2 r"),             # a request done, others in their threads
    ("aqua-host", "  aqua-host@0.2 r"),         # a request done, others in the scheduler
    ("hf-cb", "hf-cb@0.2: set up"),             # transformers' manager thread and our collector
])
def test_bench_serve_exits_130_with_every_thread_joined(tmp_path, system, marker):
    status, out, err = interrupt_at([*BENCH, "--systems", system, "--out", str(tmp_path / "out")], marker, tmp_path)
    label = f"{system}@0.2"
    if any(line.split("] ", 1)[-1].startswith(f"{label}: 12/12 done") for line in out.splitlines()):
        pytest.skip("the run finished before SIGINT arrived; nothing was left to interrupt")
    assert status == 130, (status, err)
    assert err.strip().splitlines() == [INTERRUPTED], err
    assert f"{label}: interrupted; its threads stopped and joined" in out, out
