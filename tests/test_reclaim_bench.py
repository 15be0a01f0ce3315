"""benchmarks/reclaim_under_load.py on CPU: its inputs named in errors, and a clear refusal
without two GPUs (the run itself needs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "reclaim_under_load.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--phases", "reclaim,warp"], "--phases: warp; expected some of reclaim, own-allocations"),
    (["--prompts", "0"], "--prompts: expected a whole number, at least 1"),
    (["--lend", "lots"], "--lend"),
])
def test_a_wrong_input_is_named(tmp_path, args, message):
    done = run("--out", str(tmp_path / "r.json"), *args)
    assert done.returncode == 2
    assert message in done.stderr


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has two GPUs: the run would start")
def test_without_two_gpus_it_says_so_and_writes_nothing(tmp_path):
    done = run("--out", str(tmp_path / "r.json"))
    assert done.returncode == 2
    assert "needs two GPUs (GPU 1 lends)" in done.stderr
    assert not (tmp_path / "r.json").exists()
