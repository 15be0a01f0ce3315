"""The coordinator daemon as the tests run it: a ``python -m aqua_alloc coordinator``
subprocess on a private socket, and the helpers around it (shared by test_coordinator.py
and test_coordinator_enable.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aqua_alloc.coordinator import protocol as proto

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 0.5  # s: the daemon's reclaim timeout in these tests


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: no AQUA_* settings, the repo and tests importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env.update(extra)
    return env


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll `predicate` until it returns something true (a synchronisation helper)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Daemon:
    """``python -m aqua_alloc coordinator --socket path`` until stop(); answers when made."""

    def __init__(self, path: str, *extra: str) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aqua_alloc", "coordinator", "--socket", path,
             "--reclaim-timeout", str(TIMEOUT), *extra],
            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(self._answers, what=f"the coordinator at {path}")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"coordinator exited {self.proc.returncode}: {self.proc.stderr.read()}")
        try:
            proto.query_ledger(self.path, timeout=1.0)
        except OSError:
            return False
        return True

    def ledger(self) -> dict:
        ledger = proto.query_ledger(self.path)
        assert proto.check_ledger(ledger) == [], ledger
        return ledger

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=10)
        assert self.proc.returncode == 0, err
        assert "Traceback" not in err, err
        return err
