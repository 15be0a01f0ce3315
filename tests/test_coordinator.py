"""Lending between processes: the coordinator daemon, its protocol, and its clients.

The daemon always runs as ``python -m aqua_alloc coordinator --socket PATH`` in a
subprocess; aqua_alloc processes are subprocesses too (tests/coordinator_peer.py, a
Client over a fake local allocator, driven one JSON command at a time), so that a
process can be killed mid-borrow. The ledger is checked after every step: borrowers keep
at most the offer of each GPU, nobody holds a negative amount, nobody is asked more than
it holds (:func:`aqua_alloc.coordinator.protocol.check_ledger`).

Sizes are bytes; the reclaim timeout is short (0.5 s) to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aqua_alloc.coordinator import client as cc
from aqua_alloc.coordinator import protocol as proto
from aqua_alloc.memory.config import Percent
from aqua_alloc.coordinator.daemon import Ledger
from aqua_alloc.coordinator.protocol import ProtocolError
from aqua_alloc.obs.events import EventKind, drain_python_events
from coordinator_daemon import REPO, TIMEOUT, Daemon, clean_env, wait_for
from coordinator_peer import FakeLocal

PEER = REPO / "tests" / "coordinator_peer.py"
MiB = 1 << 20


class Peer:
    """One aqua_alloc process (tests/coordinator_peer.py)."""

    def __init__(self, path: str, gpus: str = "", *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(PEER), "--socket", path, "--gpus", gpus, *extra],
                                     env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        ready = self._line(10.0)
        assert ready.get("ready"), ready
        self.client = ready["client"]
        self.pid = self.proc.pid

    def _line(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"peer {self.proc.pid} did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"peer {self.proc.pid} exited: {self.proc.stderr.read()}")
        return json.loads(line)

    def call(self, op: str, **args):
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        answer = self._line(10.0)
        if not answer["ok"]:
            raise PeerError(answer["error"], answer.get("code"))
        return answer["result"]

    def events_until(self, kind: str) -> list:
        """This process's lend events, drained until one of ``kind`` has been recorded
        (pushes are handled on the client's own thread)."""
        seen: list = []
        wait_for(lambda: (seen.extend(self.call("events")), any(e[0] == kind for e in seen))[1],
                 what=f"a {kind} event in pid {self.pid}")
        return seen

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


class PeerError(Exception):
    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.code = code


@pytest.fixture
def peers(daemon):
    started: list[Peer] = []

    def start(gpus: str = "", *extra: str) -> Peer:
        peer = Peer(daemon.path, gpus, *extra)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


def gpu(ledger: dict, key: str) -> dict | None:
    return next((g for g in ledger["gpus"] if g["gpu"] == key), None)


def holdings(ledger: dict, key: str) -> dict[int, tuple[int, int]]:
    """client -> (held, asked) on GPU ``key``."""
    entry = gpu(ledger, key)
    return {} if entry is None else {b["client"]: (b["held"], b["asked"]) for b in entry["borrows"]}


# --------------------------------------------------------------------------------------
# The protocol, with no daemon.


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_framing_round_trip_and_limits():
    message = {"v": 1, "type": "offer", "id": 3, "gpu": "sim:0", "bytes": 5 * MiB}
    data = proto.encode(message)
    decoder = proto.FrameDecoder()
    # Byte by byte: a message is only complete with its last byte.
    seen = [m for b in data for m in decoder.feed(bytes([b]))]
    assert seen == [message] and decoder.num_buffered == 0
    assert list(decoder.feed(data + data)) == [message, message]
    with pytest.raises(ProtocolError, match="over the limit of 65536 bytes") as e:
        proto.encode({"v": 1, "type": "hello", "pad": "x" * proto.MAX_MESSAGE_BYTES})
    assert e.value.code == "too_large"
    for raw, code in [(struct.pack(">I", proto.MAX_MESSAGE_BYTES + 1), "too_large"),
                      (struct.pack(">I", 0), "framing"),
                      (frame(b"{not json"), "bad_json"),
                      (frame(b"\xff\xfe"), "bad_json"),
                      (frame(b'{"v": NaN}'), "bad_json")]:
        with pytest.raises(proto.FramingError) as e:
            list(proto.FrameDecoder().feed(raw))
        assert e.value.code == code and e.value.fatal


@pytest.mark.parametrize("message, code, text", [
    ([1, 2], "bad_message", "expected a JSON object, got list"),
    ({"type": "ledger", "id": 1}, "bad_message", "missing field 'v'"),
    ({"v": 2, "type": "ledger", "id": 1}, "bad_version", "v=2: this coordinator speaks version 1"),
    ({"v": True, "type": "ledger", "id": 1}, "bad_version", "v=True"),
    ({"v": 1, "type": "steal", "id": 1}, "unknown_type", "type='steal': not a request"),
    ({"v": 1, "type": "ledger", "id": -1}, "bad_message", "id=-1"),
    ({"v": 1, "type": "offer", "id": 1, "gpu": "sim:0"}, "bad_field", "offer: missing field 'bytes'"),
    ({"v": 1, "type": "offer", "id": 1, "gpu": "sim:0", "bytes": -5}, "bad_field", "offer.bytes=-5"),
    ({"v": 1, "type": "offer", "id": 1, "gpu": "sim:0", "bytes": 1.5}, "bad_field", "offer.bytes=1.5"),
    ({"v": 1, "type": "offer", "id": 1, "gpu": "sim:0", "bytes": True}, "bad_field", "offer.bytes=True"),
    ({"v": 1, "type": "offer", "id": 1, "gpu": "sim:0", "bytes": 1 << 63}, "bad_field", "bytes must be in"),
    ({"v": 1, "type": "borrow", "id": 1, "gpu": "../etc", "bytes": 1}, "bad_field", "borrow.gpu='../etc'"),
    ({"v": 1, "type": "borrow", "id": 1, "gpu": "sim:0", "bytes": 1, "force": 1}, "bad_field",
     "unknown field 'force'"),
    ({"v": 1, "type": "hello", "id": 1, "pid": 1, "gpus": ["sim:0", "sim:0"]}, "bad_field", "listed twice"),
    ({"v": 1, "type": "hello", "id": 1, "pid": 0, "gpus": []}, "bad_field", "hello.pid=0"),
])
def test_requests_are_validated_with_named_fields(message, code, text):
    with pytest.raises(ProtocolError) as e:
        proto.validate_request(message)
    assert e.value.code == code and text in str(e.value)


def test_peer_uid_check():
    proto.check_peer_uid(1000, 1000)
    with pytest.raises(ProtocolError, match="uid 1001 is not the coordinator's user") as e:
        proto.check_peer_uid(1001, 1000)
    assert e.value.code == "forbidden" and e.value.fatal is False


def test_default_socket_path(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert proto.default_socket_path() == str(tmp_path / "aqua_alloc" / "coordinator.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert proto.default_socket_path() == f"/tmp/aqua_alloc-{os.getuid()}/coordinator.sock"
    monkeypatch.setenv("AQUA_COORDINATOR", "/run/x.sock")
    assert proto.socket_path_from_env() == "/run/x.sock"
    monkeypatch.setenv("AQUA_COORDINATOR", "1")
    assert proto.socket_path_from_env() == proto.default_socket_path()


# --------------------------------------------------------------------------------------
# The ledger's rules, in-process, exact numbers.


def consistent(ledger: Ledger) -> dict:
    snapshot = ledger.snapshot()
    assert proto.check_ledger(snapshot) == [], snapshot
    return snapshot


def test_ledger_offer_borrow_release():
    led = Ledger(reclaim_timeout=1.0)
    led.join(1, 101, 0, ["sim:0"])
    led.join(2, 102, 0, ["sim:1"])
    led.join(3, 103, 0, [])
    with pytest.raises(ProtocolError, match="gpu 'sim:0' is already owned by pid 101"):
        led.join(4, 104, 0, ["sim:0"])
    with pytest.raises(ProtocolError, match="no process offers it") as e:
        led.borrow(2, "sim:7", 1)
    assert e.value.code == "no_offer"
    assert led.offer(1, "sim:0", 100)[0] == {"gpu": "sim:0", "offer": 100, "borrowed": 0, "available": 100}
    with pytest.raises(ProtocolError, match="owned by pid 101, not by this process"):
        led.offer(2, "sim:0", 5)
    with pytest.raises(ProtocolError, match="this process's own GPU"):
        led.borrow(1, "sim:0", 5)
    assert led.borrow(2, "sim:0", 70)[0]["granted"] == 70
    assert led.borrow(3, "sim:0", 70)[0] == {"gpu": "sim:0", "granted": 30, "held": 30}   # never more than offered
    assert led.borrow(3, "sim:0", 1)[0]["granted"] == 0                                   # "not now" is a value
    consistent(led)
    with pytest.raises(ProtocolError, match="below the 100 bytes borrowers keep") as e:
        led.offer(1, "sim:0", 99)
    assert e.value.code == "below_borrowed"
    with pytest.raises(ProtocolError, match="holds 30 bytes there") as e:
        led.release(3, "sim:0", 31)
    assert e.value.code == "over_release"
    with pytest.raises(ProtocolError, match="holds 0 bytes"):
        led.release(1, "sim:0", 1)
    assert led.release(3, "sim:0", 30)[0] == {"gpu": "sim:0", "held": 0}
    snapshot = consistent(led)
    assert holdings(snapshot, "sim:0") == {2: (70, 0)}
    assert gpu(snapshot, "sim:0")["available"] == 30


def lent(offer: int, *borrows: int) -> Ledger:
    """A ledger where client 1 (pid 101) owns sim:0 and offers ``offer`` bytes, and clients
    2, 3, ... (pids 102, 103, ...) borrow ``borrows`` bytes of it, in turn."""
    led = Ledger(reclaim_timeout=1.0)
    led.join(1, 101, 0, ["sim:0"])
    for client in range(2, 2 + len(borrows)):
        led.join(client, 100 + client, 0, [])
    led.offer(1, "sim:0", offer)
    for client, nbytes in enumerate(borrows, start=2):
        led.borrow(client, "sim:0", nbytes)
    return led


def test_ledger_reclaim_takes_unborrowed_first_then_asks_largest_borrowers():
    led = lent(100, 50, 30)
    # 20 unborrowed: a reclaim of 15 is done at once, and the lender is told.
    reply, pushes = led.reclaim(1, "sim:0", 15, now=0.0)
    assert (reply["immediate"], reply["pending"]) == (15, 0)
    assert [(c, m["type"], m["bytes"]) for c, m in pushes] == [(1, "reclaimed", 15)]
    # Offer 85, borrowers keep 80: a reclaim of 45 takes 5 at once and asks 40, largest first.
    reply, pushes = led.reclaim(1, "sim:0", 45, now=0.0)
    assert (reply["immediate"], reply["pending"]) == (5, 40)
    assert [(c, m["type"], m["bytes"]) for c, m in pushes] == [(2, "reclaim", 40)]
    snapshot = consistent(led)
    assert gpu(snapshot, "sim:0")["offer"] == 40 and holdings(snapshot, "sim:0") == {2: (50, 40), 3: (30, 0)}
    with pytest.raises(ProtocolError, match="only 40 are offered") as e:
        led.reclaim(1, "sim:0", 41)
    assert e.value.code == "over_reclaim"
    with pytest.raises(ProtocolError, match="only 0 are asked back") as e:
        led.reclaim_done(3, "sim:0", 1)
    assert e.value.code == "over_confirm"
    with pytest.raises(ProtocolError, match="40 of them asked back"):
        led.release(2, "sim:0", 11)     # only the 10 it keeps may be released
    # Partial confirmation, then the rest: the lender hears once, when all is back.
    assert led.reclaim_done(2, "sim:0", 25, now=0.1) == ({"gpu": "sim:0", "held": 25, "asked": 15}, [])
    consistent(led)
    reply, pushes = led.reclaim_done(2, "sim:0", 15, now=0.2)
    assert [(c, m["type"], m["bytes"], m["late"]) for c, m in pushes] == [(1, "reclaimed", 45, False)]
    snapshot = consistent(led)
    assert holdings(snapshot, "sim:0") == {2: (10, 0), 3: (30, 0)} and snapshot["reclaims"] == []


def test_ledger_timeout_is_reported_never_assumed_and_late_completion_is_told():
    led = lent(64, 64)
    led.reclaim(1, "sim:0", 64, now=10.0)
    assert led.next_deadline() == 11.0
    assert led.expire(now=10.9) == []
    pushes = led.expire(now=11.0)
    assert [(c, m["type"], m["bytes_back"], m["bytes_missing"]) for c, m in pushes] == [(1, "reclaim_timeout", 0, 64)]
    assert pushes[0][1]["borrowers"] == [{"client": 2, "pid": 102, "bytes": 64}]
    assert led.expire(now=20.0) == [] and led.next_deadline() is None     # told once
    snapshot = consistent(led)
    assert snapshot["reclaims"][0]["timed_out"] and holdings(snapshot, "sim:0") == {2: (64, 64)}
    _, pushes = led.reclaim_done(2, "sim:0", 64, now=12.0)
    assert [(m["type"], m["late"]) for _, m in pushes] == [("reclaimed", True)]


def test_ledger_dead_borrower_returns_its_bytes_and_settles_its_debts():
    led = lent(100, 60, 40)
    led.reclaim(1, "sim:0", 80, now=0.0)        # asks 2 for 60, 3 for 20
    pushes = led.leave(2, now=0.1)              # its 60 are free again: part of the reclaim
    assert pushes == []
    snapshot = consistent(led)
    assert holdings(snapshot, "sim:0") == {3: (40, 20)} and snapshot["reclaims"][0]["returned"] == 60
    _, pushes = led.reclaim_done(3, "sim:0", 20, now=0.2)
    assert [(c, m["type"], m["bytes"]) for c, m in pushes] == [(1, "reclaimed", 80)]


def test_ledger_dead_lender_asks_every_borrower_to_move_away():
    led = lent(100, 60, 40)
    pushes = led.leave(1, now=0.0)
    assert sorted((c, m["type"], m["bytes"], m["reason"]) for c, m in pushes) == [
        (2, "reclaim", 60, "owner_left"), (3, "reclaim", 40, "owner_left")]
    snapshot = consistent(led)
    entry = gpu(snapshot, "sim:0")
    assert (entry["owner"], entry["offer"], entry["available"]) == (None, 0, 0)
    with pytest.raises(ProtocolError, match="no process offers it"):
        led.borrow(3, "sim:0", 1)
    # A new owner may claim the GPU while the bytes come back; it is told how many.
    reply, _ = led.join(4, 104, 0, ["sim:0"])
    assert reply["gpus"] == [{"gpu": "sim:0", "returning": 100}]
    led.reclaim_done(2, "sim:0", 60)
    led.leave(3)
    snapshot = consistent(led)
    assert holdings(snapshot, "sim:0") == {} and snapshot["reclaims"] == []
    assert gpu(snapshot, "sim:0")["owner"] == 4


# --------------------------------------------------------------------------------------
# Policy decisions, exact numbers.


def test_plan_offer():
    elastic = cc.LendingPolicy(margin=100 * MiB, offer_step=64 * MiB)
    G = 1 << 30
    # free 600 MiB + 200 MiB borrowed (counted as used by the driver) - 100 MiB margin.
    assert cc.plan_offer(elastic, 600 * MiB, G, 200 * MiB, 0) == ("offer", 700 * MiB)
    assert cc.plan_offer(elastic, 600 * MiB, G, 200 * MiB, 650 * MiB) is None        # under the step
    assert cc.plan_offer(elastic, 300 * MiB, G, 200 * MiB, 700 * MiB) == ("reclaim", 300 * MiB)
    assert cc.plan_offer(elastic, 50 * MiB, G, 0, 0) is None                        # margin not met
    pct = cc.LendingPolicy(margin=Percent(10))
    assert cc.plan_offer(pct, G, G, 0, 0) == ("offer", G - G // 10)
    fixed = cc.LendingPolicy(offer=256 * MiB)
    assert cc.plan_offer(fixed, 0, G, 0, 0) == ("offer", 256 * MiB)
    assert cc.plan_offer(fixed, 0, G, 0, 256 * MiB) is None
    assert cc.plan_offer(cc.LendingPolicy(offer=Percent(50)), 0, G, 0, G) == ("reclaim", G // 2)


def test_plan_borrow_and_release():
    p = cc.LendingPolicy(borrow_step=100, max_borrow=1000)
    assert cc.plan_borrow(p, 0, 0, {"sim:0": 500}) is None                  # nothing in host memory
    assert cc.plan_borrow(p, 150, 0, {"sim:0": 500, "sim:2": 900}) == ("sim:2", 200)
    assert cc.plan_borrow(p, 150, 0, {"sim:2": 500, "sim:0": 500}) == ("sim:0", 200)   # ties: smallest key
    assert cc.plan_borrow(p, 150, 950, {"sim:0": 500}) == ("sim:0", 50)     # within max_borrow
    assert cc.plan_borrow(p, 150, 1000, {"sim:0": 500}) is None
    assert cc.plan_borrow(p, 150, 0, {"sim:0": 30}) == ("sim:0", 30)
    assert cc.plan_borrow(cc.LendingPolicy(max_borrow=0), 150, 0, {"sim:0": 500}) is None
    # Room borrowed and still unused counts against what host memory holds: no pile of grants.
    assert cc.plan_borrow(p, 150, 200, {"sim:0": 500}, room=200) is None
    assert cc.plan_borrow(p, 150, 200, {"sim:0": 500}, room=150) is None
    assert cc.plan_borrow(p, 150, 200, {"sim:0": 500}, room=40) == ("sim:0", 200)   # 110 more: two steps
    assert cc.plan_release(p, 0, 1000, 700) == 200          # unused 300 > 2 steps: keep one step
    assert cc.plan_release(p, 0, 1000, 800) == 0
    assert cc.plan_release(p, 1, 1000, 0) == 0               # contexts in host memory could use it


def test_policy_and_join_settings_are_checked():
    with pytest.raises(cc.ConfigError, match="Policy.interval=0"):
        cc.LendingPolicy(interval=0)
    with pytest.raises(cc.ConfigError, match="Policy.max_borrow=-1"):
        cc.LendingPolicy(max_borrow=-1)
    local = FakeLocal()
    with pytest.raises(cc.ConfigError, match="AQUA_COORDINATOR_GPUS: device 9 is not one of"):
        cc.join("/nonexistent.sock", gpus=[9], local=local)
    with pytest.raises(cc.ConfigError, match="AQUA_COORDINATOR_GPUS='x'"):
        cc.join("/nonexistent.sock", gpus="x", local=local)
    with pytest.raises(cc.ConfigError, match="AQUA_COORDINATOR_OFFER='lots'"):
        cc.join("/nonexistent.sock", gpus="0", offer="lots", local=local)
    with pytest.raises(cc.ConfigError, match="AQUA_COORDINATOR_BORROW='10%'"):
        cc.join("/nonexistent.sock", gpus="0", max_borrow="10%", local=local)
    with pytest.raises(cc.ConfigError, match="AQUA_COORDINATOR_INTERVAL='-1'"):
        cc.join("/nonexistent.sock", gpus="0", interval="-1", local=local)
    with pytest.raises(cc.CoordinatorError, match="no coordinator at /nonexistent.sock"):
        cc.join("/nonexistent.sock", gpus="0", local=local)


# --------------------------------------------------------------------------------------
# The daemon: its socket.


def test_socket_is_private_and_one_daemon_per_path(short_dir):
    os.mkdir(os.path.join(short_dir, "sub"), mode=0o700)
    path = os.path.join(short_dir, "sub", "c.sock")
    d = Daemon(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        second = subprocess.run([sys.executable, "-m", "aqua_alloc", "coordinator", "--socket", path],
                                env=clean_env(), capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert second.stderr == f"aqua-alloc: error: a coordinator is already serving {path}\n"
    finally:
        d.stop()
    assert not os.path.exists(path)
    # A socket left by a daemon that died is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    Daemon(path).stop()
    # Something else at the path is not.
    Path(path).write_text("not a socket")
    proc = subprocess.run([sys.executable, "-m", "aqua_alloc", "coordinator", "--socket", path],
                          env=clean_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "exists and is not a socket" in proc.stderr


def test_a_named_socket_in_a_missing_directory_is_refused_and_nothing_is_created(short_dir):
    path = os.path.join(short_dir, "missing", "dir", "c.sock")
    runtime = os.path.join(short_dir, "run")
    os.mkdir(runtime, mode=0o700)
    for args, env in ((["--socket", path], {}), ([], {"AQUA_COORDINATOR": path})):
        proc = subprocess.run([sys.executable, "-m", "aqua_alloc", "coordinator", *args],
                              env=clean_env(XDG_RUNTIME_DIR=runtime, **env), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr == (f"aqua-alloc: error: cannot serve {path}: directory {os.path.dirname(path)} does not "
                               "exist; create it or give a socket path in an existing directory (the default, "
                               f"{runtime}/aqua_alloc/coordinator.sock, needs none)\n")
        assert sorted(os.listdir(short_dir)) == ["run"] and os.listdir(runtime) == []
    Path(short_dir, "file").write_text("")
    proc = subprocess.run([sys.executable, "-m", "aqua_alloc", "coordinator", "--socket",
                           os.path.join(short_dir, "file", "c.sock")], env=clean_env(), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1 and f"directory {short_dir}/file is not a directory" in proc.stderr


def test_the_default_socket_directory_is_made_private(short_dir):
    runtime = os.path.join(short_dir, "run")
    os.mkdir(runtime, mode=0o700)
    proc = subprocess.Popen([sys.executable, "-m", "aqua_alloc", "coordinator"], env=clean_env(XDG_RUNTIME_DIR=runtime),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(runtime, "aqua_alloc", "coordinator.sock")
    try:
        wait_for(lambda: os.path.exists(path), what="the default socket")
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_default_directory_must_be_private(short_dir):
    runtime = os.path.join(short_dir, "run")
    os.makedirs(os.path.join(runtime, "aqua_alloc"), mode=0o755)
    os.chmod(os.path.join(runtime, "aqua_alloc"), 0o755)
    proc = subprocess.run([sys.executable, "-m", "aqua_alloc", "coordinator"],
                          env=clean_env(XDG_RUNTIME_DIR=runtime), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "aqua_alloc must be a directory of uid" in proc.stderr and "mode 0755" in proc.stderr


def test_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "aqua_alloc", "coordinator", "--reclaim-timeout", "0"],
                          env=clean_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "--reclaim-timeout=0.0: must be > 0 seconds" in proc.stderr


# --------------------------------------------------------------------------------------
# The daemon: bad messages.


class Raw:
    """A bare connection that speaks the protocol by hand."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.decoder = proto.FrameDecoder()
        self.pending: list = []

    def send(self, data: bytes | dict) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else proto.encode(data))

    def recv(self) -> dict:
        return proto.recv_message(self.sock, self.decoder, self.pending, time.monotonic() + 5.0)

    def ask(self, **message) -> dict:
        self.send({"v": 1, "id": 9, **message})
        return self.recv()

    def closed(self) -> bool:
        self.sock.settimeout(5.0)
        return self.sock.recv(1) == b""


def test_malformed_messages_get_errors_and_the_daemon_keeps_serving(daemon):
    a = Raw(daemon.path)
    # Refused, connection kept: well-framed JSON that is not a valid request.
    for message, code in [({"v": 2, "type": "ledger", "id": 1}, "bad_version"),
                          ({"v": 1, "type": "steal", "id": 1}, "unknown_type"),
                          ({"v": 1, "type": "offer", "id": 1, "gpu": "sim:0", "bytes": -1}, "bad_field"),
                          ({"v": 1, "type": "offer", "id": 1, "gpu": "sim:0", "bytes": 1}, "not_joined"),
                          ([1, 2, 3], "bad_message")]:
        a.send(message)
        reply = a.recv()
        assert (reply["type"], reply["code"]) == ("error", code), reply
        assert reply["re"] == (1 if isinstance(message, dict) else None)
    assert a.ask(type="hello", pid=os.getpid(), gpus=["sim:0"])["type"] == "ok"
    assert a.ask(type="hello", pid=os.getpid(), gpus=[])["code"] == "already_joined"
    assert a.ask(type="borrow", gpu="sim:0", bytes=1)["code"] == "own_gpu"
    assert a.ask(type="offer", gpu="sim:0", bytes=64 * MiB)["available"] == 64 * MiB
    b = Raw(daemon.path)
    assert b.ask(type="hello", pid=os.getpid(), gpus=["sim:0"])["code"] == "gpu_owned"
    b_client = b.ask(type="hello", pid=os.getpid(), gpus=["sim:1"])["client"]
    assert b.ask(type="borrow", gpu="sim:0", bytes=100 * MiB)["granted"] == 64 * MiB    # not more than offered
    assert b.ask(type="release", gpu="sim:0", bytes=65 * MiB)["code"] == "over_release"
    assert b.ask(type="reclaim_done", gpu="sim:0", bytes=1)["code"] == "over_confirm"
    assert b.ask(type="reclaim", gpu="sim:0", bytes=1)["code"] == "not_owner"
    assert holdings(daemon.ledger(), "sim:0") == {b_client: (64 * MiB, 0)}

    # Refused, connection closed: the framing itself is broken. The books of b stay.
    for payload, code in [(struct.pack(">I", proto.MAX_MESSAGE_BYTES + 1), "too_large"),
                          (frame(b"\x00garbage"), "bad_json"),
                          (struct.pack(">I", 0), "framing")]:
        c = Raw(daemon.path)
        c.send(payload)
        reply = c.recv()
        assert (reply["type"], reply["code"]) == ("error", code)
        assert c.closed()
    # A body of the largest size is read (and refused for what it says, not its size).
    c = Raw(daemon.path)
    body = json.dumps({"v": 1, "type": "ledger", "id": 1, "pad": ""}).encode()
    body = body.replace(b'"pad": ""', b'"pad": "' + b"x" * (proto.MAX_MESSAGE_BYTES - len(body)) + b'"')
    assert len(body) == proto.MAX_MESSAGE_BYTES
    c.send(frame(body))
    assert c.recv()["code"] == "bad_field"
    # A peer that sends half a message and vanishes changes nothing.
    d = Raw(daemon.path)
    d.send(struct.pack(">I", 100) + b'{"v": 1')
    d.sock.close()
    # a joined connection closed by a framing error leaves the ledger: its offer goes.
    a.send(b"\xff\xff\xff\xff")
    assert a.recv()["code"] == "too_large" and a.closed()
    ledger = wait_for(lambda: (lambda l: l if gpu(l, "sim:0")["owner"] is None else None)(daemon.ledger()),
                      what="a's GPU to lose its owner")
    assert holdings(ledger, "sim:0") == {b_client: (64 * MiB, 64 * MiB)}   # b is asked to move away
    push = b.recv()
    assert (push["type"], push["gpu"], push["bytes"], push["reason"]) == ("reclaim", "sim:0", 64 * MiB, "owner_left")
    assert b.ask(type="reclaim_done", gpu="sim:0", bytes=64 * MiB)["held"] == 0
    assert daemon.ledger()["gpus"] == [gpu(daemon.ledger(), "sim:1")]
    assert "Traceback" not in daemon.stop()


def test_connection_from_another_user_is_refused(daemon):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as another user (the uid check itself: test_peer_uid_check)")
    nobody = 65534
    # The socket is 0600: another user cannot even connect.
    os.chmod(os.path.dirname(daemon.path), 0o711)
    # Let it through the file mode, to reach the daemon's SO_PEERCRED check.
    results = {}
    for mode in (0o600, 0o666):
        os.chmod(daemon.path, mode)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become nobody and try
            os.close(read_end)
            outcome = "?"
            try:
                os.setgid(nobody)
                os.setuid(nobody)
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(daemon.path)
                reply = proto.recv_message(sock, proto.FrameDecoder(), [], time.monotonic() + 5)
                sock.settimeout(5)
                outcome = f"{reply['code']}|{reply['message']}|closed={sock.recv(1) == b''}"
            except PermissionError:
                outcome = "EACCES"
            except BaseException as e:
                outcome = f"{type(e).__name__}: {e}"
            finally:
                os.write(write_end, outcome.encode())
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            results[mode] = f.read().decode()
        os.waitpid(pid, 0)
    assert results[0o600] == "EACCES"
    assert results[0o666] == f"forbidden|uid {nobody} is not the coordinator's user (uid 0)|closed=True"
    assert daemon.ledger()["clients"] == []   # and it still serves its own user


# --------------------------------------------------------------------------------------
# Processes lending to each other.


def test_offer_borrow_reclaim_confirm_across_processes(daemon, peers):
    lender = peers("0")
    b1 = peers("1")
    b2 = peers("2")
    assert lender.call("offer", gpu="sim:0", bytes=96 * MiB)["available"] == 96 * MiB
    assert b1.call("borrow", gpu="sim:0", bytes=64 * MiB) == 64 * MiB
    assert b2.call("borrow", gpu="sim:0", bytes=64 * MiB) == 32 * MiB       # only what is left
    assert b2.call("borrow", gpu="sim:0", bytes=1) == 0
    ledger = daemon.ledger()
    assert holdings(ledger, "sim:0") == {b1.client: (64 * MiB, 0), b2.client: (32 * MiB, 0)}
    # Each borrower's allocator may place exactly its grant on GPU 0; nothing elsewhere.
    assert b1.call("fake")["budget"]["0"] == 64 * MiB and b2.call("fake")["budget"]["0"] == 32 * MiB
    assert b1.call("fake")["budget"]["3"] == 0
    assert ["lend", 0, 64 * MiB] in b1.call("fake")["calls"]
    b1.call("place", device=0, bytes=48 * MiB)       # contexts parked there

    # The owner takes 80 MiB back: b1 (keeps the most) gives back 64, b2 16.
    outcome = lender.call("reclaim", gpu="sim:0", bytes=80 * MiB)
    assert (outcome["state"], outcome["immediate"], outcome["pending"], outcome["bytes_back"]) == (
        "done", 0, 80 * MiB, 80 * MiB)
    ledger = daemon.ledger()
    assert holdings(ledger, "sim:0") == {b2.client: (16 * MiB, 0)}
    assert gpu(ledger, "sim:0")["offer"] == 16 * MiB and ledger["reclaims"] == []
    fake1 = b1.call("fake")
    assert fake1["budget"]["0"] == 0 and fake1["placed"]["0"] == 0 and fake1["host"] == 48 * MiB  # moved away first
    assert ["reclaim", 0, 64 * MiB] in fake1["calls"]
    assert b2.call("fake")["budget"]["0"] == 16 * MiB
    assert b1.call("borrowed") == {}

    # Releasing: what it holds, never more.
    assert b2.call("release", gpu="sim:0", bytes=8 * MiB) == 8 * MiB
    assert b2.call("release", gpu="sim:0", bytes=64 * MiB) == 8 * MiB       # clipped to what it holds
    ledger = daemon.ledger()
    assert holdings(ledger, "sim:0") == {} and gpu(ledger, "sim:0")["available"] == 16 * MiB
    kinds = [e[0] for e in b2.call("events")]
    assert kinds == ["lend_borrow", "lend_reclaim", "lend_release", "lend_release", "lend_release"]
    lender_events = lender.call("events")
    assert [e[0] for e in lender_events] == ["lend_offer", "lend_reclaim", "lend_reclaimed"]
    assert lender_events[2][2:4] == ["gpu0", 80 * MiB] and lender_events[2][4]["gpu"] == "sim:0"


def test_unconfirmed_reclaim_times_out_then_completes_late(daemon, peers):
    lender = peers("0")
    borrower = peers("1")
    lender.call("offer", gpu="sim:0", bytes=64 * MiB)
    borrower.call("borrow", gpu="sim:0", bytes=64 * MiB)
    borrower.call("place", device=0, bytes=64 * MiB)
    borrower.call("set", stuck={"0": 40 * MiB})      # a running context: moves at its next park
    started = time.monotonic()
    outcome = lender.call("reclaim", gpu="sim:0", bytes=64 * MiB)
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 5   # the deadline, not the client's own wait
    assert (outcome["state"], outcome["bytes_back"]) == ("timeout", 24 * MiB)   # 24 moved and confirmed
    ledger = daemon.ledger()
    assert holdings(ledger, "sim:0") == {borrower.client: (40 * MiB, 40 * MiB)}
    assert ledger["reclaims"][0]["timed_out"] and ledger["reclaims"][0]["pending"] == 40 * MiB
    # The context parks: the next tick moves the rest and confirms; the lender is told, late.
    borrower.call("park")
    assert holdings(daemon.ledger(), "sim:0") == {borrower.client: (40 * MiB, 40 * MiB)}   # not yet confirmed
    borrower.call("tick")
    ledger = daemon.ledger()
    assert holdings(ledger, "sim:0") == {} and ledger["reclaims"] == []
    events = lender.events_until("lend_reclaimed")
    assert [e[0] for e in events] == ["lend_offer", "lend_reclaim", "lend_reclaim_timeout", "lend_reclaimed"]
    assert events[2][4]["bytes_missing"] == 40 * MiB and events[3][4]["late"] is True


def test_killed_borrower_is_dropped_and_its_bytes_return_to_the_offer(daemon, peers):
    lender = peers("0")
    b1 = peers("1")
    b2 = peers("2")
    lender.call("offer", gpu="sim:0", bytes=100 * MiB)
    b1.call("borrow", gpu="sim:0", bytes=60 * MiB)
    b2.call("borrow", gpu="sim:0", bytes=40 * MiB)
    b1.kill()                                               # mid-borrow
    ledger = wait_for(lambda: (lambda l: l if len(l["clients"]) == 2 else None)(daemon.ledger()),
                      what="the killed borrower to be dropped")
    assert holdings(ledger, "sim:0") == {b2.client: (40 * MiB, 0)}
    assert gpu(ledger, "sim:0")["available"] == 60 * MiB
    assert b2.call("borrow", gpu="sim:0", bytes=100 * MiB) == 60 * MiB   # the freed room is lendable again
    # Killed while being asked back: its debt is settled by its death.
    b2.call("set", stuck={"0": 100 * MiB})
    b2.call("place", device=0, bytes=100 * MiB)
    outcome = lender.call("reclaim", gpu="sim:0", bytes=50 * MiB, wait=False)
    assert outcome["pending"] == 50 * MiB
    wait_for(lambda: daemon.ledger()["reclaims"] and daemon.ledger()["reclaims"][0]["asks"], what="the ask")
    b2.kill()
    ledger = wait_for(lambda: (lambda l: l if not l["reclaims"] else None)(daemon.ledger()),
                      what="the reclaim to complete")
    assert holdings(ledger, "sim:0") == {} and gpu(ledger, "sim:0")["available"] == 50 * MiB
    assert [e[0] for e in lender.events_until("lend_reclaimed")][-1] == "lend_reclaimed"


def test_killed_lender_makes_its_borrowers_move_away(daemon, peers):
    lender = peers("0")
    borrower = peers("1")
    lender.call("offer", gpu="sim:0", bytes=64 * MiB)
    borrower.call("borrow", gpu="sim:0", bytes=32 * MiB)
    borrower.call("place", device=0, bytes=16 * MiB)
    lender.kill()
    wait_for(lambda: gpu(daemon.ledger(), "sim:0") is None, what="sim:0 to leave the ledger")
    fake = borrower.call("fake")
    assert fake["budget"]["0"] == 0 and fake["placed"]["0"] == 0 and fake["host"] == 16 * MiB
    assert borrower.call("borrowed") == {}
    kinds = [(e[0], e[4].get("reason")) for e in borrower.events_until("lend_release")]
    assert kinds[-2:] == [("lend_reclaim", "owner_left"), ("lend_release", "reclaim")]
    # A restarted server takes the GPU over.
    again = peers("0")
    assert gpu(daemon.ledger(), "sim:0")["owner"] == again.client


def test_policy_threads_offer_elastically_borrow_and_reclaim(daemon, peers):
    # The owner offers the memory it leaves free (as the driver sees it, plus what borrowers
    # hold there) less 10%, re-read every 50 ms; the borrower borrows when its contexts are in
    # host memory. Each fake allocator has GPUs of 1 GiB.
    lender = peers("0", "--policy")
    borrower = peers("1", "--policy", "--max-borrow", "512MiB")
    margin = (1 << 30) // 10
    wait_for(lambda: (gpu(daemon.ledger(), "sim:0") or {}).get("offer") == (1 << 30) - margin,
             what="the elastic offer")
    borrower.call("set", host=300 * MiB)
    wait_for(lambda: holdings(daemon.ledger(), "sim:0").get(borrower.client) == (512 * MiB, 0),
             what="a borrow of 512 MiB (300 MiB rounded up to 256 MiB steps, within max_borrow)")
    # The grant comes first, then the budget: the client raises it right after the reply.
    wait_for(lambda: borrower.call("fake")["budget"]["0"] == 512 * MiB, what="the lend budget to follow")
    # The owner's own use grows to 312 MiB: the spare (712 MiB less the margin) is under the
    # offer. The difference comes from the unborrowed part, at once: no borrower is asked.
    lender.call("set", free={"0": 712 * MiB})
    wait_for(lambda: gpu(daemon.ledger(), "sim:0")["offer"] == 712 * MiB - margin, what="the offer to shrink")
    assert holdings(daemon.ledger(), "sim:0") == {borrower.client: (512 * MiB, 0)}
    # It grows to 512 MiB: the borrower must give back the margin's worth; then all is stable.
    lender.call("set", free={"0": 512 * MiB})
    wait_for(lambda: holdings(daemon.ledger(), "sim:0") == {borrower.client: (512 * MiB - margin, 0)},
             what="the borrower to give back and confirm")
    time.sleep(0.2)  # a few more rounds of both policies change nothing
    ledger = daemon.ledger()
    assert holdings(ledger, "sim:0") == {borrower.client: (512 * MiB - margin, 0)}
    assert (gpu(ledger, "sim:0")["offer"], gpu(ledger, "sim:0")["available"], ledger["reclaims"]) == (
        512 * MiB - margin, 0, [])
    assert borrower.call("fake")["budget"]["0"] == 512 * MiB - margin
    kinds = [e[0] for e in lender.events_until("lend_reclaimed")]
    assert kinds[0] == "lend_offer" and "lend_reclaim" in kinds


def test_policy_threads_give_unused_room_back(daemon, peers):
    peers("0", "--policy", "--offer", "900MiB")
    borrower = peers("1", "--policy", "--max-borrow", "1GiB")
    wait_for(lambda: (gpu(daemon.ledger(), "sim:0") or {}).get("offer") == 900 * MiB, what="the fixed offer")
    borrower.call("set", host=600 * MiB)
    wait_for(lambda: holdings(daemon.ledger(), "sim:0").get(borrower.client) == (768 * MiB, 0),
             what="a borrow of 768 MiB")
    # The ledger records the grant before the borrower raises its lend budget to it (the
    # client's order, so that the ledger is never less than what is in use): wait for both.
    wait_for(lambda: borrower.call("fake")["budget"]["0"] == 768 * MiB, what="the borrower's budget to rise")
    borrower.call("place", device=0, bytes=100 * MiB)    # some contexts parked there
    borrower.call("set", host=0)
    # 668 MiB unused, more than two 256 MiB steps: give back all but one step.
    wait_for(lambda: holdings(daemon.ledger(), "sim:0").get(borrower.client) == (356 * MiB, 0),
             what="unused room to be given back")
    fake = borrower.call("fake")
    assert fake["budget"]["0"] == 356 * MiB and fake["placed"]["0"] == 100 * MiB


def test_client_gives_everything_back_when_the_coordinator_dies(short_dir):
    d = Daemon(os.path.join(short_dir, "c.sock"))
    lender = Raw(d.path)
    lender.ask(type="hello", pid=os.getpid(), gpus=["sim:0"])
    lender.ask(type="offer", gpu="sim:0", bytes=64 * MiB)
    local = FakeLocal()
    client = cc.join(d.path, gpus="1", local=local, start=False)
    try:
        assert client.borrow("sim:0", 32 * MiB) == 32 * MiB
        local.place(0, 32 * MiB)
        d.proc.kill()
        d.proc.wait()
        wait_for(lambda: local.budget[0] == 0 and not client.connected, what="the grant to be given back")
        assert local.placed[0] == 0 and local.host == 32 * MiB
        with pytest.raises(cc.CoordinatorError, match="not connected"):
            client.borrow("sim:0", 1)
    finally:
        client.close()
        d.proc.stdout.close()
        d.proc.stderr.close()


def test_a_borrower_borrows_once_for_what_host_memory_holds(daemon):
    # Bytes in host memory move to borrowed room only at their context's next park: while they
    # wait there, more policy rounds must not borrow again (grants would pile up, taking the
    # lender's memory from other borrowers).
    lender = Raw(daemon.path)
    lender.ask(type="hello", pid=os.getpid(), gpus=["sim:0"])
    lender.ask(type="offer", gpu="sim:0", bytes=2 << 30)
    local = FakeLocal()
    local.host = 300 * MiB
    with cc.join(daemon.path, gpus="1", local=local, start=False) as client:
        for _ in range(4):
            client.tick()
        assert holdings(daemon.ledger(), "sim:0") == {client.client_id: (512 * MiB, 0)}  # 300 MiB in 256 MiB steps
        local.place(0, 300 * MiB)    # the contexts parked there; host memory holds 200 MiB more now
        local.host = 200 * MiB
        for _ in range(4):
            client.tick()
        # 212 MiB of room is unused, more than the 200 MiB in host memory: nothing more borrowed.
        assert holdings(daemon.ledger(), "sim:0") == {client.client_id: (512 * MiB, 0)}
        local.host = 300 * MiB
        client.tick()                # 88 MiB beyond the room: one step more
        assert holdings(daemon.ledger(), "sim:0") == {client.client_id: (768 * MiB, 0)}


def test_client_in_process_records_events(daemon):
    drain_python_events()
    local = FakeLocal()
    with cc.join(daemon.path, gpus="2", local=local, start=False, name="in-process") as client:
        client.offer(2, 10 * MiB)
        assert client.offers() == {"sim:2": 10 * MiB}
        ledger = client.ledger()
        assert ledger["clients"][0]["name"] == "in-process" and ledger["clients"][0]["pid"] == os.getpid()
        with pytest.raises(cc.CoordinatorRefused, match="below_borrowed|over_reclaim") as e:
            client.reclaim(2, 11 * MiB)
        assert e.value.code == "over_reclaim"
    events = [e for e in drain_python_events() if e.kind == EventKind.LEND_OFFER]
    assert [(e.dst, e.bytes, e.args) for e in events] == [("gpu2", 10 * MiB, {"gpu": "sim:2"})]
    assert daemon.ledger()["clients"] == []


def test_lend_events_round_trip_through_a_trace(tmp_path):
    from aqua_alloc.obs import trace_reader, trace_writer
    from aqua_alloc.obs.events import Event

    events = [Event(1000, EventKind.LEND_BORROW, dst="gpu0", bytes=64 * MiB, args={"gpu": "sim:0", "asked": 1}),
              Event(2000, EventKind.LEND_RELEASE, src="gpu0", bytes=64 * MiB, args={"gpu": "sim:0"})]
    path = tmp_path / "t.json"
    trace_writer.write_trace(path, events)
    back = trace_reader.read_trace(path)
    assert back.events == events
    instants = [e for e in back.trace_events if e.get("ph") == "i"]
    assert [(e["name"], e["args"]["bytes"]) for e in instants] == [("lend_borrow", 64 * MiB),
                                                                    ("lend_release", 64 * MiB)]


# --------------------------------------------------------------------------------------
# `info` shows the ledger.


def test_info_shows_the_ledger_or_says_there_is_none(daemon, short_dir):
    a = Raw(daemon.path)
    a.ask(type="hello", pid=os.getpid(), gpus=["sim:0"], name="server-a")
    a.ask(type="offer", gpu="sim:0", bytes=2 << 30)
    b = Raw(daemon.path)
    b.ask(type="hello", pid=os.getpid(), gpus=[])
    b.ask(type="borrow", gpu="sim:0", bytes=1 << 30)
    proc = subprocess.run([sys.executable, "-m", "aqua_alloc", "info"], env=clean_env(AQUA_COORDINATOR=daemon.path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"coordinator at {daemon.path}: 2 processes, reclaim timeout 0.5 s" in out
    assert (f"  sim:0: owner pid {os.getpid()} (server-a), offers 2.00 GiB, borrowed 1.00 GiB, "
            "available 1.00 GiB") in out
    assert f"    pid {os.getpid()} holds 1.00 GiB" in out
    proc = subprocess.run([sys.executable, "-m", "aqua_alloc", "info", "--json"],
                          env=clean_env(AQUA_COORDINATOR=daemon.path), capture_output=True, text=True, timeout=60)
    ledger = json.loads(proc.stdout)["coordinator"]["ledger"]
    assert proto.check_ledger(ledger) == [] and gpu(ledger, "sim:0")["borrowed"] == 1 << 30
    nowhere = os.path.join(short_dir, "none.sock")
    proc = subprocess.run([sys.executable, "-m", "aqua_alloc", "info"], env=clean_env(AQUA_COORDINATOR=nowhere),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and f"coordinator: no coordinator at {nowhere}\n" in proc.stdout


# --------------------------------------------------------------------------------------
# With the real allocator (aqua_alloc.lend/reclaim over simulated devices).


REAL_PEER = r"""
import json, random, sys
import aqua_alloc as aq
import aqua_alloc.memory.sim as sim
from aqua_alloc.coordinator import client as cc
MiB = 1 << 20
aq.enable(backend="sim", sim_devices=2, sim_device_bytes=64 * MiB, sim_host_bytes=256 * MiB, host_reserve=64 * MiB,
          chunk=4 * MiB, lend_poll_ms=0)
client = cc.join(sys.argv[1], gpus=sys.argv[2], start=False)
data = random.Random(7).randbytes(8 * MiB)
ptr = None
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    if op == "borrow":
        out = client.borrow(**cmd)
    elif op == "offer":
        out = client.offer(**cmd)["offer"]
    elif op == "reclaim":
        out = client.reclaim(**cmd).state
    elif op == "park_on":     # a context of GPU 1, parked on the borrowed GPU
        with aq.context("c", device=1):
            ptr = sim.malloc(len(data), 1)
        sim.write(ptr, data)
        aq.park("c")
        out = aq.evict("c", cmd["tier"])
    elif op == "where":
        out = aq.where("c")
        out["intact"] = sim.read(ptr, len(data)) == data
    elif op == "lend_budget":
        out = aq.stats()["tiers"][cmd["tier"]]["lend_budget"]
    print(json.dumps(out), flush=True)
"""


def test_with_the_real_allocator_on_simulated_devices(daemon):
    import aqua_alloc

    if not (hasattr(aqua_alloc, "lend") and hasattr(aqua_alloc, "reclaim")):
        pytest.skip("aqua_alloc.lend()/reclaim() are not in this build (the fake allocator stands in)")
    procs = [subprocess.Popen([sys.executable, "-c", REAL_PEER, daemon.path, owned], env=clean_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
             for owned in ("0", "1")]
    lender, borrower = procs

    def call(p, **cmd):
        p.stdin.write(json.dumps(cmd) + "\n")
        line = p.stdout.readline()
        assert line, f"peer {p.pid} exited"
        return json.loads(line)

    try:
        assert call(lender, op="offer", gpu=0, nbytes=16 * MiB) == 16 * MiB
        # Nothing of the borrower's may go to GPU 0 before it is granted.
        assert call(borrower, op="lend_budget", tier="gpu0") == 0
        assert call(borrower, op="borrow", gpu=0, nbytes=32 * MiB) == 16 * MiB
        assert call(borrower, op="lend_budget", tier="gpu0") == 16 * MiB
        assert call(borrower, op="park_on", tier="gpu0") == 8 * MiB
        assert call(borrower, op="where") == {"gpu0": 8 * MiB, "gpu1": 0, "host": 0, "intact": True}
        assert list(holdings(daemon.ledger(), "sim:0").values()) == [(16 * MiB, 0)]
        # The owner takes it all back: the parked context leaves GPU 0 before the owner hears.
        assert call(lender, op="reclaim", gpu=0, nbytes=16 * MiB) == "done"
        assert call(borrower, op="lend_budget", tier="gpu0") == 0
        assert call(borrower, op="where") == {"gpu0": 0, "gpu1": 0, "host": 8 * MiB, "intact": True}
        assert holdings(daemon.ledger(), "sim:0") == {}
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=10)
            p.stdout.close()
