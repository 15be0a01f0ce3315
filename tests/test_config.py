"""Settings: every AQUA_* value parses to exact bytes; every bad one is refused with a
ConfigError that names the setting and the value.

Pure Python: no core, no device. The machine-dependent checks (more than exists, an
unknown GPU) go through :func:`aqua_alloc.memory.config.resolve` with a made-up machine.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aqua_alloc as aq
from aqua_alloc.memory.config import (
    GiB,
    KiB,
    MiB,
    TiB,
    ConfigError,
    Percent,
    Plan,
    Settings,
    format_size,
    parse_per_device,
    parse_size,
    resolve,
)
from conftest import reset_aqua

PROPERTY = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------
# parse_size


@pytest.mark.parametrize("text, expected", [
    ("0", 0),
    ("1073741824", GiB),
    ("512MiB", 512 * MiB),
    ("8GiB", 8 * GiB),
    ("8gib", 8 * GiB),
    ("1.5G", 3 * GiB // 2),
    ("0.5K", 512),
    ("4k", 4 * KiB),
    ("4KiB", 4 * KiB),
    ("4KB", 4000),
    ("2MB", 2_000_000),
    ("3GB", 3_000_000_000),
    ("1TB", 10**12),
    ("2T", 2 * TiB),
    ("2TiB", 2 * TiB),
    ("7b", 7),
    ("7B", 7),
    ("  64 MiB  ", 64 * MiB),
    ("64M", 64 * MiB),
    (4096, 4096),
    (0, 0),
    (1048576.0, MiB),
])
def test_parse_size_exact_bytes(text, expected):
    got = parse_size(text, "AQUA_X")
    assert got == expected and type(got) is int


@pytest.mark.parametrize("text, percent", [("80%", 80.0), ("0%", 0.0), ("100%", 100.0), (" 12.5 % ", 12.5)])
def test_parse_size_percent(text, percent):
    assert parse_size(text, "AQUA_X") == Percent(percent)
    assert Percent(percent).of(8 * GiB) == int(8 * GiB * percent / 100)
    assert Percent(25).of(8 * GiB) == 2 * GiB


@pytest.mark.parametrize("value, why", [
    ("", "not a size"),
    ("banana", "not a size"),
    ("12XB", "not a size"),
    ("1e9", "not a size"),
    ("1_000", "not a size"),
    ("1,000", "not a size"),
    ("MiB", "not a size"),
    ("5 M iB", "not a size"),
    ("0x10", "not a size"),
    ("-1", "cannot be negative"),
    ("-5MiB", "cannot be negative"),
    (" -5MiB", "cannot be negative"),
    (-1, "cannot be negative"),
    (-0.5, "cannot be negative"),
    (float("nan"), "NaN"),
    (True, "not a size"),
    (None, "not a size"),
    ([1], "not a size"),
    ("101%", "at most 100%"),
    ("100.5%", "at most 100%"),
    ("-5%", "cannot be negative"),
])
def test_parse_size_refuses_bad_values_by_name(value, why):
    with pytest.raises(ConfigError) as info:
        parse_size(value, "AQUA_HOST_BUDGET")
    message = str(info.value)
    assert message.startswith("AQUA_HOST_BUDGET="), message
    assert why in message, message
    shown = repr(value) if isinstance(value, str) else str(value)
    assert shown in message or repr(value) in message, message


def test_parse_size_percent_not_allowed_where_there_is_no_total():
    with pytest.raises(ConfigError) as info:
        parse_size("50%", "AQUA_CHUNK", allow_percent=False)
    assert str(info.value) == ("AQUA_CHUNK='50%': a percentage is not allowed here (expected a byte count or a size "
                               "such as 512MiB or 8GiB; no percentage here)")
    with pytest.raises(ConfigError, match="a percentage is not allowed here"):
        parse_size(Percent(50), "AQUA_CHUNK", allow_percent=False)


def test_not_a_size_says_what_is_accepted_and_offers_percent_only_where_it_is_taken():
    with pytest.raises(ConfigError) as info:
        parse_size("banana", "AQUA_HOST_BUDGET")
    assert str(info.value) == ("AQUA_HOST_BUDGET='banana': not a size (expected a byte count or a size such as "
                               "512MiB or 8GiB, or a percentage such as 80%)")
    with pytest.raises(ConfigError) as info:
        parse_size("banana", "AQUA_CHUNK", allow_percent=False)
    assert str(info.value) == ("AQUA_CHUNK='banana': not a size (expected a byte count or a size such as "
                               "512MiB or 8GiB; no percentage here)")
    assert "%" not in str(info.value)


@pytest.mark.parametrize("num_bytes, text", [
    (0, "0 bytes"),
    (1023, "1023 bytes"),
    (KiB, "1 KiB (1024 bytes)"),
    (3 * GiB // 2, "1.5 GiB (1610612736 bytes)"),
    (TiB, "1 TiB (1099511627776 bytes)"),
    (68157440, "65 MiB (68157440 bytes)"),
    (1 << 50, "1 PiB (1125899906842624 bytes)"),
    ((1 << 64) - 1, "16 EiB (18446744073709551615 bytes)"),
])
def test_format_size_is_readable_and_exact(num_bytes, text):
    assert format_size(num_bytes) == text


def test_too_large_is_said_readably():
    with pytest.raises(ConfigError) as info:
        parse_size(1 << 64, "AQUA_HOST_BUDGET")
    assert str(info.value) == f"AQUA_HOST_BUDGET={1 << 64}: too large: at most 16 EiB (18446744073709551615 bytes)"


# --------------------------------------------------------------------------------------
# parse_per_device


def test_parse_per_device_good_values():
    assert parse_per_device("8GiB", "AQUA_LEND") == 8 * GiB
    assert parse_per_device("40%", "AQUA_LEND") == Percent(40)
    assert parse_per_device("0:20GiB,1:40%", "AQUA_LEND") == {0: 20 * GiB, 1: Percent(40)}
    assert parse_per_device(" 1 : 5MiB , 3:0 ", "AQUA_LEND") == {1: 5 * MiB, 3: 0}
    assert parse_per_device("0:1GiB,,1:2GiB,", "AQUA_LEND") == {0: GiB, 1: 2 * GiB}
    assert parse_per_device({0: "1GiB", 2: 5}, "AQUA_LEND") == {0: GiB, 2: 5}
    assert parse_per_device({}, "AQUA_LEND") == {}


@pytest.mark.parametrize("value, expected", [
    ("0:1GiB,0:2GiB", "AQUA_LEND='0:1GiB,0:2GiB': device 0 is given twice"),
    ("x:1GiB", "AQUA_LEND='x:1GiB': expected 'DEVICE:SIZE,...'"),
    (":1GiB", "AQUA_LEND=':1GiB': expected 'DEVICE:SIZE,...'"),
    ("-1:1GiB", "AQUA_LEND='-1:1GiB': expected 'DEVICE:SIZE,...'"),
    ("0:1GiB,1", "AQUA_LEND='0:1GiB,1': expected 'DEVICE:SIZE,...' (e.g. 0:20GiB,1:40%), got '1'"),
    ("0:abc", "AQUA_LEND[0]='abc': not a size"),
    ("1:101%", "AQUA_LEND[1]='101%': a percentage must be at most 100%"),
    ("1:-2GiB", "AQUA_LEND[1]='-2GiB': a size cannot be negative"),
    ({-1: "1GiB"}, "AQUA_LEND: device -1 is not a device ordinal"),
    ({"0": "1GiB"}, "AQUA_LEND: device '0' is not a device ordinal"),
    ({True: "1GiB"}, "AQUA_LEND: device True is not a device ordinal"),
    ({0: "lots"}, "AQUA_LEND[0]='lots': not a size"),
])
def test_parse_per_device_refuses_bad_values_by_name(value, expected):
    with pytest.raises(ConfigError) as info:
        parse_per_device(value, "AQUA_LEND")
    assert expected in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------
# Settings.from_env


def test_from_env_parses_every_variable():
    env = {
        "AQUA_BACKEND": "sim",
        "AQUA_LOCAL_BUDGET": "0:8GiB,1:50%",
        "AQUA_LEND": "1GiB",
        "AQUA_LEND_MARGIN": "2GiB",
        "AQUA_HOST_BUDGET": "80%",
        "AQUA_HOST_MARGIN": "4GiB",
        "AQUA_HOST_RESERVE": "2GiB",
        "AQUA_CHUNK": "32MiB",
        "AQUA_DEVICE_KEEP": "4GiB",
        "AQUA_TRACE": "/tmp/t.json",
        "AQUA_TRACE_SNAPSHOT": "yes",
        "AQUA_TRACE_EVENTS": "1000",
        "AQUA_SIM_DEVICES": "2",
        "AQUA_SIM_DEVICE_BYTES": "64MiB",
        "AQUA_SIM_HOST_BYTES": "1GiB",
        "AQUA_ALLOC": "1",  # the start-up hook's switch: not a setting, not warned about
    }
    s = Settings.from_env(env)
    assert s == Settings(backend="sim", local_budget={0: 8 * GiB, 1: Percent(50)}, lend=GiB, lend_margin=2 * GiB,
                         host_budget=Percent(80), host_margin=4 * GiB, host_reserve=2 * GiB, chunk=32 * MiB,
                         device_keep=4 * GiB, trace="/tmp/t.json", trace_snapshot=True, trace_events=1000, sim_devices=2,
                         sim_device_bytes=64 * MiB, sim_host_bytes=GiB)
    assert s.describe()["AQUA_LOCAL_BUDGET"] == {0: 8 * GiB, 1: "50%"}
    assert s.describe()["AQUA_HOST_BUDGET"] == "80%"


def test_from_env_defaults_and_overrides():
    assert Settings.from_env({}) == Settings()
    s = Settings.from_env({"AQUA_CHUNK": "32MiB", "AQUA_BACKEND": "cuda"}, chunk="8MiB", backend="sim",
                          sim_peer_access=[[1, 0], [0, 1]])
    assert s.chunk == 8 * MiB and s.backend == "sim"
    assert s.sim_peer_access == ((True, False), (False, True))
    assert Settings.from_env({"AQUA_TRACE": ""}).trace is None
    assert Settings.from_env({"AQUA_TRACE_SNAPSHOT": "off"}).trace_snapshot is False


def test_trace_path_is_checked_when_given_not_at_exit(tmp_path, monkeypatch):
    good = tmp_path / "t.json"
    assert Settings.from_env({"AQUA_TRACE": str(good)}).trace == str(good)
    assert not good.exists(), "checking the path creates nothing"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"AQUA_TRACE": "/no/such/dir/t.json"})
    assert str(info.value) == ("AQUA_TRACE='/no/such/dir/t.json': directory /no/such/dir does not exist; "
                               "create it or give a file path in an existing directory")
    assert not __import__("os").path.exists("/no/such/dir")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"AQUA_TRACE": str(tmp_path)})
    assert str(info.value) == (f"AQUA_TRACE={str(tmp_path)!r}: is a directory; expected a file path in it, "
                               f"such as {tmp_path / 'trace.json'}")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"AQUA_TRACE=.*/file/t.json': .*/file is not a directory"):
        Settings.from_env({"AQUA_TRACE": str(tmp_path / "file" / "t.json")})
    with pytest.raises(ConfigError, match=r"^trace='/no/such/dir/t.json': directory /no/such/dir does not exist"):
        Settings.from_env({}, trace="/no/such/dir/t.json")
    with pytest.raises(ConfigError, match=r"^trace=3: expected a file path, such as /tmp/aqua-trace.json$"):
        Settings.from_env({}, trace=3)
    # Unwritable (root may write anywhere, so the check is made to fail here).
    monkeypatch.setattr("aqua_alloc.memory.config.os.access", lambda path, mode: False)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"AQUA_TRACE": str(good)})
    assert str(info.value) == (f"AQUA_TRACE={str(good)!r}: directory {tmp_path} is not writable by this process; "
                               "give a file path in a directory it may write to")


@pytest.mark.parametrize("var, value, why", [
    ("AQUA_BACKEND", "tpu", "expected 'cuda' or 'sim'"),
    ("AQUA_LOCAL_BUDGET", "0:1GiB,0:2GiB", "device 0 is given twice"),
    ("AQUA_LOCAL_BUDGET", "lots", "not a size"),
    ("AQUA_LEND", "150%", "at most 100%"),
    ("AQUA_LEND_MARGIN", "-1GiB", "cannot be negative"),
    ("AQUA_HOST_BUDGET", "banana", "not a size"),
    ("AQUA_HOST_MARGIN", "101%", "at most 100%"),
    ("AQUA_HOST_RESERVE", "-1", "cannot be negative"),
    ("AQUA_CHUNK", "3MiB", "2MiB"),
    ("AQUA_CHUNK", "6MiB", "2MiB"),          # a multiple of 2MiB, not 2MiB times a power of two
    ("AQUA_CHUNK", "1MiB", "2MiB"),
    ("AQUA_CHUNK", "0", "2MiB"),
    ("AQUA_CHUNK", "50%", "percentage is not allowed"),
    ("AQUA_TRACE_SNAPSHOT", "maybe", "expected 1/0"),
    ("AQUA_TRACE_EVENTS", "0", "must be in 1..67108864"),
    ("AQUA_TRACE_EVENTS", str(1 << 27), "must be in 1..67108864"),
    ("AQUA_TRACE_EVENTS", "many", "not an integer"),
    ("AQUA_DEVICE_KEEP", "10%", "percentage is not allowed"),
    ("AQUA_DEVICE_KEEP", "lots", "not a size"),
    ("AQUA_SIM_DEVICES", "0", "must be in 1..64"),
    ("AQUA_SIM_DEVICES", "65", "must be in 1..64"),
    ("AQUA_SIM_DEVICE_BYTES", "3MiB", "multiple of 2MiB"),
    ("AQUA_SIM_HOST_BYTES", "10%", "percentage is not allowed"),
    ("AQUA_SIM_HOST_BYTES", str(1 << 63), "at most 1 PiB (1125899906842624 bytes)"),
    ("AQUA_SIM_DEVICE_BYTES", "2PiB", "not a size"),
    ("AQUA_SIM_DEVICE_BYTES", "1025TiB", "at most 1 PiB (1125899906842624 bytes)"),
    ("AQUA_COORDINATOR_GPUS", "x", "expected device ordinals"),
    ("AQUA_COORDINATOR_GPUS", "0,", "expected device ordinals"),
    ("AQUA_COORDINATOR_GPUS", "1,1", "given twice"),
    ("AQUA_COORDINATOR_GPUS", "64", "0..63"),
    ("AQUA_COORDINATOR_OFFER", "150%", "at most 100%"),
    ("AQUA_COORDINATOR_BORROW", "10%", "percentage is not allowed"),
    ("AQUA_COORDINATOR_BORROW", "-1", "cannot be negative"),
    ("AQUA_COORDINATOR_INTERVAL", "-1", "must be > 0"),
    ("AQUA_COORDINATOR_INTERVAL", "0", "must be > 0"),
    ("AQUA_COORDINATOR_INTERVAL", "inf", "must be > 0"),
    ("AQUA_COORDINATOR_INTERVAL", "soon", "not a number of seconds"),
    ("AQUA_COORDINATOR", "/" + "x" * 107, "not a usable Unix socket path"),
])
def test_from_env_refuses_bad_values_by_name(var, value, why):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    message = str(info.value)
    assert f"{var}={value!r}" in message, message
    assert why in message, message


def test_coordinator_settings():
    assert Settings.from_env({}).coordinator is None
    for off in ("0", "", "off", "no"):
        assert Settings.from_env({"AQUA_COORDINATOR": off}).coordinator is None
    for default in ("1", "yes", "on"):
        assert Settings.from_env({"AQUA_COORDINATOR": default}).coordinator == "1"  # join(): the default socket
    s = Settings.from_env({"AQUA_COORDINATOR": "/run/x.sock", "AQUA_COORDINATOR_GPUS": "0, 2",
                           "AQUA_COORDINATOR_OFFER": "25%", "AQUA_COORDINATOR_BORROW": "4GiB",
                           "AQUA_COORDINATOR_INTERVAL": "0.5"})
    assert (s.coordinator, s.coordinator_gpus, s.coordinator_offer, s.coordinator_borrow, s.coordinator_interval) == (
        "/run/x.sock", (0, 2), Percent(25), 4 * GiB, 0.5)
    assert Settings.from_env(s.describe() | {"AQUA_COORDINATOR_INTERVAL": "0.5"}) == s  # describe() round-trips
    assert Settings.from_env({"AQUA_COORDINATOR_GPUS": "none"}).coordinator_gpus == ()  # borrow only
    assert Settings.from_env({"AQUA_COORDINATOR_BORROW": "0"}).coordinator_borrow == 0  # never borrow
    s = Settings.from_env({}, coordinator=True, coordinator_gpus=[1], coordinator_offer=MiB, coordinator_interval=2)
    assert (s.coordinator, s.coordinator_gpus, s.coordinator_offer, s.coordinator_interval) == ("1", (1,), MiB, 2.0)
    for name, value in [("coordinator", 3), ("coordinator_gpus", [True]), ("coordinator_gpus", 1.5),
                        ("coordinator_interval", True), ("coordinator_interval", float("nan"))]:
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({}, **{name: value})


def test_enable_argument_errors_name_the_argument():
    with pytest.raises(ConfigError, match=r"enable\(\): unknown setting 'bogus' \(known: backend, chunk,"):
        Settings.from_env({}, bogus=1)
    with pytest.raises(ConfigError, match=r"chunk='3MiB'"):
        Settings.from_env({}, chunk="3MiB")
    with pytest.raises(ConfigError, match=r"sim_peer_access: expected a square matrix of booleans"):
        Settings.from_env({}, sim_peer_access=[[1, 1], [1]])
    with pytest.raises(ConfigError, match=r"sim_peer_access: expected a square matrix of booleans"):
        Settings.from_env({}, sim_peer_access=5)
    reset_aqua()
    with pytest.raises(ConfigError, match="unknown setting 'local_budgets'"):
        aq.enable(backend="sim", local_budgets="1GiB")
    assert not aq.is_enabled()


def test_unknown_variable_is_warned_about_by_name():
    with pytest.warns(UserWarning, match=r"unknown setting\(s\) AQUA_BOGUS, AQUA_LOCAL_BUDGTE ignored"):
        Settings.from_env({"AQUA_BOGUS": "1", "AQUA_LOCAL_BUDGTE": "1GiB", "AQUA_ALLOC": "1"})


# --------------------------------------------------------------------------------------
# resolve: against a machine of two 80 GiB GPUs and 512 GiB of host memory


TOTAL = {0: 80 * GiB, 1: 80 * GiB}
FREE = {0: 70 * GiB, 1: 60 * GiB}
HOST_TOTAL, HOST_AVAILABLE = 512 * GiB, 400 * GiB


def plan(**overrides) -> Plan:
    return resolve(Settings.from_env({}, **overrides), TOTAL, FREE, HOST_TOTAL, HOST_AVAILABLE)


def test_resolve_defaults():
    p = plan()
    assert p.local_budget == TOTAL
    assert p.lend == {0: 62 * GiB, 1: 52 * GiB}  # free less 10% of the GPU (8 GiB)
    assert p.host_budget == HOST_AVAILABLE - int(HOST_TOTAL * 10 / 100)
    assert p.host_reserve == GiB
    one = resolve(Settings(), {0: 80 * GiB}, {0: 70 * GiB}, HOST_TOTAL, HOST_AVAILABLE)
    assert one.lend == {0: 0}, "a single GPU has no one to lend to"


def test_resolve_explicit_values():
    p = plan(local_budget="0:40GiB,1:50%", lend="8GiB", host_budget="25%", host_reserve="50%")
    assert p == Plan(local_budget={0: 40 * GiB, 1: 40 * GiB}, lend={0: 8 * GiB, 1: 8 * GiB},
                     host_budget=128 * GiB, host_reserve=64 * GiB, lend_margin={0: 8 * GiB, 1: 8 * GiB},
                     elastic_lend=frozenset())
    p = plan(lend={1: "1GiB"}, lend_margin="20GiB", host_budget="100GiB", host_reserve="200GiB")
    assert p.lend == {0: 50 * GiB, 1: GiB}
    assert p.elastic_lend == {0}, "GPU 1's lending is fixed by AQUA_LEND; GPU 0's follows its free memory"
    assert p.host_budget == 100 * GiB and p.host_reserve == 100 * GiB  # the reserve stays within the budget
    assert plan(host_margin="500GiB").host_budget == 0


@pytest.mark.parametrize("overrides, expected", [
    (dict(local_budget={2: "1GiB"}), "AQUA_LOCAL_BUDGET: unknown GPU 2 (GPUs: 0, 1)"),
    (dict(lend="5:1GiB"), "AQUA_LEND: unknown GPU 5 (GPUs: 0, 1)"),
    (dict(local_budget="100GiB"), f"AQUA_LOCAL_BUDGET=100 GiB ({100 * GiB} bytes) for GPU 0 is more than the "
                                  f"80 GiB ({80 * GiB} bytes) it has (give at most that, or a percentage such as 90%)"),
    (dict(lend="1:81GiB"), f"AQUA_LEND=81 GiB ({81 * GiB} bytes) for GPU 1 is more than the 80 GiB ({80 * GiB} bytes) "
                           "it has"),
    (dict(host_budget="600GiB"), f"AQUA_HOST_BUDGET=600 GiB ({600 * GiB} bytes) is more than the 512 GiB "
                                 f"({512 * GiB} bytes) the host has (give at most that, or a percentage such as 80%)"),
])
def test_resolve_refuses_what_the_machine_does_not_have(overrides, expected):
    with pytest.raises(ConfigError) as info:
        plan(**overrides)
    assert expected in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------
# Properties


SIZE_LIKE = st.from_regex(
    r"\s?-?[0-9]{0,30}(\.[0-9]{0,12})?\s?(|b|B|k|K|kb|KB|kib|KiB|m|M|mb|MB|mib|MiB|g|G|gb|GB|gib|GiB|t|T|tb|TB|tib|TiB"
    r"|%|x|e3|iB)\s?", fullmatch=True)


@PROPERTY
@given(st.one_of(st.text(), SIZE_LIKE))
def test_parse_size_raises_only_config_error(text):
    try:
        value = parse_size(text, "AQUA_HOST_BUDGET")
    except ConfigError as exc:
        assert str(exc).startswith("AQUA_HOST_BUDGET="), str(exc)
        assert repr(text) in str(exc)
        return
    if isinstance(value, Percent):
        assert 0 <= value.value <= 100
    else:
        assert type(value) is int and value >= 0


@PROPERTY
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126)))
def test_parse_per_device_raises_only_config_error(text):
    try:
        parse_per_device(text, "AQUA_LEND")
    except ConfigError as exc:
        assert str(exc).startswith("AQUA_LEND"), str(exc)


@PROPERTY
@given(st.integers(min_value=0, max_value=(1 << 44) - 1))
def test_mib_round_trips_exactly(n):
    assert parse_size(f"{n}MiB", "AQUA_X") == n * MiB
    assert parse_size(f"{n} mib", "AQUA_X") == n * MiB
    assert parse_size(f"{n}KiB", "AQUA_X") == n * KiB


@PROPERTY
@given(st.integers(min_value=0, max_value=(1 << 53)))
def test_plain_bytes_round_trip_up_to_2_pow_53(n):
    assert parse_size(str(n), "AQUA_X") == n


# --------------------------------------------------------------------------------------
# Known bugs (config.py)


@pytest.mark.parametrize("value", ["9" * 400, "9" * 400 + "TiB", float("inf")])
def test_parse_size_huge_values_are_config_errors(value):
    with pytest.raises(ConfigError, match="AQUA_HOST_BUDGET"):
        parse_size(value, "AQUA_HOST_BUDGET")


def test_plain_bytes_above_2_pow_53_are_exact():
    n = (1 << 53) + 1
    assert parse_size(str(n), "AQUA_X") == n


def test_parse_per_device_superscript_device_is_a_config_error():
    with pytest.raises(ConfigError, match="AQUA_LEND"):
        parse_per_device("²:1GiB", "AQUA_LEND")
