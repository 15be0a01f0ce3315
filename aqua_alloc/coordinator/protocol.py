"""The coordinator's wire protocol: framing, message validation, and where the socket lives.

One coordinator per server keeps the ledger of which process lends how much of which GPU
to whom (:mod:`aqua_alloc.coordinator.daemon`); every aqua_alloc process talks to it through
:mod:`aqua_alloc.coordinator.client`. This module is the contract between the two, and
the only place that knows the format. It is documented in docs/coordinator-protocol.md;
bump :data:`VERSION` when a message changes.

Framing: a message is a 4-byte big-endian unsigned length ``N`` followed by ``N`` bytes of
UTF-8 JSON holding one object, ``1 <= N <= MAX_MESSAGE_BYTES``. Every object carries
``"v": 1`` and ``"type"``. Requests carry an ``"id"`` that the reply echoes as ``"re"``;
replies are ``"ok"`` or ``"error"``; pushes (daemon to client, unasked) have no ``"re"``.

Standard library only: the daemon must run where torch is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import struct
import time
from typing import Any, Callable, Iterator, Mapping

__all__ = [
    "VERSION", "MAX_MESSAGE_BYTES", "MAX_NBYTES", "ProtocolError", "FramingError", "FrameDecoder",
    "Request", "encode", "validate_request", "ok", "error", "push", "default_socket_path",
    "socket_path_from_env", "PeerCredentials", "peer_credentials", "check_peer_uid", "send_message",
    "recv_message", "query_ledger", "check_ledger", "ENV_SOCKET",
]

VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024       # bytes of JSON in one message; a ledger of 8 GPUs and
                                    # 64 processes is about 10 KiB
MAX_NBYTES = (1 << 63) - 1          # largest byte count a message may carry
MAX_ID = (1 << 53) - 1              # request ids stay exact in every JSON reader
MAX_GPUS = 64                       # GPUs one hello may claim
MAX_NAME = 128                      # characters of a client's free-form name
ENV_SOCKET = "AQUA_COORDINATOR"     # the socket path, read by clients and `info`

_HEADER = struct.Struct(">I")
_GPU_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,127}$")  # "GPU-<uuid>", "MIG-...", "sim:3"


class ProtocolError(ValueError):
    """A message broke the protocol. ``code`` is the error code sent back (see
    docs/coordinator-protocol.md); the message names the field and the value."""

    fatal = False  # the connection is closed after the error reply

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FramingError(ProtocolError):
    """The byte stream cannot be read as messages any more (bad length, not JSON)."""

    fatal = True


# --------------------------------------------------------------------------------------
# Framing.


def encode(message: Mapping[str, Any]) -> bytes:
    """One framed message. Raises ProtocolError('too_large') past MAX_MESSAGE_BYTES."""
    body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message of {len(body)} bytes is over the limit of "
                                         f"{MAX_MESSAGE_BYTES} bytes")
    return _HEADER.pack(len(body)) + body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class FrameDecoder:
    """Cuts a byte stream into decoded message objects. Not thread-safe.

    Invariant: ``_buffer`` never holds more than one frame header plus
    MAX_MESSAGE_BYTES, so a peer cannot make the daemon buffer without bound."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Any]:
        """Add received bytes; yield each complete message (a decoded JSON value).
        Raises FramingError for a bad length or a body that is not UTF-8 JSON."""
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length == 0:
                raise FramingError("framing", "message length 0: a message holds one JSON object")
            if length > MAX_MESSAGE_BYTES:
                raise FramingError("too_large", f"message length {length} bytes is over the limit "
                                                f"of {MAX_MESSAGE_BYTES} bytes")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                return
            body = bytes(self._buffer[_HEADER.size:end])
            del self._buffer[:end]
            try:
                yield json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise FramingError("bad_json", f"message body is not UTF-8 JSON: {e}") from None

    @property
    def num_buffered(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buffer)


# --------------------------------------------------------------------------------------
# Messages.


def ok(re_id: int | None, **fields: Any) -> dict[str, Any]:
    """A successful reply to request ``re_id``."""
    return {"v": VERSION, "type": "ok", "re": re_id, **fields}


def error(re_id: int | None, code: str, message: str) -> dict[str, Any]:
    """A refused request (or a broken connection, with ``re_id`` None)."""
    return {"v": VERSION, "type": "error", "re": re_id, "code": code, "message": message}


def push(kind: str, **fields: Any) -> dict[str, Any]:
    """A message the daemon sends unasked: reclaim, reclaimed, reclaim_timeout."""
    return {"v": VERSION, "type": kind, **fields}


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated request: its type, its id, and its fields (checked per :data:`REQUESTS`)."""

    type: str
    id: int
    fields: dict[str, Any]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _nbytes(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad_field", f"{where}={_short(value)}: expected an integer number of bytes")
    if not 0 <= value <= MAX_NBYTES:
        raise ProtocolError("bad_field", f"{where}={value}: bytes must be in 0..{MAX_NBYTES}")
    return value


def _gpu(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _GPU_KEY_RE.match(value):
        raise ProtocolError("bad_field", f"{where}={_short(value)}: expected a GPU key such as "
                                         "'GPU-<uuid>' or 'sim:0' (letters, digits, ':._-', at most 128)")
    return value


def _gpu_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ProtocolError("bad_field", f"{where}={_short(value)}: expected a list of GPU keys")
    if len(value) > MAX_GPUS:
        raise ProtocolError("bad_field", f"{where}: {len(value)} GPUs, at most {MAX_GPUS}")
    keys = tuple(_gpu(v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(set(keys)) != len(keys):
        raise ProtocolError("bad_field", f"{where}={_short(value)}: a GPU is listed twice")
    return keys


def _pid(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < (1 << 31):
        raise ProtocolError("bad_field", f"{where}={_short(value)}: expected a process id")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise ProtocolError("bad_field", f"{where}={_short(value)}: expected a string of at most "
                                         f"{MAX_NAME} characters")
    return value


_Check = Callable[[Any, str], Any]
# type -> {field: (check, required)}. Fields not listed are refused: a v1 daemon never
# silently ignores what a newer client meant.
REQUESTS: dict[str, dict[str, tuple[_Check, bool]]] = {
    "hello": {"pid": (_pid, True), "gpus": (_gpu_list, True), "name": (_name, False)},
    "offer": {"gpu": (_gpu, True), "bytes": (_nbytes, True)},
    "borrow": {"gpu": (_gpu, True), "bytes": (_nbytes, True)},
    "release": {"gpu": (_gpu, True), "bytes": (_nbytes, True)},
    "reclaim": {"gpu": (_gpu, True), "bytes": (_nbytes, True)},
    "reclaim_done": {"gpu": (_gpu, True), "bytes": (_nbytes, True)},
    "ledger": {},
}
_ENVELOPE = ("v", "type", "id")


def request_id_of(message: Any) -> int | None:
    """The request id to echo in an error reply, when the message has a usable one."""
    if isinstance(message, dict):
        value = message.get("id")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
            return value
    return None


def validate_request(message: Any) -> Request:
    """Check a decoded message as a client's request. Raises ProtocolError naming the
    field: bad_message (not an object, no type or id), bad_version, unknown_type, bad_field."""
    if not isinstance(message, dict):
        raise ProtocolError("bad_message", f"expected a JSON object, got {type(message).__name__}")
    if "v" not in message:
        raise ProtocolError("bad_message", f"missing field 'v' (the protocol version, {VERSION})")
    version = message["v"]
    if version != VERSION or isinstance(version, bool):
        raise ProtocolError("bad_version", f"v={_short(version)}: this coordinator speaks version {VERSION}")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", f"type={_short(kind)}: expected a message type string")
    if kind not in REQUESTS:
        raise ProtocolError("unknown_type", f"type={_short(kind)}: not a request "
                                            f"(known: {', '.join(sorted(REQUESTS))})")
    rid = message.get("id")
    if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid <= MAX_ID:
        raise ProtocolError("bad_message", f"id={_short(rid)}: expected a request id in 0..{MAX_ID}")
    schema = REQUESTS[kind]
    fields: dict[str, Any] = {}
    for name, value in message.items():
        if name in _ENVELOPE:
            continue
        if name not in schema:
            raise ProtocolError("bad_field", f"{kind}: unknown field {_short(name)} "
                                             f"(fields: {', '.join(schema) or 'none'})")
        fields[name] = schema[name][0](value, f"{kind}.{name}")
    for name, (_, required) in schema.items():
        if required and name not in fields:
            raise ProtocolError("bad_field", f"{kind}: missing field {name!r}")
    return Request(kind, rid, fields)


# --------------------------------------------------------------------------------------
# Where the socket lives, and who may use it.


def default_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/aqua_alloc/coordinator.sock``, else
    ``/tmp/aqua_alloc-<uid>/coordinator.sock``: one coordinator per user and server."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return os.path.join(runtime, "aqua_alloc", "coordinator.sock")
    return os.path.join("/tmp", f"aqua_alloc-{os.getuid()}", "coordinator.sock")


def socket_path_from_env() -> str:
    """``$AQUA_COORDINATOR`` when set to a path, else :func:`default_socket_path`."""
    value = os.environ.get(ENV_SOCKET, "").strip()
    return value if value and value not in ("1", "on", "true", "yes") else default_socket_path()


@dataclasses.dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The kernel's record of who is at the other end of a Unix socket (SO_PEERCRED:
    ``struct ucred {pid_t pid; uid_t uid; gid_t gid;}``, three ints on Linux)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def check_peer_uid(peer_uid: int, own_uid: int) -> None:
    """Only processes of the same user may use a coordinator: raise
    ProtocolError('forbidden') for any other uid, root included (root can read the
    socket anyway, but a root process lending a user's GPUs is a mistake, not a plan)."""
    if peer_uid != own_uid:
        raise ProtocolError("forbidden", f"uid {peer_uid} is not the coordinator's user (uid {own_uid})")


# --------------------------------------------------------------------------------------
# Blocking helpers for clients (the daemon is non-blocking and frames by itself).


def send_message(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(encode(message))


def recv_message(sock: socket.socket, decoder: FrameDecoder, pending: list[Any],
                 deadline: float | None = None) -> Any:
    """The next message from a blocking socket. ``pending`` holds messages decoded ahead.
    Raises TimeoutError past ``deadline`` (time.monotonic()), ConnectionError at EOF."""
    while not pending:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the coordinator in time")
            sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the coordinator closed the connection")
        pending.extend(decoder.feed(data))
    return pending.pop(0)


def query_ledger(path: str, timeout: float = 1.0) -> dict[str, Any]:
    """One-shot ledger query (no hello needed), for ``python -m aqua_alloc info``.
    Raises OSError when nothing answers at ``path``, ProtocolError for a bad answer."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        send_message(sock, {"v": VERSION, "type": "ledger", "id": 1})
        reply = recv_message(sock, FrameDecoder(), [], deadline)
    if not isinstance(reply, dict) or reply.get("type") != "ok" or not isinstance(reply.get("ledger"), dict):
        detail = reply.get("message") if isinstance(reply, dict) else None
        raise ProtocolError("bad_message", f"the coordinator at {path} did not return a ledger"
                                           + (f": {detail}" if detail else ""))
    return reply["ledger"]


def check_ledger(ledger: Mapping[str, Any]) -> list[str]:
    """Broken invariants of a ledger (as :meth:`Ledger.snapshot` writes it), as sentences;
    empty when it is consistent. Per GPU: every count >= 0; what a borrower is asked to
    give back is at most what it holds; what borrowers may keep (held less asked) sums to
    at most the offer; ``borrowed`` and ``available`` agree with the rows."""
    problems = []
    for g in ledger.get("gpus", []):
        key = g["gpu"]
        rows = g["borrows"]
        for r in rows:
            if r["held"] < 0 or r["asked"] < 0 or r["asked"] > r["held"]:
                problems.append(f"{key}: client {r['client']} holds {r['held']} and is asked {r['asked']}")
        kept = sum(r["held"] - r["asked"] for r in rows)
        if g["offer"] < 0 or kept > g["offer"]:
            problems.append(f"{key}: borrowers keep {kept} bytes of an offer of {g['offer']}")
        if g["borrowed"] != sum(r["held"] for r in rows):
            problems.append(f"{key}: borrowed {g['borrowed']} is not the sum of the rows")
        if g["available"] != max(0, g["offer"] - kept):
            problems.append(f"{key}: available {g['available']} is not offer less kept")
    return problems
