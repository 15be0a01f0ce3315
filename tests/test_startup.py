"""Start-up: the AQUA_ALLOC hook (aqua_alloc_startup.pth) and ``import aqua_alloc.auto``.

Each case runs a fresh interpreter (sys.executable) with a copy of the environment, so the
hook runs as it does for a user: at interpreter start-up, before any user code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

PTH = "aqua_alloc_startup.pth"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AQUA_")}
    clean.update(env)
    return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=120)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


SIM = dict(AQUA_BACKEND="sim", AQUA_SIM_DEVICES="2", AQUA_SIM_DEVICE_BYTES="64MiB", AQUA_HOST_RESERVE="16MiB")


def test_hook_is_installed_in_site_packages():
    paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    found = [Path(p) / PTH for p in paths if (Path(p) / PTH).is_file()]
    assert found, f"{PTH} is not in {sorted(paths)}: the package's install did not put the start-up hook there"
    text = found[0].read_text()
    assert text.startswith("import os;") and "AQUA_ALLOC" in text and text.count("\n") <= 1


def test_without_aqua_alloc_the_hook_imports_nothing():
    proc = run_python("import sys; print('torch' in sys.modules, 'aqua_alloc' in sys.modules)")
    assert_ok(proc)
    assert proc.stdout == "False False\n"
    assert proc.stderr == ""


@pytest.mark.parametrize("value", ["0", "", "off", "no"])
def test_aqua_alloc_off_values_import_nothing(value):
    proc = run_python("import sys; print('aqua_alloc' in sys.modules)", AQUA_ALLOC=value, **SIM)
    assert_ok(proc)
    assert proc.stdout == "False\n"


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_aqua_alloc_on_enables_at_start_up(value):
    proc = run_python("import sys; import aqua_alloc; print(aqua_alloc.is_enabled(), 'torch' in sys.modules)",
                      AQUA_ALLOC=value, **SIM)
    assert_ok(proc)
    assert proc.stdout == "True False\n"  # the simulated backend needs no torch
    assert proc.stderr == ""


def test_defaults_with_only_backend_sim():
    proc = run_python("import aqua_alloc; print(aqua_alloc.is_enabled()); "
                      "print(len(aqua_alloc.stats()['tiers']))", AQUA_ALLOC="1", AQUA_BACKEND="sim")
    assert_ok(proc)
    assert proc.stdout == "True\n9\n"  # 8 simulated GPUs and the host


def test_bad_setting_leaves_the_program_running_and_names_it():
    proc = run_python("import aqua_alloc; print('ran', aqua_alloc.is_enabled())",
                      AQUA_ALLOC="1", AQUA_HOST_BUDGET="banana", **SIM)
    assert_ok(proc)
    assert proc.stdout == "ran False\n"
    assert "AQUA_HOST_BUDGET='banana'" in proc.stderr, proc.stderr
    assert "aqua_alloc stays off" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_import_auto_enables():
    proc = run_python("import aqua_alloc.auto, aqua_alloc; print(aqua_alloc.is_enabled())", **SIM)
    assert_ok(proc)
    assert proc.stdout == "True\n"
    proc = run_python("import aqua_alloc; print(aqua_alloc.is_enabled())", **SIM)
    assert_ok(proc)
    assert proc.stdout == "False\n", "without AQUA_ALLOC or aqua_alloc.auto nothing enables"


def test_import_auto_with_a_bad_setting_raises_naming_it():
    proc = run_python("import aqua_alloc.auto", AQUA_CHUNK="3MiB", **SIM)
    assert proc.returncode == 1
    assert "ConfigError" in proc.stderr and "AQUA_CHUNK='3MiB'" in proc.stderr, proc.stderr
