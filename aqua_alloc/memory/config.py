"""Settings: every ``AQUA_*`` environment variable and ``enable()`` argument, parsed and
validated in one place.

Sizes are written ``1073741824``, ``512MiB``, ``8GiB``, ``1.5G`` (binary units: K, M, G, T,
KiB, MiB, GiB, TiB; decimal: KB, MB, GB, TB) or, where a total exists, ``80%`` of it.
Per-device settings take one size for every device or a list ``0:20GiB,1:40%``.

A bad value is refused with :class:`ConfigError`, whose message names the setting and the
value. Values that depend on the machine (more than exists, an unknown GPU) are checked by
:func:`resolve` against the :class:`~aqua_alloc.memory.topology.Topology` that ``enable()`` sees.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from typing import Any, Mapping

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3,
    "t": TiB, "tib": TiB, "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting has a bad value. The message names the setting and the value."""


_SIZE_UNITS = ((1 << 60, "EiB"), (1 << 50, "PiB"), (TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB"))


def format_size(num_bytes: int) -> str:
    """A byte count for people, exact count kept: ``1 TiB (1099511627776 bytes)``,
    ``1.5 GiB (1610612736 bytes)``, ``512 bytes``. The one form of sizes in messages."""
    for unit, name in _SIZE_UNITS:
        if num_bytes >= unit:
            return f"{num_bytes / unit:.4g} {name} ({num_bytes} bytes)"
    return f"{num_bytes} bytes"


def _size_examples(allow_percent: bool) -> str:
    """What a size setting accepts, for messages."""
    return "a byte count or a size such as 512MiB or 8GiB" + (", or a percentage such as 80%" if allow_percent
                                                               else "; no percentage here")


@dataclasses.dataclass(frozen=True)
class Percent:
    """A size given as a share of a total (the device's or the host's memory)."""

    value: float  # 0..100

    def of(self, total: int) -> int:
        return int(total * self.value / 100)


Size = int | Percent


def parse_size(text: Any, setting: str, allow_percent: bool = True) -> Size:
    """Parse one size; raise ConfigError naming `setting` when it is not one."""
    if isinstance(text, bool):
        raise ConfigError(f"{setting}={text!r}: not a size (expected {_size_examples(allow_percent)})")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{setting}={text}: a size cannot be negative")
        return _bounded(text, text, setting)
    if isinstance(text, float):
        if not math.isfinite(text) or text < 0:
            raise ConfigError(f"{setting}={text}: a size cannot be negative or NaN or infinite")
        return _bounded(int(text), text, setting)
    if isinstance(text, Percent):
        if not allow_percent:
            raise ConfigError(f"{setting}={text!r}: a percentage is not allowed here "
                              f"(expected {_size_examples(allow_percent)})")
        return text
    if not isinstance(text, str):
        raise ConfigError(f"{setting}={text!r}: not a size (expected {_size_examples(allow_percent)})")
    s = text.strip()
    if s.startswith("-"):
        raise ConfigError(f"{setting}={text!r}: a size cannot be negative")
    m = _PERCENT_RE.match(s)
    if m:
        if not allow_percent:
            raise ConfigError(f"{setting}={text!r}: a percentage is not allowed here "
                              f"(expected {_size_examples(allow_percent)})")
        value = float(m.group(1))
        if value > 100:
            raise ConfigError(f"{setting}={text!r}: a percentage must be at most 100%")
        return Percent(value)
    m = _SIZE_RE.match(s)
    if not m or not m.group(1).isascii() or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{setting}={text!r}: not a size (expected {_size_examples(allow_percent)})")
    number, unit = m.group(1), _UNITS[m.group(2).lower()]
    if "." not in number:
        return _bounded(int(number) * unit, text, setting)  # exact, however large
    value = float(number) * unit
    if not math.isfinite(value):
        raise ConfigError(f"{setting}={text!r}: too large")
    return _bounded(int(value), text, setting)


_MAX_SIZE = 1 << 64  # bytes: no machine has more


def _bounded(size: int, text: Any, setting: str) -> int:
    if size >= _MAX_SIZE:
        raise ConfigError(f"{setting}={text!r}: too large: at most {format_size(_MAX_SIZE - 1)}")
    return size


def parse_per_device(text: Any, setting: str) -> dict[int, Size] | Size:
    """One size for every device, or ``{device: size}`` from ``"0:20GiB,1:40%"`` or a dict."""
    if isinstance(text, Mapping):
        out: dict[int, Size] = {}
        for key, value in text.items():
            if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                raise ConfigError(f"{setting}: device {key!r} is not a device ordinal (0, 1, ...)")
            out[key] = parse_size(value, f"{setting}[{key}]")
        return out
    if isinstance(text, str) and ":" in text:
        out = {}
        for part in text.split(","):
            if not part.strip():
                continue
            dev, sep, value = part.partition(":")
            if not sep or not (dev.strip().isascii() and dev.strip().isdigit()):
                raise ConfigError(f"{setting}={text!r}: expected 'DEVICE:SIZE,...' (e.g. 0:20GiB,1:40%), got {part!r}")
            if int(dev) in out:
                raise ConfigError(f"{setting}={text!r}: device {int(dev)} is given twice")
            out[int(dev)] = parse_size(value, f"{setting}[{int(dev)}]")
        return out
    return parse_size(text, setting)


def parse_bool(text: Any, setting: str) -> bool:
    if isinstance(text, bool):
        return text
    s = str(text).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ConfigError(f"{setting}={text!r}: expected 1/0, true/false, yes/no or on/off")


def expect_bool(value: Any, parameter: str, allow_none: bool = False) -> bool | None:
    """``value`` of a True/False parameter of the API (``resume(wait=...)``); TypeError naming
    ``parameter`` for anything else, since ``wait="no"`` would read as true."""
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    accepted = "True, False or None" if allow_none else "True or False"
    raise TypeError(f"{parameter}={value!r}: expected {accepted}, got {type(value).__name__}")


def parse_int(text: Any, setting: str, low: int, high: int) -> int:
    try:
        if isinstance(text, bool) or (isinstance(text, str) and not text.strip().isascii()):
            raise ValueError
        value = int(str(text).strip()) if not isinstance(text, int) else text
    except ValueError:
        raise ConfigError(f"{setting}={text!r}: not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{setting}={text!r}: must be in {low}..{high}")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``enable()`` uses. Each field: its variable, its unit, its default."""

    backend: str = "cuda"                          # AQUA_BACKEND: "cuda" or "sim" (simulated devices)
    local_budget: dict[int, Size] | Size | None = None  # AQUA_LOCAL_BUDGET: bytes of contexts a GPU holds
                                                   #   for itself; default: all of the GPU's memory
    lend: dict[int, Size] | Size | None = None     # AQUA_LEND: bytes a GPU lends to other GPUs' contexts;
                                                   #   default: its free memory less lend_margin
    lend_margin: Size = Percent(10)                # AQUA_LEND_MARGIN: free memory a lender keeps
                                                   #   (default: 10% of the GPU's memory)
    lend_poll_ms: int = 100                        # AQUA_LEND_POLL_MS: how often an elastic lender re-reads
                                                   #   its free memory (ms; 0: never, budgets fixed at enable)
    host_budget: Size | None = None                # AQUA_HOST_BUDGET: pinned host bytes for contexts;
                                                   #   default: available memory less host_margin
    host_margin: Size = Percent(10)                # AQUA_HOST_MARGIN: host memory left to the system
                                                   #   (default: 10% of the host's memory)
    host_reserve: Size = 1 * GiB                   # AQUA_HOST_RESERVE: pinned host backing made ahead
                                                   #   at enable() and kept topped up (bytes)
    chunk: int = 64 * MiB                          # AQUA_CHUNK: largest piece a segment moves in (bytes;
                                                   #   2MiB times a power of two)
    device_keep: int = 0                           # AQUA_DEVICE_KEEP: idle bytes of borrowed pieces' backings a
                                                   #   lending GPU keeps mapped for the next park there, within
                                                   #   its lend budget (bytes; 0: released after use)
    trace: str | None = None                       # AQUA_TRACE: write a trace here at exit (its directory
                                                   #   must exist and be writable: checked at parse)
    trace_snapshot: bool = False                   # AQUA_TRACE_SNAPSHOT: also PyTorch's memory snapshot
    trace_events: int = 1 << 20                    # AQUA_TRACE_EVENTS: event buffer capacity (events)
    sim_devices: int = 8                           # AQUA_SIM_DEVICES: simulated GPUs (backend "sim")
    sim_device_bytes: int = 1 * GiB                # AQUA_SIM_DEVICE_BYTES: capacity of each (bytes)
    sim_host_bytes: int = 4 * GiB                  # AQUA_SIM_HOST_BYTES: simulated host memory (bytes)
    sim_peer_access: tuple[tuple[bool, ...], ...] | None = None  # simulated peer matrix; default all
    coordinator: str | None = None                 # AQUA_COORDINATOR: join the cross-process coordinator at
                                                   #   this socket path ("1": the default socket; unset or
                                                   #   "0": off). See docs/coordinator-protocol.md
    coordinator_gpus: tuple[int, ...] | None = None  # AQUA_COORDINATOR_GPUS: device ordinals this process
                                                   #   owns and offers ("0,1"; "none": none, borrow only;
                                                   #   default: device 0 on sim, the current CUDA device)
    coordinator_offer: Size | None = None          # AQUA_COORDINATOR_OFFER: bytes (or %) offered of each
                                                   #   owned GPU; default: elastic (free memory less
                                                   #   AQUA_LEND_MARGIN)
    coordinator_borrow: int | None = None          # AQUA_COORDINATOR_BORROW: most bytes borrowed from other
                                                   #   processes in all (0: never; default: no cap)
    coordinator_interval: float = 1.0              # AQUA_COORDINATOR_INTERVAL: seconds between the client's
                                                   #   re-reads of free memory and stats (> 0)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings from ``AQUA_*`` variables, then ``overrides`` (enable()'s arguments)."""
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        for var, field in _ENV_TO_FIELD.items():
            if var in env:
                raw[field] = (env[var], var)
        unknown = sorted(v for v in env if v.startswith("AQUA_") and v not in _ENV_TO_FIELD and v not in _OTHER_ENV)
        if unknown:
            warnings.warn(f"aqua_alloc: unknown setting(s) {', '.join(unknown)} ignored "
                          f"(known: {', '.join(sorted(_ENV_TO_FIELD))})", stacklevel=2)
        fields = {f.name for f in dataclasses.fields(cls)}
        for name, value in overrides.items():
            if name not in fields:
                raise ConfigError(f"enable(): unknown setting {name!r} (known: {', '.join(sorted(fields))})")
            raw[name] = (value, name)
        return cls(**{name: _parse_field(name, value, label) for name, (value, label) in raw.items()})

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, with the variable that sets each."""
        out = {}
        for var, field in sorted(_ENV_TO_FIELD.items()):
            value = getattr(self, field)
            out[var] = _show(value)
        return out


_ENV_TO_FIELD = {
    "AQUA_BACKEND": "backend",
    "AQUA_LOCAL_BUDGET": "local_budget",
    "AQUA_LEND": "lend",
    "AQUA_LEND_MARGIN": "lend_margin",
    "AQUA_LEND_POLL_MS": "lend_poll_ms",
    "AQUA_HOST_BUDGET": "host_budget",
    "AQUA_HOST_MARGIN": "host_margin",
    "AQUA_HOST_RESERVE": "host_reserve",
    "AQUA_CHUNK": "chunk",
    "AQUA_DEVICE_KEEP": "device_keep",
    "AQUA_TRACE": "trace",
    "AQUA_TRACE_SNAPSHOT": "trace_snapshot",
    "AQUA_TRACE_EVENTS": "trace_events",
    "AQUA_SIM_DEVICES": "sim_devices",
    "AQUA_SIM_DEVICE_BYTES": "sim_device_bytes",
    "AQUA_SIM_HOST_BYTES": "sim_host_bytes",
    "AQUA_COORDINATOR": "coordinator",
    "AQUA_COORDINATOR_GPUS": "coordinator_gpus",
    "AQUA_COORDINATOR_OFFER": "coordinator_offer",
    "AQUA_COORDINATOR_BORROW": "coordinator_borrow",
    "AQUA_COORDINATOR_INTERVAL": "coordinator_interval",
}
_OTHER_ENV = {"AQUA_ALLOC"}  # read by the start-up hook, not a setting


def _show(value: Any) -> Any:
    if isinstance(value, Percent):
        return f"{value.value:g}%"
    if isinstance(value, dict):
        return {k: _show(v) for k, v in value.items()}
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):  # coordinator_gpus
        return ",".join(map(str, value)) if value else "none"
    return value


# The simulated backend backs each device and the host with one sparse memfd of that many
# bytes (ftruncate to an off_t) and does offset arithmetic on it: sizes near 2**63 pass
# the generic 2**64 bound but fail there, as a CoreError that names no setting. 1 PiB is far
# beyond any simulated machine a test needs, and far from overflow.
_MAX_SIM_BYTES = 1 << 50
_MAX_COORDINATOR_INTERVAL = 3600.0  # s: larger is a typo (and overflows the client's waits near 1e10)
_UNIX_PATH_MAX = 107                # bytes of a Unix socket path (sun_path holds 108, with the NUL)


def _parse_coordinator(value: Any, label: str) -> str | None:
    if value is None or value is False:
        return None
    if value is True:
        return "1"
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{label}={value!r}: expected a socket path, 1 (the default socket) or 0 (off)")
    path = os.fspath(value)
    if not isinstance(path, str):
        raise ConfigError(f"{label}={value!r}: expected a socket path as text")
    word = path.strip().lower()
    if word in _FALSE:
        return None
    if word in _TRUE:
        return "1"  # coordinator_client.join() picks the default socket
    try:
        encoded = os.fsencode(path)
    except UnicodeError:
        encoded = b"\0"
    if b"\0" in encoded or len(encoded) > _UNIX_PATH_MAX:
        raise ConfigError(f"{label}={value!r}: not a usable Unix socket path (at most {_UNIX_PATH_MAX} bytes, no NUL)")
    return path


def _parse_trace_path(value: Any, label: str) -> str | None:
    """A file the trace can be written to at exit: checked now, so that a typo is refused at
    ``enable()`` rather than found when the run is over (the writer makes a temporary file in
    the same directory and renames it, so the directory must exist and be writable)."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str):
        raise ConfigError(f"{label}={value!r}: expected a file path, such as /tmp/aqua-trace.json")
    path = os.fspath(value)
    if not path.strip():
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{label}={value!r}: is a directory; expected a file path in it, "
                          f"such as {os.path.join(path, 'trace.json')}")
    if not os.path.exists(directory):
        raise ConfigError(f"{label}={value!r}: directory {directory} does not exist; create it "
                          "or give a file path in an existing directory")
    if not os.path.isdir(directory):
        raise ConfigError(f"{label}={value!r}: {directory} is not a directory; give a file path in a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{label}={value!r}: directory {directory} is not writable by this process; "
                          "give a file path in a directory it may write to")
    return path


def _parse_gpus(value: Any, label: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "auto"):
            return None
        if text == "none":
            return ()
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isascii() and p.isdigit() for p in parts):
            raise ConfigError(f"{label}={value!r}: expected device ordinals such as 0 or 0,1 (or none)")
        gpus = [int(p) for p in parts]
    elif isinstance(value, int) and not isinstance(value, bool):
        gpus = [value]
    elif isinstance(value, (list, tuple)):
        gpus = list(value)
        if any(isinstance(d, bool) or not isinstance(d, int) for d in gpus):
            raise ConfigError(f"{label}={value!r}: expected device ordinals such as (0,) or (0, 1)")
    else:
        raise ConfigError(f"{label}={value!r}: expected device ordinals such as 0 or 0,1")
    for d in gpus:
        if not 0 <= d < 64:
            raise ConfigError(f"{label}={value!r}: device {d} is not a device ordinal (0..63)")
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"{label}={value!r}: a device is given twice")
    return tuple(gpus)


def _parse_seconds(value: Any, label: str, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (
            isinstance(value, str) and not value.strip().isascii()):
        raise ConfigError(f"{label}={value!r}: not a number of seconds")
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{label}={value!r}: not a number of seconds") from None
    if not 0 < seconds <= high:  # NaN fails too
        raise ConfigError(f"{label}={value!r}: must be > 0 and at most {high:g} seconds")
    return seconds


def _parse_field(name: str, value: Any, label: str) -> Any:
    if name == "backend":
        if value not in ("cuda", "sim"):
            raise ConfigError(f"{label}={value!r}: expected 'cuda' or 'sim'")
        return value
    if name in ("local_budget", "lend"):
        return None if value is None else parse_per_device(value, label)
    if name in ("host_budget",):
        return None if value is None else parse_size(value, label)
    if name in ("lend_margin", "host_margin", "host_reserve"):
        return parse_size(value, label)
    if name in ("chunk", "device_keep", "sim_device_bytes", "sim_host_bytes"):
        size = parse_size(value, label, allow_percent=False)
        if name == "chunk" and (size < 2 * MiB or size % (2 * MiB) or (size // (2 * MiB)) & (size // (2 * MiB) - 1)):
            raise ConfigError(f"{label}={value!r}: must be 2MiB times a power of two (2MiB, 4MiB, ... 64MiB, ...)")
        if name in ("sim_device_bytes", "sim_host_bytes") and size > _MAX_SIM_BYTES:
            raise ConfigError(f"{label}={value!r}: too large for the simulated backend: "
                              f"at most {format_size(_MAX_SIM_BYTES)}")
        if name == "sim_device_bytes" and size % (2 * MiB):
            raise ConfigError(f"{label}={value!r}: must be a multiple of 2MiB")
        return size
    if name == "coordinator":
        return _parse_coordinator(value, label)
    if name == "coordinator_gpus":
        return _parse_gpus(value, label)
    if name in ("coordinator_offer", "coordinator_borrow"):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "auto")):
            return None
        return parse_size(value, label, allow_percent=name == "coordinator_offer")
    if name == "coordinator_interval":
        return _parse_seconds(value, label, _MAX_COORDINATOR_INTERVAL)
    if name == "trace":
        return _parse_trace_path(value, label)
    if name == "trace_snapshot":
        return parse_bool(value, label)
    if name == "trace_events":
        return parse_int(value, label, 1, 1 << 26)
    if name == "sim_devices":
        return parse_int(value, label, 1, 64)
    if name == "lend_poll_ms":
        return parse_int(value, label, 0, 60_000)
    if name == "sim_peer_access":
        if value is None:
            return None
        try:
            matrix = tuple(tuple(bool(x) for x in row) for row in value)
        except TypeError:
            raise ConfigError(f"{label}: expected a square matrix of booleans") from None
        if any(len(row) != len(matrix) for row in matrix):
            raise ConfigError(f"{label}: expected a square matrix of booleans")
        return matrix
    raise ConfigError(f"unknown setting {label!r}")  # pragma: no cover - fields are fixed


def trace_settings_from_env(env: Mapping[str, str] | None = None) -> tuple[str | None, bool]:
    """(``AQUA_TRACE``, ``AQUA_TRACE_SNAPSHOT``) alone, checked as ``enable()`` checks them: for
    layers that trace without enabling aqua_alloc (the scheduler on CPU)."""
    env = os.environ if env is None else env
    path = _parse_field("trace", env["AQUA_TRACE"], "AQUA_TRACE") if "AQUA_TRACE" in env else None
    snapshot = "AQUA_TRACE_SNAPSHOT" in env and parse_bool(env["AQUA_TRACE_SNAPSHOT"], "AQUA_TRACE_SNAPSHOT")
    return path, snapshot


@dataclasses.dataclass(frozen=True)
class Plan:
    """Settings resolved against the machine: concrete bytes for every tier."""

    local_budget: dict[int, int]   # device -> bytes of its own contexts it holds
    lend: dict[int, int]           # device -> bytes it lends to other devices' contexts
    host_budget: int               # pinned host bytes
    host_reserve: int              # pinned host bytes made ahead
    lend_margin: dict[int, int] = dataclasses.field(default_factory=dict)  # device -> free bytes a lender keeps
    elastic_lend: frozenset[int] = frozenset()  # devices whose lend budget follows their free memory


def _per_device(spec: dict[int, Size] | Size | None, totals: dict[int, int], default: dict[int, int],
                label: str) -> dict[int, int]:
    out = dict(default)
    if spec is None:
        return out
    items = spec.items() if isinstance(spec, dict) else ((d, spec) for d in totals)
    for device, size in items:
        if device not in totals:
            known = ", ".join(str(d) for d in sorted(totals)) or "none"
            raise ConfigError(f"{label}: unknown GPU {device} (GPUs: {known})")
        value = size.of(totals[device]) if isinstance(size, Percent) else size
        if value > totals[device]:
            raise ConfigError(f"{label}={format_size(value)} for GPU {device} is more than the "
                              f"{format_size(totals[device])} it has (give at most that, or a percentage such as 90%)")
        out[device] = value
    return out


def resolve(settings: Settings, device_total: dict[int, int], device_free: dict[int, int],
            host_total: int, host_available: int) -> Plan:
    """Concrete budgets for this machine. Raises ConfigError for values that do not fit it."""
    local = _per_device(settings.local_budget, device_total, dict(device_total), "AQUA_LOCAL_BUDGET")
    lend_margin = {d: settings.lend_margin.of(t) if isinstance(settings.lend_margin, Percent) else settings.lend_margin
                   for d, t in device_total.items()}
    default_lend = {d: max(0, device_free[d] - lend_margin[d]) for d in device_total} if len(device_total) > 1 else {
        d: 0 for d in device_total}
    lend = _per_device(settings.lend, device_total, default_lend, "AQUA_LEND")
    fixed = set(settings.lend) if isinstance(settings.lend, dict) else set(device_total) if settings.lend is not None else set()
    elastic = frozenset(d for d in device_total if d not in fixed) if len(device_total) > 1 else frozenset()
    margin = settings.host_margin.of(host_total) if isinstance(settings.host_margin, Percent) else settings.host_margin
    if settings.host_budget is None:
        host_budget = max(0, host_available - margin)
    else:
        host_budget = (settings.host_budget.of(host_total) if isinstance(settings.host_budget, Percent)
                       else settings.host_budget)
        if host_budget > host_total:
            raise ConfigError(f"AQUA_HOST_BUDGET={format_size(host_budget)} is more than the {format_size(host_total)} "
                              "the host has (give at most that, or a percentage such as 80%)")
    reserve = (settings.host_reserve.of(host_budget) if isinstance(settings.host_reserve, Percent)
               else settings.host_reserve)
    return Plan(local_budget=local, lend=lend, host_budget=host_budget, host_reserve=min(reserve, host_budget),
                lend_margin=lend_margin, elastic_lend=elastic)
