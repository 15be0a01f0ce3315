"""A lender of benchmarks/cluster_serve.py: a process that holds a model on its GPU, offers
the memory it leaves free through the coordinator, and takes some back when told to.

It is started with the coordinator's settings in its environment (``AQUA_COORDINATOR``,
``AQUA_COORDINATOR_GPUS`` naming its one GPU, ``AQUA_COORDINATOR_INTERVAL``,
``AQUA_LEND_MARGIN``) and joins through ``aqua_alloc.enable()``, as any user process does:
its offer is elastic (the GPU's free memory plus what borrowers hold, less the margin).
On CUDA it first builds ``--model`` (random weights) on its GPU. On the simulated backend
(``AQUA_BACKEND=sim``) there is no model: the GPU is a simulated device of this process.

It answers one JSON command per stdin line with one JSON line on stdout:

- ``{"op": "state"}``: its GPU's ledger row (offer, borrowed, available) and its free memory.
- ``{"op": "reclaim", "from_borrowers": N}``: ``Client.reclaim`` of everything nobody
  borrowed plus N bytes, which the coordinator must ask of the borrowers; waits for the
  outcome. Reports the reclaim and the seconds until every byte was back.
- ``{"op": "grow", "from_borrowers": N, "timeout_s": T}``: its own allocations grow: it
  allocates, outside any context, its free memory less the margin plus N bytes, so that the
  elastic offer falls N bytes below what borrowers hold. Its client's next policy round
  reclaims the difference. Reports the seconds from the allocation to the reclaim being
  asked (one policy round at most) and to every byte being back, from the client's events.
- ``{"op": "shrink"}``: frees what ``grow`` allocated (the next policy round offers it again).
- ``{"op": "leave"}`` or the end of stdin: ``aqua_alloc.disable()`` (leaves the coordinator), exit.

A command that fails answers ``{"ok": false, "error": ...}`` and the lender goes on.

    AQUA_COORDINATOR=/tmp/x.sock AQUA_COORDINATOR_GPUS=0 CUDA_VISIBLE_DEVICES=2 \\
        python benchmarks/cluster_lender.py --model llama-8b
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import aqua_alloc as aq
from aqua_alloc import lifecycle
from aqua_alloc.memory import native
from aqua_alloc.obs import events, trace

MiB = 1 << 20
# What a grow leaves free beyond what it must (bytes): the driver's and the allocator's own
# needs while it holds nearly everything.
GROW_SLACK = 256 * MiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-8b", help="model held on the GPU (CUDA only; random weights)")
    p.add_argument("--device", type=int, default=0, help="the GPU this process owns, as its ordinal (default 0)")
    return p.parse_args(argv)


class Lender:
    """The lender's side of the commands. ``allocate(n)``/``free()`` make and drop the
    grown bytes on the GPU (a torch tensor on CUDA, a raw segment on the simulated backend)."""

    def __init__(self, device: int, simulated: bool) -> None:
        self.device = device
        self.simulated = simulated
        self.client = lifecycle.coordinator_client()
        if self.client is None:
            raise RuntimeError("not in a coordinator: start this process with AQUA_COORDINATOR set")
        self.key = self.client.key(device)
        self._grown: Any = None
        self.grown_bytes = 0

    def row(self) -> dict[str, Any]:
        ledger = self.client.ledger()
        row = next((g for g in ledger["gpus"] if g["gpu"] == self.key), None)
        if row is None:
            raise RuntimeError(f"{self.key} is not in the coordinator's ledger (no offer yet?)")
        return row

    def state(self) -> dict[str, Any]:
        free, total = native.mem_info(self.device)
        row = self.row()
        return {"gpu": self.key, "offer": row["offer"], "borrowed": row["borrowed"], "available": row["available"],
                "free": free, "total": total, "grown": self.grown_bytes}

    def reclaim(self, from_borrowers: int) -> dict[str, Any]:
        row = self.row()
        nbytes = row["available"] + from_borrowers
        t0 = time.monotonic()
        outcome = self.client.reclaim(self.device, nbytes, wait=True)
        return {"borrowed_before": row["borrowed"], "nbytes": outcome.nbytes, "immediate": outcome.immediate,
                "pending": outcome.pending, "state": outcome.state, "bytes_back": outcome.bytes_back,
                "coordinator_seconds": outcome.seconds, "seconds": time.monotonic() - t0}

    def grow(self, from_borrowers: int, timeout_s: float) -> dict[str, Any]:
        if self._grown is not None:
            raise RuntimeError("already grown: shrink first")
        margin = self.client.policy.margin
        free, total = native.mem_info(self.device)
        margin_bytes = margin.of(total) if hasattr(margin, "of") else int(margin)
        # Past the margin the offer falls below what is borrowed: by from_borrowers, at most
        # what is free less the slack (the allocation must fit; half the margin on a small
        # simulated GPU).
        nbytes = min(free - margin_bytes + from_borrowers, free - min(GROW_SLACK, margin_bytes // 2))
        if nbytes <= 0:
            raise RuntimeError(f"nothing to grow into: {free} bytes free, margin {margin_bytes}")
        borrowed_before = self.row()["borrowed"]
        trace.collect()  # what came before is not this grow's
        t0_ns = time.monotonic_ns()
        self._grown = self._allocate(nbytes)
        self.grown_bytes = nbytes
        asked = done = None
        deadline = time.monotonic() + timeout_s
        seen: list[events.Event] = []
        while done is None and time.monotonic() < deadline:
            seen += [e for e in trace.collect() if e.t_ns >= t0_ns]
            for e in seen:
                if asked is None and e.kind == events.EventKind.LEND_RECLAIM and e.args.get("role") == "lender":
                    asked = e
                if (asked is not None and e.args.get("reclaim") == asked.args.get("reclaim")
                        and e.kind in (events.EventKind.LEND_RECLAIMED, events.EventKind.LEND_RECLAIM_TIMEOUT)):
                    done = e
            time.sleep(0.01)
        return {"grown": nbytes, "free_before": free, "margin": margin_bytes, "borrowed_before": borrowed_before,
                "reclaim_bytes": asked.bytes if asked else None,
                "immediate": asked.args.get("immediate") if asked else None,
                "pending": asked.args.get("pending") if asked else None,
                "state": ("done" if done.kind == events.EventKind.LEND_RECLAIMED else "timeout") if done else
                         ("pending" if asked else "not asked"),
                "asked_after_s": (asked.t_ns - t0_ns) / 1e9 if asked else None,
                "back_after_s": (done.t_ns - t0_ns) / 1e9 if done else None}

    def shrink(self) -> dict[str, Any]:
        freed, self.grown_bytes = self.grown_bytes, 0
        if self._grown is not None:
            self._free(self._grown)
            self._grown = None
        return {"freed": freed}

    def _allocate(self, nbytes: int) -> Any:
        if self.simulated:
            from aqua_alloc.memory import sim  # noqa: PLC0415 - the simulated backend only

            return sim.malloc(nbytes, self.device)
        import torch  # noqa: PLC0415

        return torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{self.device}")

    def _free(self, grown: Any) -> None:
        if self.simulated:
            from aqua_alloc.memory import sim  # noqa: PLC0415

            sim.free(grown)
            return
        import torch  # noqa: PLC0415

        del grown
        torch.cuda.empty_cache()  # back to the driver: the free memory the offer reads


def answer(lender: Lender, op: str, fields: dict[str, Any]) -> dict[str, Any]:
    if op == "state":
        return lender.state()
    if op == "reclaim":
        return lender.reclaim(int(fields["from_borrowers"]))
    if op == "grow":
        return lender.grow(int(fields["from_borrowers"]), float(fields.get("timeout_s", 30.0)))
    if op == "shrink":
        return lender.shrink()
    raise ValueError(f"unknown op {op!r}; expected state, reclaim, grow, shrink or leave")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    simulated = os.environ.get("AQUA_BACKEND") == "sim"
    model = None
    if not simulated:
        import torch  # noqa: PLC0415

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from serve_harness import build_model  # noqa: PLC0415

        torch.cuda.set_device(args.device)
        model = build_model(args.model, torch.device("cuda", args.device))  # held, never run
    aq.enable()
    try:
        lender = Lender(args.device, simulated)
        print(json.dumps({"joined": os.getpid(), "gpu": lender.key, "client": lender.client.client_id,
                          "model": None if model is None else args.model}), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            op = command.pop("op")
            if op == "leave":
                break
            try:
                reply = {"ok": True, **answer(lender, op, command)}
            except Exception as e:  # a bad command or a failed reclaim: say so, keep lending
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)
        lender.shrink()
    finally:
        aq.disable()
    print(json.dumps({"left": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
