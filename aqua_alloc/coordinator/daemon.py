"""The coordinator: one small daemon per server that keeps the ledger of GPU lending
between processes (``python -m aqua_alloc coordinator``).

Each aqua_alloc process (a model server, say one per GPU) joins it over a Unix socket and
says which GPUs it owns. An owner *offers* bytes of its GPU; other processes *borrow*
from the offer and place their parked contexts there (through their own allocator's lend
budget for that GPU); an owner that needs its memory back *reclaims* it: the coordinator
takes it from the part nobody borrowed first, then asks borrowers to give back the rest,
and tells the owner once every borrower confirmed that its ranges moved away. The
coordinator moves no memory itself: it only keeps the books, so that no two processes
count on the same bytes.

Two parts:

- :class:`Ledger`: the bookkeeping, with no sockets. Each method checks a request, changes
  the books and returns the reply plus the messages to push to other clients. Refusals
  raise ProtocolError, and change nothing.
- :class:`Server`: a single-threaded ``selectors`` loop over the listening socket and its
  connections: framing, the same-user check (socket mode 0600 plus SO_PEERCRED), dispatch
  to the ledger, reclaim deadlines. A bad message gets an error reply; one that breaks the
  framing also closes its connection; nothing a client sends stops the daemon.

The protocol is in docs/coordinator-protocol.md (and :mod:`aqua_alloc.coordinator.protocol`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import selectors
import signal
import socket
import stat
import sys
import time
from typing import Any, Sequence

from aqua_alloc.coordinator import protocol as proto
from aqua_alloc.coordinator.protocol import ProtocolError

__all__ = ["Ledger", "Server", "CoordinatorError", "bind_socket", "main"]

log = logging.getLogger("aqua_alloc.coordinator.daemon")

DEFAULT_RECLAIM_TIMEOUT = 5.0   # s a borrower has to confirm a reclaim before the lender is told
MAX_CLIENTS = 256               # connections at once; more are refused ("busy")
MAX_OUTBOX = 4 << 20            # bytes queued for a client that does not read; past it, dropped

Push = tuple[int, dict[str, Any]]   # (client id, message)


class CoordinatorError(RuntimeError):
    """The coordinator cannot start (bad socket path, another one already serving)."""


# --------------------------------------------------------------------------------------
# The ledger.


@dataclasses.dataclass
class Member:
    """A joined process."""

    client: int                 # the coordinator's id for the connection
    pid: int
    uid: int
    name: str
    gpus: tuple[str, ...]       # GPU keys it owns
    joined_s: float             # time.monotonic() at hello


@dataclasses.dataclass
class GpuEntry:
    """One GPU's books. Invariant: the bytes borrowers keep (held less asked back) sum to
    at most ``offer``; a borrower is never asked for more than it holds."""

    key: str
    owner: int | None           # client id of the owner; None once it left
    offer: int = 0              # bytes the owner lets others keep
    held: dict[int, int] = dataclasses.field(default_factory=dict)  # borrower -> bytes it holds


@dataclasses.dataclass
class Reclaim:
    """Bytes an owner asked back that borrowers have not all returned yet."""

    id: int
    gpu: str
    lender: int | None          # client to tell when done; None: the owner left
    nbytes: int                 # bytes asked back in all
    immediate: int              # of which came at once from the part nobody borrowed
    asks: dict[int, int]        # borrower -> bytes it still has to give back
    started_s: float            # time.monotonic()
    deadline_s: float
    reason: str                 # "reclaim" (asked by the owner) or "owner_left"
    timed_out: bool = False

    @property
    def pending(self) -> int:
        return sum(self.asks.values())

    @property
    def returned(self) -> int:
        """Bytes borrowers gave back so far (what was asked of them, less what they still owe)."""
        return self.nbytes - self.immediate - self.pending


class Ledger:
    """Who offers, who borrows, what is being given back. Not thread-safe: the server
    calls it from its one thread. Sizes are bytes, times monotonic seconds."""

    def __init__(self, reclaim_timeout: float = DEFAULT_RECLAIM_TIMEOUT) -> None:
        if not reclaim_timeout > 0:
            raise ValueError(f"reclaim_timeout={reclaim_timeout!r}: must be > 0 seconds")
        self.reclaim_timeout = reclaim_timeout
        self.members: dict[int, Member] = {}
        self.gpus: dict[str, GpuEntry] = {}
        self.reclaims: dict[int, Reclaim] = {}
        self._next_reclaim = 1

    # --- helpers ----------------------------------------------------------------------

    def _reclaims_on(self, key: str) -> list[Reclaim]:
        """The reclaims of GPU ``key``, oldest first (``reclaims`` keeps them in id order)."""
        return [r for r in self.reclaims.values() if r.gpu == key]

    def _asked(self, client: int, key: str) -> int:
        return sum(r.asks.get(client, 0) for r in self._reclaims_on(key))

    def _kept(self, entry: GpuEntry) -> int:
        """Bytes borrowers of ``entry`` keep: what they hold less what they were asked back."""
        return sum(entry.held.values()) - sum(r.pending for r in self._reclaims_on(entry.key))

    def _available(self, entry: GpuEntry) -> int:
        return max(0, entry.offer - self._kept(entry)) if entry.owner is not None else 0

    def _owned(self, client: int, key: str) -> GpuEntry:
        entry = self.gpus.get(key)
        if entry is None or entry.owner != client:
            owner = "nobody" if entry is None or entry.owner is None else f"pid {self.members[entry.owner].pid}"
            raise ProtocolError("not_owner", f"gpu {key!r} is owned by {owner}, not by this process "
                                             "(a process owns the GPUs listed in its hello)")
        return entry

    def _label(self, client: int | None) -> str:
        member = self.members.get(client) if client is not None else None
        return f"pid {member.pid} (client {client})" if member else f"client {client}"

    def _drop_if_unused(self, key: str) -> None:
        entry = self.gpus.get(key)
        if entry is not None and entry.owner is None and not entry.held:
            del self.gpus[key]

    def _credit(self, client: int, key: str, nbytes: int, now: float) -> list[Push]:
        """``client`` gave back ``nbytes`` of ``key`` it was asked for: settle the oldest
        reclaims first; tell each lender whose reclaim is now complete."""
        pushes: list[Push] = []
        for reclaim in self._reclaims_on(key):
            if nbytes == 0:
                break
            take = min(nbytes, reclaim.asks.get(client, 0))
            if take == 0:
                continue
            nbytes -= take
            reclaim.asks[client] -= take
            if reclaim.asks[client] == 0:
                del reclaim.asks[client]
            if not reclaim.asks:
                pushes += self._complete(reclaim, now)
        return pushes

    def _complete(self, reclaim: Reclaim, now: float) -> list[Push]:
        del self.reclaims[reclaim.id]
        seconds = now - reclaim.started_s
        if reclaim.timed_out:
            log.warning("reclaim %d of %d bytes on %s completed late, after %.3f s",
                        reclaim.id, reclaim.nbytes, reclaim.gpu, seconds)
        else:
            log.info("reclaim %d of %d bytes on %s completed in %.3f s", reclaim.id, reclaim.nbytes,
                     reclaim.gpu, seconds)
        if reclaim.lender is None or reclaim.lender not in self.members:
            return []
        return [(reclaim.lender, proto.push("reclaimed", reclaim=reclaim.id, gpu=reclaim.gpu, bytes=reclaim.nbytes,
                                            late=reclaim.timed_out, seconds=round(seconds, 6)))]

    def _ask(self, key: str, lender: int | None, nbytes: int, immediate: int, need: int, reason: str,
             now: float, only: dict[int, int] | None = None) -> tuple[Reclaim, list[Push]]:
        """Record a reclaim and ask borrowers for ``need`` bytes: those keeping the most
        first (fewest messages), ties by client id. ``only``: ask exactly these amounts."""
        entry = self.gpus[key]
        reclaim = Reclaim(id=self._next_reclaim, gpu=key, lender=lender, nbytes=nbytes, immediate=immediate,
                          asks={}, started_s=now, deadline_s=now + self.reclaim_timeout, reason=reason)
        self._next_reclaim += 1
        if only is None:
            keepers = sorted(((held - self._asked(c, key), c) for c, held in entry.held.items()),
                             key=lambda kc: (-kc[0], kc[1]))
            only = {}
            for keeps, client in keepers:
                take = min(need, keeps)
                if take > 0:
                    only[client] = take
                    need -= take
            assert need == 0, "the invariant guarantees borrowers keep enough"
        reclaim.asks = {c: n for c, n in only.items() if n > 0}
        self.reclaims[reclaim.id] = reclaim
        pushes = [(client, proto.push("reclaim", reclaim=reclaim.id, gpu=key, bytes=n, reason=reason,
                                      timeout_s=self.reclaim_timeout))
                  for client, n in reclaim.asks.items()]
        for client, n in reclaim.asks.items():
            log.info("reclaim %d: asking %s to give back %d bytes of %s (%s)", reclaim.id, self._label(client), n,
                     key, reason)
        return reclaim, pushes

    # --- requests ---------------------------------------------------------------------

    def join(self, client: int, pid: int, uid: int, gpus: Sequence[str], name: str = "",
             now: float | None = None) -> tuple[dict[str, Any], list[Push]]:
        now = time.monotonic() if now is None else now
        if client in self.members:
            raise ProtocolError("already_joined", "hello was already sent on this connection")
        for key in gpus:
            entry = self.gpus.get(key)
            if entry is not None and entry.owner is not None:
                raise ProtocolError("gpu_owned", f"gpu {key!r} is already owned by "
                                                 f"{self._label(entry.owner)}")
        self.members[client] = Member(client, pid, uid, name, tuple(gpus), now)
        owned = []
        for key in gpus:
            entry = self.gpus.setdefault(key, GpuEntry(key, owner=None))
            entry.owner = client
            # Bytes that borrowers of a previous owner still hold (being given back).
            owned.append({"gpu": key, "returning": sum(entry.held.values())})
        log.info("joined: %s%s owns %s", self._label(client), f" ({name})" if name else "",
                 ", ".join(gpus) or "no GPU")
        return {"client": client, "reclaim_timeout_s": self.reclaim_timeout,
                "max_message_bytes": proto.MAX_MESSAGE_BYTES, "gpus": owned}, []

    def leave(self, client: int, now: float | None = None) -> list[Push]:
        """A process left (its socket closed, or it died). What it borrowed is gone with
        it (the driver freed its memory), so its debts are settled; each GPU it owned has
        no offer any more and its borrowers are asked to move everything away."""
        now = time.monotonic() if now is None else now
        member = self.members.pop(client, None)
        if member is None:
            return []
        pushes: list[Push] = []
        for key, entry in list(self.gpus.items()):
            held = entry.held.pop(client, 0)
            if held:
                log.info("left: pid %d (client %d) held %d bytes of %s; they return to the offer", member.pid,
                         client, held, key)
            for reclaim in self._reclaims_on(key):
                owed = reclaim.asks.pop(client, 0)
                if owed and not reclaim.asks:
                    pushes += self._complete(reclaim, now)
        for reclaim in self.reclaims.values():
            if reclaim.lender == client:
                reclaim.lender = None
        for key in member.gpus:
            entry = self.gpus.get(key)
            if entry is None or entry.owner != client:
                continue
            entry.owner = None
            entry.offer = 0
            keeps = {c: held - self._asked(c, key) for c, held in entry.held.items()}
            if any(keeps.values()):
                _, asked = self._ask(key, None, sum(keeps.values()), 0, sum(keeps.values()), "owner_left", now,
                                     only=keeps)
                pushes += asked
        for key in list(self.gpus):
            self._drop_if_unused(key)
        log.info("left: pid %d (client %d)", member.pid, client)
        return pushes

    def offer(self, client: int, key: str, nbytes: int) -> tuple[dict[str, Any], list[Push]]:
        entry = self._owned(client, key)
        kept = self._kept(entry)
        if nbytes < kept:
            raise ProtocolError("below_borrowed", f"offer of {nbytes} bytes on {key!r} is below the {kept} bytes "
                                                  "borrowers keep; reclaim them first")
        if nbytes != entry.offer:
            log.info("offer: %s offers %d bytes of %s (was %d)", self._label(client), nbytes, key, entry.offer)
        entry.offer = nbytes
        return {"gpu": key, "offer": nbytes, "borrowed": sum(entry.held.values()),
                "available": self._available(entry)}, []

    def borrow(self, client: int, key: str, nbytes: int) -> tuple[dict[str, Any], list[Push]]:
        entry = self.gpus.get(key)
        if entry is None or entry.owner is None:
            raise ProtocolError("no_offer", f"gpu {key!r}: no process offers it")
        if entry.owner == client:
            raise ProtocolError("own_gpu", f"gpu {key!r} is this process's own GPU; borrow from others")
        granted = min(nbytes, self._available(entry))
        if granted:
            entry.held[client] = entry.held.get(client, 0) + granted
            log.info("borrow: %s borrows %d of %d bytes asked on %s", self._label(client), granted, nbytes, key)
        return {"gpu": key, "granted": granted, "held": entry.held.get(client, 0)}, []

    def release(self, client: int, key: str, nbytes: int) -> tuple[dict[str, Any], list[Push]]:
        entry = self.gpus.get(key)
        held = entry.held.get(client, 0) if entry else 0
        asked = self._asked(client, key)
        if nbytes > held - asked:
            raise ProtocolError("over_release", f"release of {nbytes} bytes on {key!r}: this process holds {held} "
                                                f"bytes there, {asked} of them asked back (confirm those with "
                                                "reclaim_done)")
        if nbytes and entry is not None:
            entry.held[client] = held - nbytes
            if entry.held[client] == 0:
                del entry.held[client]
            log.info("release: %s gives back %d bytes of %s", self._label(client), nbytes, key)
            self._drop_if_unused(key)
        return {"gpu": key, "held": held - nbytes}, []

    def reclaim(self, client: int, key: str, nbytes: int, now: float | None = None) -> tuple[dict[str, Any], list[Push]]:
        now = time.monotonic() if now is None else now
        entry = self._owned(client, key)
        if nbytes > entry.offer:
            raise ProtocolError("over_reclaim", f"reclaim of {nbytes} bytes on {key!r}: only {entry.offer} "
                                                "are offered")
        immediate = min(nbytes, self._available(entry))
        need = nbytes - immediate
        entry.offer -= nbytes
        reclaim, pushes = self._ask(key, client, nbytes, immediate, need, "reclaim", now)
        log.info("reclaim %d: %s takes back %d bytes of %s: %d at once, %d from borrowers", reclaim.id,
                 self._label(client), nbytes, key, immediate, need)
        reply = {"reclaim": reclaim.id, "gpu": key, "bytes": nbytes, "immediate": immediate, "pending": need}
        if need == 0:
            pushes += self._complete(reclaim, now)
        return reply, pushes

    def reclaim_done(self, client: int, key: str, nbytes: int,
                     now: float | None = None) -> tuple[dict[str, Any], list[Push]]:
        now = time.monotonic() if now is None else now
        asked = self._asked(client, key)
        if nbytes > asked:
            raise ProtocolError("over_confirm", f"reclaim_done of {nbytes} bytes on {key!r}: only {asked} are asked "
                                                "back of this process (give back the rest with release)")
        entry = self.gpus[key] if nbytes else self.gpus.get(key)
        held = entry.held.get(client, 0) if entry else 0
        if nbytes:
            entry.held[client] = held - nbytes
            if entry.held[client] == 0:
                del entry.held[client]
            log.info("reclaim_done: %s gave back %d bytes of %s", self._label(client), nbytes, key)
        pushes = self._credit(client, key, nbytes, now)
        self._drop_if_unused(key)
        return {"gpu": key, "held": held - nbytes, "asked": asked - nbytes}, pushes

    # --- time -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return min((r.deadline_s for r in self.reclaims.values() if not r.timed_out), default=None)

    def expire(self, now: float | None = None) -> list[Push]:
        """Reclaims past their deadline: tell the lender (never assume them done). The
        asks stay: a late confirmation still completes the reclaim ("late": true)."""
        now = time.monotonic() if now is None else now
        pushes: list[Push] = []
        for reclaim in self.reclaims.values():
            if reclaim.timed_out or now < reclaim.deadline_s:
                continue
            reclaim.timed_out = True
            missing = [{"client": c, "pid": self.members[c].pid if c in self.members else None, "bytes": n}
                       for c, n in sorted(reclaim.asks.items())]
            log.warning("reclaim %d of %d bytes on %s timed out after %.1f s: %d bytes not confirmed by %s",
                        reclaim.id, reclaim.nbytes, reclaim.gpu, self.reclaim_timeout, reclaim.pending,
                        ", ".join(self._label(c) for c in reclaim.asks))
            if reclaim.lender is not None and reclaim.lender in self.members:
                pushes.append((reclaim.lender, proto.push(
                    "reclaim_timeout", reclaim=reclaim.id, gpu=reclaim.gpu, bytes=reclaim.nbytes,
                    bytes_back=reclaim.nbytes - reclaim.pending, bytes_missing=reclaim.pending,
                    borrowers=missing)))
        return pushes

    # --- reading ----------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The whole ledger as plain data (the ``ledger`` reply; checked by
        :func:`aqua_alloc.coordinator.protocol.check_ledger`)."""
        now = time.monotonic() if now is None else now
        gpus = []
        for key in sorted(self.gpus):
            entry = self.gpus[key]
            owner = self.members.get(entry.owner) if entry.owner is not None else None
            gpus.append({
                "gpu": key, "owner": entry.owner, "owner_pid": owner.pid if owner else None,
                "offer": entry.offer, "borrowed": sum(entry.held.values()), "available": self._available(entry),
                "borrows": [{"client": c, "pid": self.members[c].pid if c in self.members else None, "held": h,
                             "asked": self._asked(c, key)} for c, h in sorted(entry.held.items())],
            })
        return {
            "clients": [{"client": m.client, "pid": m.pid, "name": m.name, "gpus": list(m.gpus),
                         "age_s": round(now - m.joined_s, 3)} for m in sorted(self.members.values(),
                                                                              key=lambda m: m.client)],
            "gpus": gpus,
            "reclaims": [{"reclaim": r.id, "gpu": r.gpu, "lender": r.lender, "reason": r.reason, "bytes": r.nbytes,
                          "immediate": r.immediate, "returned": r.returned, "pending": r.pending,
                          "asks": [{"client": c, "bytes": n} for c, n in sorted(r.asks.items())],
                          "age_s": round(now - r.started_s, 3), "timed_out": r.timed_out}
                         for r in sorted(self.reclaims.values(), key=lambda r: r.id)],
            "reclaim_timeout_s": self.reclaim_timeout,
        }


# --------------------------------------------------------------------------------------
# The server.


@dataclasses.dataclass
class _Connection:
    sock: socket.socket
    client: int
    creds: proto.PeerCredentials
    decoder: proto.FrameDecoder = dataclasses.field(default_factory=proto.FrameDecoder)
    outbox: bytearray = dataclasses.field(default_factory=bytearray)
    joined: bool = False
    closing: bool = False       # close once the outbox is sent (after a fatal error)


def _prepare_directory(path: str, strict: bool) -> None:
    """Check the socket's directory. ``strict`` (the default, shared location): create it
    (mode 0700) if missing; it must be a real directory of ours that no one else may enter.
    Otherwise (a path the user named) it must exist: nothing is created that was not asked for."""
    directory = os.path.dirname(path) or "."
    if not strict:
        if not os.path.isdir(directory):
            why = "is not a directory" if os.path.lexists(directory) else "does not exist"
            raise CoordinatorError(f"cannot serve {path}: directory {directory} {why}; create it or give a socket "
                                   f"path in an existing directory (the default, {proto.default_socket_path()}, "
                                   "needs none)")
        return
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise CoordinatorError(f"cannot create the socket's directory {directory}: {e.strerror or e}") from None
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CoordinatorError(f"{directory} must be a directory of uid {os.getuid()} with mode 0700 (found uid "
                               f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}, "
                               f"{'a directory' if stat.S_ISDIR(st.st_mode) else 'not a directory'}); "
                               "remove it or pass --socket")


def bind_socket(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600. A stale socket (nothing answers)
    is replaced; a live one is an error: one coordinator per path."""
    if len(os.fsencode(path)) >= 108:  # sun_path holds 108 bytes with the final NUL
        raise CoordinatorError(f"socket path {path!r} is too long for a Unix socket (at most 107 bytes)")
    _prepare_directory(path, strict=path == proto.default_socket_path())
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise CoordinatorError(f"{path} exists and is not a socket; remove it or pass another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left by a coordinator that died
        except OSError as e:
            raise CoordinatorError(f"cannot tell whether a coordinator serves {path}: {e.strerror or e}") from None
        else:
            raise CoordinatorError(f"a coordinator is already serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise CoordinatorError(f"cannot bind {path}: {e.strerror or e}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class Server:
    """Serves a :class:`Ledger` on a Unix socket, on the calling thread."""

    def __init__(self, path: str, reclaim_timeout: float = DEFAULT_RECLAIM_TIMEOUT,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.path = path
        self.ledger = Ledger(reclaim_timeout)
        self.max_clients = max_clients
        self._uid = os.geteuid()
        self._listener = bind_socket(path)
        self._inode = os.stat(path).st_ino
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        # Signals write a byte here (signal.set_wakeup_fd), so that stop() ends the wait at once.
        self._wakeup_r, self.wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, "wakeup")
        self._connections: dict[int, _Connection] = {}
        self._next_client = 1
        self._stopped = False

    # --- loop -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        log.info("serving %s (pid %d, reclaim timeout %.1f s)", self.path, os.getpid(), self.ledger.reclaim_timeout)
        try:
            while not self._stopped:
                self.serve_once()
        finally:
            self.close()

    def serve_once(self, max_wait: float = 1.0) -> None:
        """Wait for sockets (at most ``max_wait`` s, or the next reclaim deadline) and serve them."""
        deadline = self.ledger.next_deadline()
        wait = max_wait if deadline is None else max(0.0, min(max_wait, deadline - time.monotonic()))
        for key, events in self._selector.select(wait):
            if key.data is None:
                self._accept()
                continue
            if key.data == "wakeup":
                self._wake()
                continue
            conn: _Connection = key.data
            if events & selectors.EVENT_READ and conn.client in self._connections:
                self._read(conn)
            if events & selectors.EVENT_WRITE and conn.client in self._connections:
                self._flush(conn)
        self._deliver(self.ledger.expire())

    def stop(self) -> None:
        self._stopped = True

    def close(self) -> None:
        for conn in list(self._connections.values()):
            self._drop(conn, "the coordinator is stopping", leave=False)
        try:
            self._selector.unregister(self._listener)
        except (KeyError, ValueError):
            pass
        self._listener.close()
        self._selector.close()
        self._wakeup_r.close()
        self.wakeup_w.close()
        try:  # only our own socket: a successor may have replaced it
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    # --- connections ------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE and the like: keep serving the others
            log.error("accept failed: %s", e)
            return
        sock.setblocking(False)
        creds = proto.peer_credentials(sock)
        conn = _Connection(sock, self._next_client, creds)
        self._next_client += 1
        self._connections[conn.client] = conn
        self._selector.register(sock, selectors.EVENT_READ, conn)
        try:
            proto.check_peer_uid(creds.uid, self._uid)
            if len(self._connections) > self.max_clients:
                raise ProtocolError("busy", f"the coordinator serves {self.max_clients} connections already")
        except ProtocolError as e:
            log.warning("refused pid %d uid %d: %s", creds.pid, creds.uid, e)
            self._fail(conn, None, e, fatal=True)

    def _wake(self) -> None:
        try:
            while self._wakeup_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _read(self, conn: _Connection) -> None:
        if conn.closing:
            return  # a fatal error is being sent: read nothing more
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(conn, f"receive failed: {e}")
            return
        if not data:
            self._drop(conn, "closed the connection")
            return
        try:
            for message in conn.decoder.feed(data):
                self._handle(conn, message)
                if conn.closing or conn.client not in self._connections:
                    return
        except ProtocolError as e:  # framing: the stream cannot be trusted any more
            log.warning("client %d (pid %d): %s; closing the connection", conn.client, conn.creds.pid, e)
            self._fail(conn, None, e, fatal=True)

    def _handle(self, conn: _Connection, message: Any) -> None:
        try:
            request = proto.validate_request(message)
            reply, pushes = self._dispatch(conn, request)
        except ProtocolError as e:
            log.info("client %d (pid %d): refused: %s: %s", conn.client, conn.creds.pid, e.code, e)
            self._fail(conn, proto.request_id_of(message), e, fatal=False)
            return
        except Exception as e:  # a bug here must not take every other process's books down
            log.exception("client %d (pid %d): internal error", conn.client, conn.creds.pid)
            self._fail(conn, proto.request_id_of(message),
                       ProtocolError("internal", f"internal error: {type(e).__name__}: {e}"), fatal=False)
            return
        self._send(conn, proto.ok(request.id, **reply))
        self._deliver(pushes)

    def _dispatch(self, conn: _Connection, request: proto.Request) -> tuple[dict[str, Any], list[Push]]:
        f = request.fields
        if request.type == "ledger":
            return {"ledger": self.ledger.snapshot()}, []
        if request.type == "hello":
            if f["pid"] != conn.creds.pid:  # another pid namespace: the kernel's pid is the one we can check
                log.info("client %d: hello.pid=%d, kernel pid %d (another pid namespace?); using the kernel's",
                         conn.client, f["pid"], conn.creds.pid)
            reply = self.ledger.join(conn.client, conn.creds.pid, conn.creds.uid, f["gpus"], f.get("name", ""))
            conn.joined = True
            return reply
        if not conn.joined:
            raise ProtocolError("not_joined", f"{request.type}: send hello first")
        method = {"offer": self.ledger.offer, "borrow": self.ledger.borrow, "release": self.ledger.release,
                  "reclaim": self.ledger.reclaim, "reclaim_done": self.ledger.reclaim_done}[request.type]
        return method(conn.client, f["gpu"], f["bytes"])

    def _fail(self, conn: _Connection, re_id: int | None, e: ProtocolError, fatal: bool) -> None:
        if fatal or e.fatal:
            conn.closing = True  # _flush drops the connection once the error is sent
        self._send(conn, proto.error(re_id, e.code, str(e)))

    def _send(self, conn: _Connection, message: dict[str, Any]) -> None:
        if conn.client not in self._connections:
            return
        try:
            conn.outbox += proto.encode(message)
        except ProtocolError:  # a ledger too large for one message: say so instead
            conn.outbox += proto.encode(proto.error(message.get("re"), "too_large",
                                                    "the answer does not fit in one message"))
        if len(conn.outbox) > MAX_OUTBOX:
            self._drop(conn, f"not reading its messages ({len(conn.outbox)} bytes queued)")
            return
        self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        try:
            while conn.outbox:
                sent = conn.sock.send(conn.outbox)
                del conn.outbox[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._drop(conn, f"send failed: {e.strerror or e}")
            return
        if conn.outbox:
            # A closing connection is not read any more: waiting on its reads would spin.
            events = selectors.EVENT_WRITE | (0 if conn.closing else selectors.EVENT_READ)
            self._selector.modify(conn.sock, events, conn)
        elif conn.closing:
            self._drop(conn, "closed after an error")
        else:
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _deliver(self, pushes: list[Push]) -> None:
        for client, message in pushes:
            conn = self._connections.get(client)
            if conn is not None:
                self._send(conn, message)

    def _drop(self, conn: _Connection, why: str, leave: bool = True) -> None:
        if self._connections.pop(conn.client, None) is None:
            return
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        log.debug("client %d (pid %d): %s", conn.client, conn.creds.pid, why)
        if leave and conn.joined:
            self._deliver(self.ledger.leave(conn.client))


# --------------------------------------------------------------------------------------
# Command line (``python -m aqua_alloc coordinator``).


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH", default=None,
                        help=f"Unix socket to serve (default: ${proto.ENV_SOCKET}, else {proto.default_socket_path()})")
    parser.add_argument("--reclaim-timeout", metavar="SECONDS", type=float, default=DEFAULT_RECLAIM_TIMEOUT,
                        help="seconds a borrower has to confirm a reclaim before the lender is told it timed out "
                             f"(default {DEFAULT_RECLAIM_TIMEOUT:g})")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="what to log on stderr (default info)")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT. Raises CoordinatorError when it cannot start."""
    if not args.reclaim_timeout > 0 or args.reclaim_timeout != args.reclaim_timeout:
        raise CoordinatorError(f"--reclaim-timeout={args.reclaim_timeout}: must be > 0 seconds")
    path = os.path.abspath(args.socket or proto.socket_path_from_env())
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s aqua_alloc coordinator[%(process)d] %(levelname)s: %(message)s")
    server = Server(path, reclaim_timeout=args.reclaim_timeout)

    def stop(signum: int, frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.set_wakeup_fd(server.wakeup_w.fileno(), warn_on_full_buffer=False)
    try:
        server.serve_forever()
    finally:
        signal.set_wakeup_fd(-1)
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aqua-alloc coordinator", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except CoordinatorError as e:
        print(f"aqua-alloc coordinator: error: {e}", file=sys.stderr)
        return 1
