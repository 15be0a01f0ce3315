"""Errors of the public API say what was wrong and what is accepted, at the call that was
wrong (issue 22). Exact messages, on simulated devices: no GPU needed."""

from __future__ import annotations

import os

import pytest

import aqua_alloc as aq

MiB = 1 << 20

pytestmark = pytest.mark.usefixtures("fresh_core")  # a torn-down core before and after each test


def enable_sim(num_devices: int = 2, **overrides) -> None:
    settings = dict(backend="sim", sim_devices=num_devices, sim_device_bytes=64 * MiB, sim_host_bytes=256 * MiB,
                    host_reserve=0, lend_poll_ms=0)
    settings.update(overrides)
    aq.enable(**settings)
    with aq.context("a", device=0):
        pass


def test_evict_to_a_gpu_that_is_not_there_names_it_and_what_exists():
    enable_sim()
    with pytest.raises(ValueError) as info:
        aq.evict("a", "gpu99")
    assert str(info.value) == ("tier='gpu99': no such GPU; this process has 2 GPUs: expected 'host', 'auto', "
                               "'gpu0'..'gpu1' or a device ordinal 0..1")
    with pytest.raises(ValueError) as info:
        aq.evict("a", 99)
    assert str(info.value).startswith("tier=99: no such GPU; this process has 2 GPUs")
    for bad in ("tape", True, 1.0, "gpu", "gpu-1"):
        with pytest.raises(ValueError) as info:
            aq.evict("a", bad)
        assert str(info.value) == f"tier={bad!r}: expected 'host', 'auto', 'gpu0'..'gpu1' or a device ordinal 0..1"
    assert aq.where("a") == {"gpu0": 0, "gpu1": 0, "host": 0}


def test_one_gpu_says_so():
    enable_sim(num_devices=1)
    with pytest.raises(ValueError) as info:
        aq.evict("a", "gpu1")
    assert str(info.value) == ("tier='gpu1': no such GPU; this process has 1 GPU: expected 'host', 'auto', "
                               "'gpu0' or the device ordinal 0")


def test_reclaim_and_lend_say_what_they_take_without_offering_a_percentage():
    enable_sim()
    with pytest.raises(aq.ConfigError) as info:
        aq.reclaim(0, "banana")
    assert str(info.value) == ("reclaim(): nbytes='banana': not a size (expected a byte count or a size such as "
                               "512MiB or 8GiB; no percentage here); or None for all it lends")
    assert "%" not in str(info.value)
    with pytest.raises(aq.ConfigError) as info:
        aq.reclaim(0, "50%")
    assert str(info.value) == ("reclaim(): nbytes='50%': a percentage is not allowed here (expected a byte count or "
                               "a size such as 512MiB or 8GiB; no percentage here); or None for all it lends")
    with pytest.raises(aq.ConfigError) as info:
        aq.lend(0, "lots")
    assert str(info.value).endswith("; or None for the elastic default")


def test_sizes_in_errors_are_readable():
    enable_sim()
    with pytest.raises(aq.ConfigError) as info:
        aq.reclaim(0, "1TiB")
    assert str(info.value) == ("reclaim(): nbytes='1TiB' is 1 TiB (1099511627776 bytes), more than the "
                               "64 MiB (67108864 bytes) GPU 0 has")
    aq.disable()
    with pytest.raises(aq.ConfigError) as info:
        enable_sim(local_budget="1TiB")
    assert str(info.value) == ("AQUA_LOCAL_BUDGET=1 TiB (1099511627776 bytes) for GPU 0 is more than the 64 MiB "
                               "(67108864 bytes) it has (give at most that, or a percentage such as 90%)")
    assert not aq.is_enabled()


@pytest.mark.parametrize("call, text", [
    (lambda: aq.resume("a", wait="no"), "resume(): wait='no': expected True or False, got str"),
    (lambda: aq.resume("a", wait=0), "resume(): wait=0: expected True or False, got int"),
    (lambda: aq.where("a", wait="no"), "where(): wait='no': expected True or False, got str"),
    (lambda: aq.move_spans(record="no"), "move_spans(): record='no': expected True, False or None, got str"),
    (lambda: aq.move_profile(reset="yes"), "move_profile(): reset='yes': expected True or False, got str"),
])
def test_flags_take_only_booleans(call, text):
    enable_sim()
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value) == text
    aq.resume("a", wait=True)
    aq.move_spans(record=None)


def test_bad_trace_path_is_refused_at_enable_not_lost_at_exit(tmp_path):
    with pytest.raises(aq.ConfigError) as info:
        enable_sim(trace="/no/such/dir/t.json")
    assert str(info.value) == ("trace='/no/such/dir/t.json': directory /no/such/dir does not exist; create it "
                               "or give a file path in an existing directory")
    assert not aq.is_enabled() and not os.path.exists("/no/such/dir")
    with pytest.raises(aq.ConfigError, match=r"^trace=.*: is a directory; expected a file path in it"):
        enable_sim(trace=str(tmp_path))
    assert not aq.is_enabled()
