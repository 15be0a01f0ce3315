"""A stand-in aqua_alloc process for the coordinator tests, and the fake local allocator.

:class:`FakeLocal` has the methods the coordinator client needs from the allocator
(``lend``, ``reclaim``, ``stats``, ``mem_info``, ``gpu_keys``) and keeps exact books:
per device, the lend budget, the bytes of this process's contexts placed there, and the
bytes that cannot move now (pieces of running contexts move at their next park or
resume). Excess bytes move to host at once.

Run as a script, it is one process of a test: it joins the coordinator with a
:class:`~aqua_alloc.coordinator.client.Client` over a FakeLocal (no policy thread unless
``--policy``), then answers one JSON command per stdin line with one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from typing import Any, Callable

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class FakeReclaimResult:
    moved_bytes: int
    pending_bytes: int
    seconds: float


class FakeLocal:
    """Books of a pretend allocator with ``num_devices`` GPUs of ``total`` bytes each."""

    def __init__(self, num_devices: int = 4, total: int = 1 * GiB) -> None:
        self.total = total
        self.budget: dict[int, int | None] = {d: None for d in range(num_devices)}
        self.placed = {d: 0 for d in range(num_devices)}   # our contexts' bytes on device d as a peer
        self.stuck = {d: 0 for d in range(num_devices)}    # of which cannot move now
        self.free = {d: total for d in range(num_devices)}
        self.host = 0                                       # our contexts' bytes in host memory
        self.calls: list[list[Any]] = []
        self.lock = threading.Lock()
        # Bytes other processes hold on device d (from the ledger): the driver counts them
        # as used, so mem_info's free memory excludes them, as on a real GPU.
        self.others_hold: Callable[[int], int] | None = None

    def _move_excess(self, d: int) -> tuple[int, int]:
        limit = self.budget[d] or 0
        excess = max(0, self.placed[d] - limit)
        moved = min(excess, self.placed[d] - self.stuck[d])
        self.placed[d] -= moved
        self.host += moved
        return moved, max(0, self.placed[d] - limit)

    def lend(self, device: int, max_bytes: int | None) -> None:
        with self.lock:
            if device not in self.budget:
                raise ValueError(f"device={device!r}: no such GPU")
            if max_bytes is not None and max_bytes < 0:
                raise ValueError(f"max_bytes={max_bytes!r}: negative")
            self.calls.append(["lend", device, max_bytes])
            self.budget[device] = max_bytes
            if max_bytes is not None:
                self._move_excess(device)

    def reclaim(self, device: int, nbytes: int | None = None, timeout: float = 5.0) -> FakeReclaimResult:
        with self.lock:
            self.calls.append(["reclaim", device, nbytes])
            current = self.budget[device] or 0
            self.budget[device] = 0 if nbytes is None else max(0, current - nbytes)
            moved, pending = self._move_excess(device)
            return FakeReclaimResult(moved, pending, 0.0)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            tiers = {f"gpu{d}": {"current": 0, "lend_budget": self.budget[d] or 0, "lent": self.placed[d]}
                     for d in self.budget}
            tiers["host"] = {"current": self.host}
            return {"tiers": tiers}

    def mem_info(self, device: int) -> tuple[int, int]:
        """(free, total): ``free[device]`` is what this process leaves free of its GPU."""
        others = self.others_hold(device) if self.others_hold else 0
        return max(0, self.free[device] - others), self.total

    def gpu_keys(self) -> dict[int, str]:
        return {d: f"sim:{d}" for d in self.budget}

    # Test controls.
    def place(self, device: int, nbytes: int) -> None:
        """Contexts evicted onto ``device`` (within its lend budget), from host first."""
        with self.lock:
            room = (self.budget[device] or 0) - self.placed[device]
            if nbytes > room:
                raise ValueError(f"place({device}, {nbytes}): only {room} bytes of budget left")
            self.placed[device] += nbytes
            self.host = max(0, self.host - nbytes)

    def park(self) -> None:
        """Every context reaches a park point: pieces beyond a budget move now."""
        with self.lock:
            self.stuck = {d: 0 for d in self.stuck}
            for d, budget in self.budget.items():
                if budget is not None:
                    self._move_excess(d)

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {"budget": self.budget, "placed": self.placed, "stuck": self.stuck, "host": self.host,
                    "calls": self.calls}


def _serve(args: argparse.Namespace) -> None:
    from aqua_alloc.coordinator import client as cc
    from aqua_alloc.obs.events import drain_python_events

    local = FakeLocal(num_devices=args.devices)
    client = cc.join(args.socket, gpus=args.gpus, offer=args.offer, max_borrow=args.max_borrow,
                     interval=args.interval, local=local, name=args.name, start=args.policy)
    local.others_hold = lambda d: next((g["borrowed"] for g in client.ledger()["gpus"] if g["gpu"] == f"sim:{d}"), 0)
    print(json.dumps({"ready": True, "client": client.client_id}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            if op == "offer":
                result: Any = client.offer(command["gpu"], command["bytes"])
            elif op == "borrow":
                result = client.borrow(command["gpu"], command["bytes"])
            elif op == "release":
                result = client.release(command["gpu"], command.get("bytes"), timeout=0.0)
            elif op == "reclaim":
                result = dataclasses.asdict(client.reclaim(command["gpu"], command.get("bytes"),
                                                           wait=command.get("wait", True)))
            elif op == "ledger":
                result = client.ledger()
            elif op == "borrowed":
                result = client.borrowed()
            elif op == "tick":
                client.tick()
                result = None
            elif op == "fake":
                result = local.state()
            elif op == "set":
                with local.lock:
                    for name, value in command.items():
                        attr = getattr(local, name)
                        if isinstance(attr, dict):
                            attr.update({int(k): v for k, v in value.items()})
                        else:
                            setattr(local, name, value)
                result = None
            elif op == "place":
                local.place(command["device"], command["bytes"])
                result = None
            elif op == "park":
                local.park()
                result = None
            elif op == "events":
                result = [[e.kind.value, e.src, e.dst, e.bytes, e.args] for e in drain_python_events()]
            elif op == "close":
                client.close(timeout=0.0)
                result = None
            else:
                raise ValueError(f"unknown op {op!r}")
            print(json.dumps({"ok": True, "result": result}, default=str), flush=True)
        except Exception as e:  # reported to the test, which asserts on it
            print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}",
                              "code": getattr(e, "code", None)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--gpus", default="", help="owned device ordinals, e.g. 0 or 0,1")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--offer", default=None)
    parser.add_argument("--max-borrow", default=None)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--policy", action="store_true", help="run the policy thread")
    parser.add_argument("--name", default="")
    _serve(parser.parse_args())


if __name__ == "__main__":
    main()
