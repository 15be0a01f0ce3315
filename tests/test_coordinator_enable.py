"""enable()/disable() with the cross-process coordinator (AQUA_COORDINATOR and friends).

The daemon runs as ``python -m aqua_alloc coordinator --socket PATH`` in a subprocess, as in
tests/test_coordinator.py; aqua_alloc runs in this process on simulated devices and joins
it from enable(). The ledger is read with
:func:`aqua_alloc.coordinator.protocol.query_ledger` and checked with ``check_ledger``.
"""

from __future__ import annotations

import os

import pytest

import aqua_alloc as aq
from aqua_alloc.memory import native as _native, allocator
from aqua_alloc.memory.config import ConfigError
from aqua_alloc.coordinator.client import CoordinatorError
from conftest import reset_aqua
from coordinator_daemon import wait_for

MiB = 1 << 20
SIM = dict(backend="sim", sim_devices=2, sim_device_bytes=64 * MiB, sim_host_bytes=256 * MiB, host_reserve=0,
           chunk=4 * MiB, trace_events=1024, lend_poll_ms=0)


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for var in [v for v in os.environ if v.startswith("AQUA_")]:
        monkeypatch.delenv(var)
    reset_aqua()
    yield
    reset_aqua()


def mine(ledger: dict) -> tuple[list[dict], list[dict]]:
    """This process's rows: (clients, GPUs it owns)."""
    pid = os.getpid()
    return ([c for c in ledger["clients"] if c["pid"] == pid],
            [g for g in ledger["gpus"] if g["owner_pid"] == pid])


def test_enable_joins_the_coordinator_and_disable_leaves_it(daemon):
    aq.enable(**SIM, coordinator=daemon.path, coordinator_gpus=(0,), coordinator_offer="16MiB",
              coordinator_interval=0.05)
    assert allocator.settings().coordinator == daemon.path

    def offered():
        clients, gpus = mine(daemon.ledger())
        return len(clients) == 1 and [(g["gpu"], g["offer"]) for g in gpus] == [("sim:0", 16 * MiB)]

    wait_for(offered, what="this process to own sim:0 with an offer of 16 MiB")
    clients, gpus = mine(daemon.ledger())
    assert clients[0]["gpus"] == ["sim:0"] and gpus[0]["owner"] == clients[0]["client"]
    # Nothing of this process may go to sim:1 (another process's GPU) before it is granted.
    stats = aq.stats()
    assert stats["tiers"]["gpu1"]["lend_budget"] == 0
    assert stats["coordinator"] == {"borrowed": {}, "offers": {"sim:0": 16 * MiB}}

    # A refused disable() (a context in use) changes nothing: still a member.
    with aq.context("a", device=0):
        with pytest.raises(aq.ContextError, match="'a'.*in use"):
            aq.disable()
    assert aq.is_enabled() and mine(daemon.ledger())[0], "a refused disable() left the coordinator"

    aq.disable()
    assert not aq.is_enabled()
    wait_for(lambda: mine(daemon.ledger()) == ([], []), what="this process to leave the ledger")
    assert all(g["gpu"] != "sim:0" for g in daemon.ledger()["gpus"])


def test_the_coordinator_is_set_by_environment_variables(daemon, monkeypatch):
    monkeypatch.setenv("AQUA_COORDINATOR", daemon.path)
    monkeypatch.setenv("AQUA_COORDINATOR_GPUS", "1")
    monkeypatch.setenv("AQUA_COORDINATOR_OFFER", "25%")
    monkeypatch.setenv("AQUA_COORDINATOR_BORROW", "0")
    monkeypatch.setenv("AQUA_COORDINATOR_INTERVAL", "0.05")
    aq.enable(**SIM)
    s = allocator.settings()
    assert (s.coordinator_gpus, s.coordinator_borrow, s.coordinator_interval) == ((1,), 0, 0.05)
    wait_for(lambda: [(g["gpu"], g["offer"]) for g in mine(daemon.ledger())[1]] == [("sim:1", 16 * MiB)],
             what="this process to own sim:1 with an offer of 25% of it")
    assert aq.stats()["tiers"]["gpu0"]["lend_budget"] == 0
    aq.disable()
    wait_for(lambda: mine(daemon.ledger()) == ([], []), what="this process to leave the ledger")


@pytest.mark.parametrize("var, value", [
    ("AQUA_COORDINATOR_GPUS", "x"),
    ("AQUA_COORDINATOR_GPUS", "0,0"),
    ("AQUA_COORDINATOR_GPUS", "-1"),
    ("AQUA_COORDINATOR_INTERVAL", "-1"),
    ("AQUA_COORDINATOR_INTERVAL", "0"),
    ("AQUA_COORDINATOR_INTERVAL", "nan"),
    ("AQUA_COORDINATOR_INTERVAL", "soon"),
    ("AQUA_COORDINATOR_OFFER", "lots"),
    ("AQUA_COORDINATOR_BORROW", "10%"),
    ("AQUA_COORDINATOR", "/tmp/" + "x" * 120),
])
def test_bad_coordinator_settings_are_config_errors_naming_them(monkeypatch, short_dir, var, value):
    monkeypatch.setenv("AQUA_COORDINATOR", os.path.join(short_dir, "c.sock"))  # nothing listens: not reached
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        aq.enable(**SIM)
    assert not aq.is_enabled() and _native.lib().aqua_backend() == _native.Backend.NONE


def test_a_gpu_this_process_does_not_have_is_a_config_error(short_dir):
    with pytest.raises(ConfigError, match="AQUA_COORDINATOR_GPUS: device 5 is not one of this process's devices"):
        aq.enable(**SIM, coordinator=os.path.join(short_dir, "c.sock"), coordinator_gpus=(5,))
    assert not aq.is_enabled() and _native.lib().aqua_backend() == _native.Backend.NONE


def test_off_values_do_not_join(monkeypatch):
    for value in ("0", "", "off"):
        monkeypatch.setenv("AQUA_COORDINATOR", value)
        aq.enable(**SIM)
        assert allocator.settings().coordinator is None and "coordinator" not in aq.stats()
        aq.disable()


def test_no_daemon_at_the_socket_leaves_aqua_alloc_disabled(short_dir):
    nowhere = os.path.join(short_dir, "none.sock")
    with pytest.raises(CoordinatorError, match=f"no coordinator at {nowhere}"):
        aq.enable(**SIM, coordinator=nowhere)
    assert not aq.is_enabled() and _native.lib().aqua_backend() == _native.Backend.NONE
    aq.enable(backend="sim")  # and a later plain enable() works
    assert aq.is_enabled() and allocator.settings().coordinator is None
    with aq.context("a", device=0):
        pass
    aq.disable()
    assert not aq.is_enabled()
