"""The client side of lending between processes: one :class:`Client` per process joins
the server's coordinator (:mod:`aqua_alloc.coordinator.daemon`) and keeps this process's
allocator in step with the ledger.

What it does, on a background thread, every ``interval`` seconds:

- as an *owner* (the GPUs named in ``gpus``): offers each GPU's spare memory, by the
  policy: a fixed number of bytes, or (elastic) the driver's free memory plus what
  borrowers already hold there, less a margin. When the spare memory shrinks below the
  offer (this process needs more), it reclaims the difference.
- as a *borrower*: when some of its contexts live in host memory, borrows room on the GPU
  of another process that offers the most, and sets its allocator's lend budget for that
  GPU to exactly what was granted (``local.lend(device, granted)``); parked contexts then
  go there before host. Room left unused for long is given back.
- answers the coordinator's reclaims at once (a reader thread takes them off the socket):
  lowers the lend budget of that GPU (``local.reclaim``, which moves the pieces placed
  beyond it to another peer or host), and confirms what has left (``reclaim_done``).

The allocator is reached only through a small object, ``local``, with the methods of
aqua_alloc's public API: ``lend(device, max_bytes)``, ``reclaim(device, nbytes, timeout)``
(returns an object with ``moved_bytes``, ``pending_bytes``, ``seconds``), ``stats()``,
and for the elastic offer ``mem_info(device) -> (free, total)``. :class:`AquaLocal` is
that object for the running aqua_alloc; tests pass a fake.

Order of operations, so that the ledger is never less than what is in use: a borrower
raises its lend budget only after the coordinator granted the bytes, and confirms bytes
given back (release, reclaim_done) only after its budget is lowered and the pieces left.
Every lend budget of a GPU this process does not own is set to 0 when the client starts.

Thread-safety: every public method may be called from any thread; changes to lend
budgets are serialized by one lock.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import socket
import threading
import time
from typing import Any, Mapping, Protocol, Sequence

from aqua_alloc.coordinator import protocol as proto
from aqua_alloc.coordinator.protocol import ProtocolError
from aqua_alloc.memory import allocator, native, topology
from aqua_alloc.memory.config import ConfigError, MiB, Percent, parse_size
from aqua_alloc.memory.lending import elastic_budget
from aqua_alloc.obs import events

__all__ = ["Client", "LendingPolicy", "AquaLocal", "CoordinatorError", "CoordinatorRefused", "LenderReclaim", "join",
           "plan_offer", "plan_borrow", "plan_release", "gpu_keys"]

log = logging.getLogger("aqua_alloc.coordinator.client")

_KEEP_OUTCOMES = 64  # finished reclaims remembered (a late "reclaimed" may still update one)
_LOST = object()     # inbox sentinel: the connection is gone
_STOP = object()     # inbox sentinel: close() was called


class CoordinatorError(RuntimeError):
    """The coordinator cannot be reached, or did not answer in time."""


class CoordinatorRefused(CoordinatorError):
    """The coordinator refused a request; ``code`` is its error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclasses.dataclass(frozen=True)
class LendingPolicy:
    """How a process lends and borrows. Sizes are bytes."""

    offer: int | Percent | None = None     # bytes offered of each owned GPU (or a share of its
                                           #   memory); None: elastic (free memory less margin)
    margin: int | Percent = Percent(10)    # elastic: free memory the owner keeps for itself
    offer_step: int = 64 * MiB             # offers change by at least this much (hysteresis)
    max_borrow: int | None = None          # most bytes borrowed in all; 0: never; None: no cap
    borrow_step: int = 256 * MiB           # borrow in multiples of this; keep this much unused
    interval: float = 1.0                  # s between re-reads of free memory and stats
    request_timeout: float = 5.0           # s to wait for a reply from the coordinator

    def __post_init__(self) -> None:
        for name in ("offer_step", "borrow_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"LendingPolicy.{name}={value!r}: expected a positive number of bytes")
        for name in ("interval", "request_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"LendingPolicy.{name}={value!r}: expected a positive number of seconds")
        if self.max_borrow is not None and (isinstance(self.max_borrow, bool) or not isinstance(self.max_borrow, int)
                                            or self.max_borrow < 0):
            raise ConfigError(f"LendingPolicy.max_borrow={self.max_borrow!r}: expected bytes >= 0 or None")


# --------------------------------------------------------------------------------------
# LendingPolicy decisions: pure functions of numbers, tested with exact values.


def _of(size: int | Percent, total: int) -> int:
    return size.of(total) if isinstance(size, Percent) else size


def plan_offer(policy: LendingPolicy, free: int, total: int, borrowed: int, offer: int) -> tuple[str, int] | None:
    """What an owner should do about one GPU: ``("offer", new_offer)``,
    ``("reclaim", bytes)`` or None.

    The spare memory is the fixed offer, or the driver's ``free`` memory plus the bytes
    borrowers hold (the driver counts them as used; a grant not yet allocated is counted
    too, so borrowers give unused room back, see :func:`plan_release`) less the margin.
    Changes smaller than ``offer_step`` are left alone; a spare below the offer is
    always reclaimed."""
    if policy.offer is not None:
        target = _of(policy.offer, total)
    else:
        target = elastic_budget(free, borrowed, _of(policy.margin, total))  # as in-process lending does
    target = min(target, total)
    if target < offer:
        return ("reclaim", offer - target)
    if target - offer >= policy.offer_step or (policy.offer is not None and target != offer):
        return ("offer", target)
    return None


def plan_borrow(policy: LendingPolicy, host_bytes: int, kept: int, available: Mapping[str, int],
                room: int = 0) -> tuple[str, int] | None:
    """Whether to borrow: ``(gpu key, bytes)`` or None. A borrower wants room for the
    bytes its contexts have in host memory (``host_bytes``) beyond the ``room`` it holds
    unused already (borrowed, nothing placed there yet: host bytes move there at their
    context's next park, so borrowing more each round would only pile up grants), rounded
    up to ``borrow_step``, within ``max_borrow`` less what it ``kept`` already; from the GPU
    with the most ``available`` (ties: the smallest key)."""
    if host_bytes <= room or policy.max_borrow == 0:
        return None
    step = policy.borrow_step
    want = -(-(host_bytes - room) // step) * step
    if policy.max_borrow is not None:
        want = min(want, policy.max_borrow - kept)
    if want <= 0 or not available:
        return None
    key = min(available, key=lambda k: (-available[k], k))
    nbytes = min(want, available[key])
    return (key, nbytes) if nbytes > 0 else None


def plan_release(policy: LendingPolicy, host_bytes: int, budget: int, placed: int) -> int:
    """Bytes of one borrowed GPU to give back: what is unused (``budget - placed``) past
    two borrow steps, keeping one step of room, and only while no context is in host
    memory (it could use the room)."""
    slack = budget - placed
    if host_bytes > 0 or slack <= 2 * policy.borrow_step:
        return 0
    return slack - policy.borrow_step


# --------------------------------------------------------------------------------------
# The local allocator.


def gpu_keys(backend: str, num_devices: int) -> dict[int, str]:
    """Stable names of this process's devices: ``sim:<index>`` on the simulated backend,
    the GPU's UUID (``GPU-...``, as ``nvidia-smi -L`` prints it) on CUDA."""
    if backend == "sim":
        return {d: f"sim:{d}" for d in range(num_devices)}
    uuids = topology.cuda_uuids()
    if uuids is None or len(uuids) < num_devices:
        raise CoordinatorError(f"cannot name the {num_devices} GPU(s): this torch does not report their UUIDs")
    return {d: uuids[d] for d in range(num_devices)}


class LocalMemory(Protocol):
    """What the client asks of this process's allocator (tests pass fakes)."""

    def lend(self, device: int, max_bytes: int | None) -> None:
        """Fix the lend budget of GPU ``device`` (None: elastic)."""

    def reclaim(self, device: int, nbytes: int | None = None, timeout: float = 5.0) -> Any:
        """Take back ``nbytes`` of what ``device`` lends; the result has ``moved_bytes``,
        ``pending_bytes`` and ``seconds``."""

    def stats(self) -> dict[str, Any]:
        """The allocator's stats (``["tiers"]["gpuN"]["lent"]``: bytes placed on GPU N)."""

    def mem_info(self, device: int) -> tuple[int, int]:
        """(free, total) bytes of GPU ``device``."""

    def gpu_keys(self) -> dict[int, str]:
        """Each GPU's name that every process on the server agrees on (its UUID)."""


class AquaLocal:
    """The running aqua_alloc of this process, as the client's :class:`LocalMemory`."""

    def lend(self, device: int, max_bytes: int | None) -> None:
        allocator.lend(device, max_bytes)

    def reclaim(self, device: int, nbytes: int | None = None, timeout: float = 5.0) -> Any:
        return allocator.reclaim(device, nbytes, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return allocator.stats()

    def mem_info(self, device: int) -> tuple[int, int]:
        return native.mem_info(device)

    def gpu_keys(self) -> dict[int, str]:
        return gpu_keys("cuda" if allocator.uses_cuda() else "sim", allocator.num_devices())


# --------------------------------------------------------------------------------------
# The client.


@dataclasses.dataclass
class LenderReclaim:
    """A reclaim this process asked for, as an owner. ``state``: "pending", "done"
    (every byte is back), "timeout" (borrowers did not confirm in time; it may still
    become "done", with ``late`` set)."""

    id: int
    gpu: str
    nbytes: int
    immediate: int          # bytes back at once (nobody had borrowed them)
    pending: int            # bytes asked of borrowers
    state: str = "pending"
    bytes_back: int = 0     # bytes back so far (known when done or timed out)
    late: bool = False
    seconds: float = 0.0


@dataclasses.dataclass
class _Borrowed:
    """This process's side of one borrowed GPU. ``held``/``asked`` mirror the ledger;
    ``budget`` is the lend budget set in the allocator; ``pending`` bytes still sit
    beyond it (moving at their context's next park or resume). Invariant:
    ``budget + pending <= held`` once every ask is settled."""

    held: int = 0
    asked: int = 0
    budget: int = 0
    pending: int = 0


class Client:
    """One process's membership in the coordinator.

    ``gpus``: device ordinals this process owns (offers); ``keys``: every device's GPU key
    (default: ``local.gpu_keys()``); ``local``: the allocator (default :class:`AquaLocal`).
    ``start=False`` joins but runs no policy thread (explicit calls only; reclaims pushed
    by the coordinator are still answered)."""

    def __init__(self, socket_path: str, gpus: Sequence[int], policy: LendingPolicy | None = None, local: Any = None, *,
                 keys: Mapping[int, str] | None = None, name: str = "", start: bool = True) -> None:
        self.socket_path = socket_path
        self.policy = policy or LendingPolicy()
        self.local = local if local is not None else AquaLocal()
        self._keys = dict(keys if keys is not None else self.local.gpu_keys())
        self._ordinals = {k: d for d, k in self._keys.items()}
        if len(self._ordinals) != len(self._keys):
            raise ConfigError(f"keys={self._keys!r}: two devices have the same key")
        for d in gpus:
            if d not in self._keys:
                raise ConfigError(f"gpus: device {d!r} is not one of this process's devices "
                                  f"({', '.join(map(str, sorted(self._keys)))})")
        self.owned = tuple(self._keys[d] for d in gpus)
        self._lock = threading.RLock()          # lend budgets and the mirrors below
        self._send_lock = threading.Lock()
        self._replies: dict[int, list[Any]] = {}  # request id -> [threading.Event, reply]
        self._replies_lock = threading.Lock()
        self._next_id = 1
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._outcomes = threading.Condition()
        self._lender_reclaims: dict[int, LenderReclaim] = {}
        self._offers: dict[str, int] = {k: 0 for k in self.owned}
        self._borrowed: dict[str, _Borrowed] = {}
        self._closed = False
        self.connected = False

        self._sock = self._connect(socket_path)
        self._decoder = proto.FrameDecoder()
        try:
            welcome = self._hello(name)
        except BaseException:
            self._sock.close()
            raise
        self.client_id: int = welcome["client"]
        self.reclaim_timeout: float = float(welcome["reclaim_timeout_s"])
        for entry in welcome.get("gpus", []):
            if entry.get("returning"):
                log.info("%s: borrowers of its previous owner still hold %d bytes (being given back)",
                         entry.get("gpu"), entry["returning"])
        # Nothing of ours may sit on another process's GPU before it was granted.
        try:
            with self._lock:
                for d, key in self._keys.items():
                    if key not in self.owned:
                        self.local.lend(d, 0)
        except BaseException:
            self._sock.close()
            raise
        self.connected = True
        self._reader = threading.Thread(target=self._read_loop, name="aqua-coordinator-reader", daemon=True)
        self._worker = threading.Thread(target=self._work_loop, args=(start,), name="aqua-coordinator",
                                        daemon=True)
        self._reader.start()
        self._worker.start()

    # --- connection -------------------------------------------------------------------

    @staticmethod
    def _connect(path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(2.0)
            sock.connect(path)
            # The other end must be ours too: never hand the books to another user's daemon.
            proto.check_peer_uid(proto.peer_credentials(sock).uid, os.geteuid())
        except ProtocolError as e:
            sock.close()
            raise CoordinatorError(f"coordinator at {path}: {e}") from None
        except OSError as e:
            sock.close()
            raise CoordinatorError(f"no coordinator at {path}: {e.strerror or e} "
                                   "(start one with `python -m aqua_alloc coordinator`)") from None
        return sock

    def _hello(self, name: str) -> dict[str, Any]:
        pending: list[Any] = []
        proto.send_message(self._sock, {"v": proto.VERSION, "type": "hello", "id": 0, "pid": os.getpid(),
                                        "gpus": list(self.owned), **({"name": name} if name else {})})
        deadline = time.monotonic() + self.policy.request_timeout
        try:
            reply = proto.recv_message(self._sock, self._decoder, pending, deadline)
        except (OSError, ProtocolError) as e:
            raise CoordinatorError(f"coordinator at {self.socket_path}: no answer to hello: {e}") from None
        self._sock.settimeout(None)
        if not isinstance(reply, dict) or reply.get("type") != "ok":
            code = reply.get("code", "bad_message") if isinstance(reply, dict) else "bad_message"
            raise CoordinatorRefused(code, str(reply.get("message") if isinstance(reply, dict) else reply))
        for message in pending:  # pushes cannot come before hello's reply; keep them anyway
            self._inbox.put(message)
        return reply

    def _read_loop(self) -> None:
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionError("the coordinator closed the connection")
                for message in self._decoder.feed(data):
                    if not isinstance(message, dict):
                        continue
                    if message.get("type") in ("ok", "error") and message.get("re") is not None:
                        with self._replies_lock:
                            slot = self._replies.get(message["re"])
                        if slot is not None:
                            slot[1] = message
                            slot[0].set()
                            continue
                        if message.get("type") == "error":
                            log.warning("coordinator: %s: %s", message.get("code"), message.get("message"))
                        continue
                    if message.get("type") == "error":  # not tied to a request: the connection is ending
                        log.warning("coordinator: %s: %s", message.get("code"), message.get("message"))
                        continue
                    self._inbox.put(message)
        except (OSError, ValueError, ProtocolError) as e:
            if not self._closed:
                log.warning("lost the coordinator at %s: %s", self.socket_path, e)
        finally:
            self.connected = False
            with self._replies_lock:
                for slot in self._replies.values():
                    slot[0].set()  # reply stays None: the waiter raises
            self._inbox.put(_LOST)

    def _request(self, kind: str, **fields: Any) -> dict[str, Any]:
        if not self.connected:
            raise CoordinatorError(f"not connected to the coordinator at {self.socket_path}")
        with self._replies_lock:
            rid = self._next_id
            self._next_id += 1
            slot: list[Any] = [threading.Event(), None]
            self._replies[rid] = slot
        try:
            if not self.connected:  # lost while registering: the reader will not answer this one
                raise CoordinatorError(f"not connected to the coordinator at {self.socket_path}")
            with self._send_lock:
                proto.send_message(self._sock, {"v": proto.VERSION, "type": kind, "id": rid, **fields})
            if not slot[0].wait(self.policy.request_timeout):
                raise CoordinatorError(f"{kind}: no answer from the coordinator in {self.policy.request_timeout} s")
        except OSError as e:
            raise CoordinatorError(f"{kind}: lost the coordinator: {e.strerror or e}") from None
        finally:
            with self._replies_lock:
                self._replies.pop(rid, None)
        reply = slot[1]
        if reply is None:
            raise CoordinatorError(f"{kind}: lost the coordinator at {self.socket_path}")
        if reply.get("type") != "ok":
            raise CoordinatorRefused(str(reply.get("code")), str(reply.get("message")))
        return reply

    # --- helpers ----------------------------------------------------------------------

    def key(self, gpu: int | str) -> str:
        """The GPU key of a device ordinal (or a key, checked)."""
        if isinstance(gpu, str) and gpu in self._ordinals:
            return gpu
        if isinstance(gpu, int) and not isinstance(gpu, bool) and gpu in self._keys:
            return self._keys[gpu]
        raise ValueError(f"gpu={gpu!r}: not one of this process's devices ({self._keys})")

    def _tier(self, key: str) -> str | None:
        return f"gpu{self._ordinals[key]}" if key in self._ordinals else None

    def _event(self, kind: events.EventKind, key: str, nbytes: int, **args: Any) -> None:
        tier = self._tier(key)
        src = tier if kind in (events.EventKind.LEND_RELEASE,) else None
        events.record(events.Event(t_ns=time.monotonic_ns(), kind=kind, src=src, dst=None if src else tier,
                                   bytes=nbytes, args={"gpu": key, **args}))

    # --- as an owner ------------------------------------------------------------------

    def offer(self, gpu: int | str, nbytes: int) -> dict[str, Any]:
        """Offer ``nbytes`` of an owned GPU (replaces the previous offer). Lowering it
        below what borrowers keep is refused (``below_borrowed``): reclaim instead."""
        key = self.key(gpu)
        reply = self._request("offer", gpu=key, bytes=nbytes)
        self._offers[key] = reply["offer"]
        self._event(events.EventKind.LEND_OFFER, key, nbytes)
        return reply

    def reclaim(self, gpu: int | str, nbytes: int | None = None, wait: bool = True,
                timeout: float | None = None) -> LenderReclaim:
        """Take back ``nbytes`` (None: the whole offer) of an owned GPU. With ``wait``,
        returns once borrowers confirmed ("done") or the coordinator's deadline passed
        ("timeout"), or after ``timeout`` seconds (then "pending")."""
        key = self.key(gpu)
        if nbytes is None:
            nbytes = self._offers.get(key, 0)
        with self._outcomes:  # held across the request: its outcome is handled after this
            reply = self._request("reclaim", gpu=key, bytes=nbytes)
            self._offers[key] = self._offers.get(key, 0) - nbytes
            outcome = LenderReclaim(reply["reclaim"], key, nbytes, reply["immediate"], reply["pending"])
            self._event(events.EventKind.LEND_RECLAIM, key, nbytes, reclaim=outcome.id, role="lender",
                        immediate=outcome.immediate, pending=outcome.pending)
            self._lender_reclaims[outcome.id] = outcome
            for rid in [r for r, o in self._lender_reclaims.items() if o.state == "done"][:-_KEEP_OUTCOMES]:
                del self._lender_reclaims[rid]
            if wait:
                limit = self.reclaim_timeout + 1.0 if timeout is None else timeout
                self._outcomes.wait_for(lambda: outcome.state != "pending" or not self.connected, limit)
            return dataclasses.replace(outcome)

    def _on_reclaim_outcome(self, message: dict[str, Any]) -> None:
        key = str(message.get("gpu"))
        with self._outcomes:
            rid = message.get("reclaim")
            outcome = self._lender_reclaims.setdefault(
                rid, LenderReclaim(rid, key, int(message.get("bytes", 0)), 0, 0))
            if message["type"] == "reclaimed":
                outcome.state, outcome.bytes_back = "done", outcome.nbytes
                outcome.late, outcome.seconds = bool(message.get("late")), float(message.get("seconds", 0.0))
                self._event(events.EventKind.LEND_RECLAIMED, key, outcome.nbytes, reclaim=rid, late=outcome.late,
                            seconds=outcome.seconds)
                if outcome.late:
                    log.warning("reclaim %s of %d bytes on %s: every byte is back, late", rid, outcome.nbytes, key)
            else:
                outcome.state, outcome.bytes_back = "timeout", int(message.get("bytes_back", 0))
                self._event(events.EventKind.LEND_RECLAIM_TIMEOUT, key, outcome.nbytes, reclaim=rid,
                            bytes_back=outcome.bytes_back, bytes_missing=message.get("bytes_missing"),
                            borrowers=message.get("borrowers"))
                log.warning("reclaim %s on %s timed out: %s of %d bytes back; missing %s bytes from %s", rid, key,
                            outcome.bytes_back, outcome.nbytes, message.get("bytes_missing"),
                            message.get("borrowers"))
            self._outcomes.notify_all()  # after the event: a waiter sees both

    # --- as a borrower ----------------------------------------------------------------

    def borrow(self, gpu: int | str, nbytes: int) -> int:
        """Borrow up to ``nbytes`` on another process's GPU; returns the bytes granted (0:
        none free now). The allocator's lend budget for it grows by as much."""
        key = self.key(gpu)
        if key in self.owned:
            raise ValueError(f"gpu={gpu!r} is this process's own GPU")
        with self._lock:
            reply = self._request("borrow", gpu=key, bytes=nbytes)
            granted = reply["granted"]
            if granted == 0:
                return 0
            b = self._borrowed.setdefault(key, _Borrowed())
            b.held = reply["held"]
            try:
                self.local.lend(self._ordinals[key], b.budget + granted)
            except Exception:
                log.exception("could not raise the lend budget of %s; giving the grant back", key)
                b.held -= granted
                self._request("release", gpu=key, bytes=granted)
                raise
            b.budget += granted
            self._event(events.EventKind.LEND_BORROW, key, granted, asked=nbytes)
        return granted

    def release(self, gpu: int | str, nbytes: int | None = None, timeout: float | None = None) -> int:
        """Give back up to ``nbytes`` (None: all) of a borrowed GPU: lower the lend budget,
        wait up to ``timeout`` s for the pieces to leave, then release what left. Returns
        the bytes released."""
        key = self.key(gpu)
        with self._lock:
            b = self._borrowed.get(key)
            if b is None:
                return 0
            kept = b.held - b.asked
            nbytes = kept if nbytes is None else min(nbytes, kept)
            if nbytes <= 0:
                return 0
            occupied = self._lower(key, b.held - b.asked - nbytes, self._timeout(timeout))
            free = b.held - occupied
            settle = min(b.asked, free)
            nbytes = min(nbytes, free - settle)
            if nbytes <= 0:
                return 0
            reply = self._request("release", gpu=key, bytes=nbytes)
            b.held = reply["held"]
            self._forget_if_done(key)
            self._event(events.EventKind.LEND_RELEASE, key, nbytes, reason="release")
        return nbytes

    def _timeout(self, timeout: float | None) -> float:
        return self.reclaim_timeout if timeout is None else timeout

    def _lower(self, key: str, target: int, timeout: float) -> int:
        """Lower the lend budget of ``key`` to at most ``target`` bytes, waiting up to
        ``timeout`` s for the pieces beyond it to leave; returns the bytes still occupied
        there (budget + pending). Pieces pending from an earlier call are re-counted from
        the allocator's stats (they move at their context's next park or resume)."""
        b = self._borrowed[key]
        target = max(0, target)
        if b.budget > target:
            result = self.local.reclaim(self._ordinals[key], b.budget - target, timeout=timeout)
            b.budget = target
            b.pending = max(0, int(result.pending_bytes))
        elif b.pending:
            placed = int(self.local.stats().get("tiers", {}).get(self._tier(key), {}).get("lent", 0))
            b.pending = max(0, placed - b.budget)
        return b.budget + b.pending

    def _settle(self, key: str, timeout: float) -> int:
        """Give back what the coordinator asked of ``key``, as far as the pieces have
        left; confirm it with reclaim_done. Returns the bytes confirmed."""
        with self._lock:
            b = self._borrowed.get(key)
            if b is None or b.asked == 0:
                return 0
            occupied = self._lower(key, b.held - b.asked, timeout)
            done = min(b.asked, b.held - occupied)
            if done <= 0:
                return 0
            reply = self._request("reclaim_done", gpu=key, bytes=done)
            b.held, b.asked = reply["held"], reply["asked"]
            self._forget_if_done(key)
            self._event(events.EventKind.LEND_RELEASE, key, done, reason="reclaim")
        return done

    def _forget_if_done(self, key: str) -> None:
        b = self._borrowed.get(key)
        if b is not None and b.held == 0 and b.budget == 0 and b.pending == 0:
            del self._borrowed[key]

    def _on_reclaim(self, message: dict[str, Any]) -> None:
        key = str(message.get("gpu"))
        nbytes = int(message.get("bytes", 0))
        with self._lock:
            b = self._borrowed.get(key)
            if b is None:
                log.warning("coordinator asked back %d bytes of %s, which this process does not hold", nbytes, key)
                return
            b.asked += nbytes
            self._event(events.EventKind.LEND_RECLAIM, key, nbytes, reclaim=message.get("reclaim"),
                        role="borrower", reason=message.get("reason"))
        # Leave a little of the coordinator's deadline for the confirmation to arrive.
        timeout = max(0.0, min(float(message.get("timeout_s", self.reclaim_timeout)), self.reclaim_timeout) * 0.8)
        done = self._settle(key, timeout)
        if done < nbytes:
            log.warning("reclaim of %d bytes on %s: %d confirmed; the rest moves at its contexts' next park or "
                        "resume and is confirmed then", nbytes, key, done)

    # --- reading ----------------------------------------------------------------------

    def ledger(self) -> dict[str, Any]:
        """The coordinator's whole ledger (see docs/coordinator-protocol.md)."""
        return self._request("ledger")["ledger"]

    def borrowed(self) -> dict[str, dict[str, int]]:
        """This process's view of what it borrowed: per GPU key, held/asked/budget/pending."""
        with self._lock:
            return {k: dataclasses.asdict(b) for k, b in self._borrowed.items()}

    def offers(self) -> dict[str, int]:
        return dict(self._offers)

    # --- the background thread --------------------------------------------------------

    def _work_loop(self, run_policy: bool) -> None:
        next_tick = time.monotonic()
        while True:
            wait = max(0.0, next_tick - time.monotonic()) if run_policy else None
            try:
                message = self._inbox.get(timeout=wait)
            except queue.Empty:
                message = None
            try:
                if message is _STOP:
                    return
                if message is _LOST:
                    self._on_lost()
                    return
                if message is not None:
                    self._on_push(message)
                elif run_policy:
                    next_tick = time.monotonic() + self.policy.interval
                    self.tick()
            except CoordinatorError as e:
                if self.connected:
                    log.warning("coordinator: %s", e)
            except Exception:  # a policy bug must not stop answering reclaims
                log.exception("coordinator client: unexpected error")

    def _on_push(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "reclaim":
            self._on_reclaim(message)
        elif kind in ("reclaimed", "reclaim_timeout"):
            self._on_reclaim_outcome(message)
        else:
            log.warning("coordinator sent an unknown message %r", kind)

    def tick(self) -> None:
        """One round of the policy (the background thread calls it every ``interval``)."""
        ledger = self.ledger()
        gpus = {g["gpu"]: g for g in ledger["gpus"]}
        # One reclaim at a time per GPU; one that timed out no longer holds the next back.
        pending_reclaims = {r["gpu"] for r in ledger["reclaims"]
                            if r["lender"] == self.client_id and not r["timed_out"]}
        for key in self.owned:
            entry = gpus.get(key)
            if entry is None or key in pending_reclaims or not hasattr(self.local, "mem_info"):
                continue
            free, total = self.local.mem_info(self._ordinals[key])
            action = plan_offer(self.policy, free, total, entry["borrowed"], entry["offer"])
            if action is None:
                continue
            if action[0] == "offer":
                self.offer(key, action[1])
            else:
                self.reclaim(key, action[1], wait=False)
        with self._lock:
            owing = [key for key, b in self._borrowed.items() if b.asked]
        for key in owing:  # asks whose pieces were still moving: confirm what has left since
            self._settle(key, 0.0)
        stats = self.local.stats()
        tiers = stats.get("tiers", {})
        host_bytes = int(tiers.get("host", {}).get("current", 0))
        with self._lock:
            budgets = {key: b.budget for key, b in self._borrowed.items()}
        room = 0  # borrowed bytes nothing is placed in yet
        for key, budget in budgets.items():
            placed = int(tiers.get(self._tier(key), {}).get("lent", 0))
            nbytes = plan_release(self.policy, host_bytes, budget, placed)
            if nbytes:
                self.release(key, nbytes, timeout=0.0)
            room += max(0, budget - nbytes - placed)
        with self._lock:
            kept = sum(b.held - b.asked for b in self._borrowed.values())
        available = {k: g["available"] for k, g in gpus.items()
                     if k not in self.owned and k in self._ordinals and g["owner"] is not None and g["available"]}
        action = plan_borrow(self.policy, host_bytes, kept, available, room)
        if action is not None:
            self.borrow(*action)

    def _on_lost(self) -> None:
        """The coordinator is gone: nobody keeps the books, so give every borrowed GPU
        back (its owner will expect the memory), and stop."""
        with self._lock:
            for key, b in list(self._borrowed.items()):
                try:
                    self.local.reclaim(self._ordinals[key], b.budget, timeout=self.reclaim_timeout)
                except Exception:
                    log.exception("could not move contexts off %s", key)
                self._event(events.EventKind.LEND_RELEASE, key, b.held, reason="coordinator_lost")
                self._borrowed.pop(key)
        with self._outcomes:
            self._outcomes.notify_all()

    # --- closing ----------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Give back everything borrowed (moving the pieces away first), then leave.
        The coordinator asks this process's borrowers to move off its GPUs."""
        if self._closed:
            return
        for key in list(self._borrowed):
            try:
                self.release(key, None, timeout=timeout)
            except CoordinatorError as e:
                log.warning("closing: could not release %s: %s", key, e)
        self._closed = True
        self._inbox.put(_STOP)
        if threading.current_thread() is not self._worker:
            self._worker.join()
        with self._lock:  # what could not be released leaves with the connection: make it so here too
            for key, b in list(self._borrowed.items()):
                if b.budget:
                    self.local.reclaim(self._ordinals[key], b.budget, timeout=self._timeout(timeout))
            self._borrowed.clear()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=5.0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# For enable(): settings -> a running client.


def _size_or_none(value: Any, setting: str, allow_percent: bool = True) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "auto")):
        return None
    return parse_size(value, setting, allow_percent=allow_percent)


def join(socket_path: str | None = None, *, gpus: Sequence[int] | str | None = None, offer: Any = None,
         margin: Any = Percent(10), max_borrow: Any = None, interval: Any = 1.0, local: Any = None,
         keys: Mapping[int, str] | None = None, name: str = "", start: bool = True) -> Client:
    """Join the coordinator with settings as ``enable()`` gets them (strings or values);
    a bad value raises ConfigError naming the setting.

    socket_path: ``AQUA_COORDINATOR`` (None, "" or "1": the default socket);
    gpus: ``AQUA_COORDINATOR_GPUS``, ordinals this process owns ("0,1"; default: device 0
    on the simulated backend, the current CUDA device otherwise);
    offer: ``AQUA_COORDINATOR_OFFER`` (bytes or % per owned GPU; default elastic);
    margin: ``AQUA_LEND_MARGIN`` (free memory an owner keeps, elastic offers);
    max_borrow: ``AQUA_COORDINATOR_BORROW`` (most bytes borrowed; 0: never; default no cap);
    interval: ``AQUA_COORDINATOR_INTERVAL`` (seconds between re-reads)."""
    if socket_path is None or str(socket_path).strip() in ("", "1", "on", "true", "yes"):
        path = proto.default_socket_path()
    elif isinstance(socket_path, (str, os.PathLike)):
        path = os.fspath(socket_path)
    else:
        raise ConfigError(f"AQUA_COORDINATOR={socket_path!r}: expected a socket path or 1")
    local = local if local is not None else AquaLocal()
    if keys is None:
        keys = local.gpu_keys()
    if gpus is None:
        gpus = [_current_device(keys)]
    elif isinstance(gpus, str):
        try:
            gpus = [int(p) for p in gpus.split(",") if p.strip()]
        except ValueError:
            raise ConfigError(f"AQUA_COORDINATOR_GPUS={gpus!r}: expected device ordinals such as 0 or 0,1") from None
    for d in gpus:
        if isinstance(d, bool) or not isinstance(d, int) or d not in keys:
            raise ConfigError(f"AQUA_COORDINATOR_GPUS: device {d!r} is not one of this process's devices "
                              f"({', '.join(map(str, sorted(keys)))})")
    try:
        interval_s = float(interval)
    except (TypeError, ValueError):
        raise ConfigError(f"AQUA_COORDINATOR_INTERVAL={interval!r}: not a number of seconds") from None
    if not 0 < interval_s < math.inf:
        raise ConfigError(f"AQUA_COORDINATOR_INTERVAL={interval!r}: must be > 0 seconds")
    policy = LendingPolicy(offer=_size_or_none(offer, "AQUA_COORDINATOR_OFFER"),
                    margin=parse_size(margin, "AQUA_LEND_MARGIN"),
                    max_borrow=_size_or_none(max_borrow, "AQUA_COORDINATOR_BORROW", allow_percent=False),
                    interval=interval_s)
    return Client(path, list(gpus), policy, local, keys=keys, name=name, start=start)


def _current_device(keys: Mapping[int, str]) -> int:
    if all(k.startswith("sim:") for k in keys.values()):
        return min(keys)
    import torch  # noqa: PLC0415 - CUDA only

    return torch.cuda.current_device()
