"""Ctrl-C as a user's terminal sends it: run a command, and send SIGINT to it once a line of
its stdout is the one a test waits for (tests/test_demo.py, tests/test_interrupts.py)."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable

ABORTS = ("terminate called", "Aborted", "Fatal Python error", "Traceback")


def run_and_interrupt(command: list[str], env: dict[str, str], cwd: Path, stderr_path: Path,
                      is_marker: Callable[[str], bool]) -> tuple[int, str, str]:
    """Run ``command``; send SIGINT at the first stdout line for which ``is_marker`` holds.
    Returns (exit status, stdout, stderr). A run that never exits is killed after 300 s:
    it fails its test rather than hanging the suite."""
    with open(stderr_path, "w+") as stderr:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        watchdog = threading.Timer(300, proc.kill)
        watchdog.start()
        try:
            out = ""
            for line in proc.stdout:
                out += line
                if is_marker(line):
                    proc.send_signal(signal.SIGINT)
                    break
            out += proc.stdout.read()
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr.seek(0)
        return proc.returncode, out, stderr.read()
