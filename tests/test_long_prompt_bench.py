"""The long-prompt benchmark's choices on CPU: which systems run for each --cache, and every
wrong combination named in its error. (The benchmark itself needs a GPU.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_long_prompt as blp  # noqa: E402

ONE_WINDOW = [("2GiB", 2 << 30)]


def test_each_cache_runs_plain_transformers_eager_and_static_beside_the_aqua_systems():
    dynamic = blp.choose_systems(None, "dynamic", ONE_WINDOW)
    static = blp.choose_systems(None, "static", ONE_WINDOW)
    for systems in (dynamic, static):
        assert {"local", "static", "offloaded", "aqua-local", "aqua-host", "aqua-peer"} <= set(systems)
    assert "aqua-host-in-place" in dynamic and "aqua-host-in-place" not in static
    assert "offloaded-static" not in static   # it crashed the process on the H200: only when asked for
    assert "static-sdpa" in static and "static-sdpa" not in dynamic  # transformers' default attention beside --attn's
    assert blp.choose_systems("static,offloaded-static", "static", ONE_WINDOW) == ["static", "offloaded-static"]
    assert blp.reference_system("dynamic") == "local" and blp.reference_system("static") == "static"


def test_further_read_ahead_windows_run_as_their_own_systems_after_aqua_host():
    systems = blp.choose_systems("local,aqua-host,offloaded", "dynamic", ONE_WINDOW + [("512MiB", 512 << 20)])
    assert systems == ["local", "aqua-host", "aqua-host-ra512MiB", "offloaded"]


@pytest.mark.parametrize("systems, cache, windows, message", [
    ("local,warp", "dynamic", ONE_WINDOW, "--systems: unknown warp"),
    (" , ", "dynamic", ONE_WINDOW, "--systems: give at least one"),
    ("aqua-host-in-place", "static", ONE_WINDOW, "--systems aqua-host-in-place: with --cache static"),
    ("aqua-host", "static", ONE_WINDOW + [("1GiB", 1 << 30)], "--read-ahead: one size only with --cache static"),
    (None, "paged", ONE_WINDOW, "--cache 'paged': expected one of dynamic, static"),
])
def test_a_wrong_choice_is_named(systems, cache, windows, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("'", "'")):
        blp.choose_systems(systems, cache, windows)


def test_the_command_line_names_a_wrong_choice_before_it_needs_a_gpu():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_long_prompt.py"), "--cache", "static",
                           "--systems", "aqua-host-in-place"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "--systems aqua-host-in-place: with --cache static" in done.stderr
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_long_prompt.py"), "--cache", "static",
                           "--attn", "sdpa", "--systems", "static-sdpa"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--systems static-sdpa: with --attn sdpa it is `static` again" in done.stderr


def test_a_capped_system_whose_tokens_differ_from_aqua_locals_fails_only_when_both_reproduce():
    rows = [{"system": "aqua-host", "same_tokens_as_aqua_local": False, "same_tokens_every_round": True},
            {"system": "aqua-peer", "same_tokens_as_aqua_local": False, "same_tokens_every_round": False},
            {"system": "aqua-host-in-place", "same_tokens_as_aqua_local": True, "same_tokens_every_round": True},
            {"system": "offloaded", "same_tokens_as_aqua_local": None, "same_tokens_every_round": False}]
    assert blp.moved_bytes_gave_other_tokens(rows, aqua_local_reproducible=True) == ["aqua-host"]
    assert blp.moved_bytes_gave_other_tokens(rows, aqua_local_reproducible=False) == []


def test_only_a_system_with_the_references_decode_step_fails_on_other_tokens():
    """With a static cache, the aqua systems run the reference's compiled step: other tokens
    fail them. Eager steps (local, offloaded) and another attention (static-sdpa) may pick
    another token at a near tie: reported, not failed. A reference that disagrees with its
    own repeat, or a system whose rounds disagree, fails nothing."""
    assert blp.decode_step_of("aqua-host", "static", "aqua_sdpa") == blp.decode_step_of("static", "static", "aqua_sdpa")
    assert blp.decode_step_of("static-sdpa", "static", "aqua_sdpa") == ("compiled", "sdpa")
    assert blp.decode_step_of("offloaded", "static", "aqua_sdpa")[0] == "eager"
    assert blp.decode_step_of("aqua-host-ra512MiB", "dynamic", "sdpa") == blp.decode_step_of("local", "dynamic", "sdpa")

    def row(system, same, every_round=True):
        return {"system": system, "same_tokens_as_reference": same, "same_tokens_every_round": every_round}

    rows = [row("local", False), row("static", True), row("static-sdpa", False), row("aqua-local", True),
            row("aqua-host", False), row("offloaded", False, every_round=False), row("static-repeat", True)]
    assert blp.token_failures(rows, "static", "static", "aqua_sdpa") == ["aqua-host"]
    rows[4] = row("aqua-host", True)
    assert blp.token_failures(rows, "static", "static", "aqua_sdpa") == []  # the run of 2026-12-05
    rows[4] = row("aqua-host", False, every_round=False)
    assert blp.token_failures(rows, "static", "static", "aqua_sdpa") == []
    rows[4] = row("aqua-host", False)
    rows[-1] = row("static-repeat", False)
    assert blp.token_failures(rows, "static", "static", "aqua_sdpa") == []
    # dynamic cache: offloaded runs local's eager step, so it is held to local's tokens
    dynamic = [row("local", True), row("offloaded", False), row("static", False), row("local-repeat", True)]
    assert blp.token_failures(dynamic, "local", "dynamic", "sdpa") == ["offloaded"]
