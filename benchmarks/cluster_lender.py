"""A lender of benchmarks/cluster_serve.py: a process that holds a model on its GPU, offers
the memory it leaves free through the coordinator, and takes some back when told to.

It is started with the coordinator's settings in its environment (``AQUA_COORDINATOR``,
``AQUA_COORDINATOR_GPUS`` naming its one GPU, ``AQUA_COORDINATOR_INTERVAL``,
``AQUA_LEND_MARGIN``) and joins through ``aqua_alloc.enable()``, as any user process does:
its offer is elastic (the GPU's free memory plus what borrowers hold, less the margin).
On CUDA it first builds ``--model`` (random weights) on its GPU. On the simulated backend
(``AQUA_BACKEND=sim``) there is no model: the GPU is a simulated device of this process.

It answers one JSON command per stdin line with one JSON line on stdout:

- ``{"op": "state"}``: its GPU's ledger row (offer, borrowed, available), its free memory,
  and on CUDA the bytes other processes use there (``others``: from the driver's free
  memory less what this process used when it joined).
- ``{"op": "reclaim", "from_borrowers": N}``: ``Client.reclaim`` of everything nobody
  borrowed plus N bytes (none given: everything borrowed), which the coordinator must ask
  of the borrowers; waits for the outcome. Reports the reclaim, the seconds until the
  borrowers confirmed, and on CUDA until their bytes had left the GPU (``freed_after_s``).
- ``{"op": "grow", "from_borrowers": N, "timeout_s": T}``: its own allocations grow: it
  allocates, outside any context, its free memory less the margin plus N bytes, so that the
  elastic offer falls N bytes below what borrowers hold. Its client's policy rounds reclaim
  until the margin is free again. Reports every reclaim of that window (from the client's
  events), the seconds to the first, and to the margin being free (``back_after_s``).
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
from aqua_alloc.coordinator.client import CoordinatorRefused
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
        free, self.total = native.mem_info(device)
        # Bytes of the GPU in use before anyone borrows: this process's model, its CUDA context.
        self.baseline_used = self.total - free
        margin = self.client.policy.margin
        self.margin = margin.of(self.total) if hasattr(margin, "of") else int(margin)

    def row(self) -> dict[str, Any]:
        ledger = self.client.ledger()
        row = next((g for g in ledger["gpus"] if g["gpu"] == self.key), None)
        if row is None:
            raise RuntimeError(f"{self.key} is not in the coordinator's ledger (no offer yet?)")
        return row

    def others(self) -> int | None:
        """Bytes of this GPU other processes use now (their parked contexts, and their CUDA
        contexts here, some hundreds of MiB each), from the driver's free memory; None on the
        simulated backend, where other processes' devices are their own."""
        if self.simulated:
            return None
        free, _ = native.mem_info(self.device)
        return max(0, self.total - free - self.baseline_used - self.grown_bytes)

    def state(self) -> dict[str, Any]:
        free, total = native.mem_info(self.device)
        row = self.row()
        return {"gpu": self.key, "offer": row["offer"], "borrowed": row["borrowed"], "available": row["available"],
                "free": free, "total": total, "grown": self.grown_bytes, "others": self.others()}

    def reclaim(self, from_borrowers: int | None, timeout_s: float) -> dict[str, Any]:
        """Everything nobody borrowed plus ``from_borrowers`` (None: everything borrowed).
        Then, on CUDA, waits until the borrowers' bytes have left the GPU."""
        others_before = self.others()
        for attempt in range(2):
            row = self.row()
            nbytes = row["available"] + (row["borrowed"] if from_borrowers is None else from_borrowers)
            t0 = time.monotonic()
            try:
                outcome = self.client.reclaim(self.device, nbytes, wait=True)
                break
            except CoordinatorRefused as e:  # this process's own policy round moved the offer meanwhile
                if e.code != "over_reclaim" or attempt:
                    raise
        seconds = time.monotonic() - t0
        out = {"borrowed_before": row["borrowed"], "nbytes": outcome.nbytes, "immediate": outcome.immediate,
               "pending": outcome.pending, "state": outcome.state, "bytes_back": outcome.bytes_back,
               "coordinator_seconds": outcome.seconds, "seconds": seconds, "others_before": others_before}
        if others_before is not None:
            # Borrowers confirm once their budget is lowered; their bytes leave the GPU as the
            # pieces move (parked contexts at once, running ones at their next step).
            target = others_before - min(outcome.pending, others_before) * 0.9
            freed_after = self._wait(lambda: self.others() <= target, t0, timeout_s)
            out.update(others_after=self.others(), freed_after_s=freed_after)
        return out

    def grow(self, from_borrowers: int, timeout_s: float) -> dict[str, Any]:
        """Allocate past the margin by ``from_borrowers`` bytes; the client's policy rounds
        reclaim until the margin is free again (CUDA) or the borrowers gave back that much
        (simulated). Reports every reclaim of the window, not only the first."""
        if self._grown is not None:
            raise RuntimeError("already grown: shrink first")
        free, _ = native.mem_info(self.device)
        # Past the margin the offer falls below what is borrowed: by from_borrowers, at most
        # what is free less the slack (the allocation must fit; half the margin on a small
        # simulated GPU).
        nbytes = min(free - self.margin + from_borrowers, free - min(GROW_SLACK, self.margin // 2))
        if nbytes <= 0:
            raise RuntimeError(f"nothing to grow into: {free} bytes free, margin {self.margin}")
        into_margin = nbytes - (free - self.margin)  # what the borrowers must give back
        row = self.row()
        others_before = self.others()
        trace.collect()  # what came before is not this grow's
        t0_ns, t0 = time.monotonic_ns(), time.monotonic()
        self._grown = self._allocate(nbytes)
        self.grown_bytes = nbytes

        def reclaims() -> tuple[list[events.Event], list[events.Event]]:
            seen = [e for e in trace.collect() if e.t_ns >= t0_ns]
            asked = [e for e in seen if e.kind == events.EventKind.LEND_RECLAIM and e.args.get("role") == "lender"]
            ended = [e for e in seen if e.kind in (events.EventKind.LEND_RECLAIMED,
                                                   events.EventKind.LEND_RECLAIM_TIMEOUT)]
            return asked, ended

        def margin_back() -> bool:
            if not self.simulated:
                return native.mem_info(self.device)[0] >= self.margin - GROW_SLACK
            asked, ended = reclaims()
            done = {e.args.get("reclaim") for e in ended}
            given = sum(int(e.args.get("pending") or 0) for e in asked if e.args.get("reclaim") in done)
            return given >= into_margin or self.row()["borrowed"] == 0

        back_after = self._wait(margin_back, t0, timeout_s)
        asked, ended = reclaims()
        return {"grown": nbytes, "free_before": free, "margin": self.margin, "into_margin": into_margin,
                "borrowed_before": row["borrowed"], "others_before": others_before, "others_after": self.others(),
                "num_reclaims": len(asked), "reclaim_bytes": sum(e.bytes for e in asked),
                "pending": sum(int(e.args.get("pending") or 0) for e in asked),
                "timed_out_reclaims": sum(e.kind == events.EventKind.LEND_RECLAIM_TIMEOUT for e in ended),
                "state": "done" if back_after is not None else "timeout",
                "asked_after_s": (asked[0].t_ns - t0_ns) / 1e9 if asked else None,
                "back_after_s": back_after}

    @staticmethod
    def _wait(condition: Any, t0: float, timeout_s: float) -> float | None:
        """Seconds from ``t0`` until ``condition()`` held (polled every 10 ms); None at the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if condition():
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def shrink(self) -> dict[str, Any]:
        freed, self.grown_bytes = self.grown_bytes, 0
        grown, self._grown = self._grown, None
        if grown is not None and self.simulated:
            from aqua_alloc.memory import sim  # noqa: PLC0415 - the simulated backend only

            sim.free(grown)
        elif grown is not None:
            import torch  # noqa: PLC0415

            del grown                 # the last reference: the tensor's memory goes back to torch's cache,
            torch.cuda.empty_cache()  # and from there to the driver, whose free memory the offer reads
        return {"freed": freed}

    def _allocate(self, nbytes: int) -> Any:
        if self.simulated:
            from aqua_alloc.memory import sim  # noqa: PLC0415 - the simulated backend only

            return sim.malloc(nbytes, self.device)
        import torch  # noqa: PLC0415

        return torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{self.device}")


def answer(lender: Lender, op: str, fields: dict[str, Any]) -> dict[str, Any]:
    if op == "state":
        return lender.state()
    if op == "reclaim":
        nbytes = fields.get("from_borrowers")
        return lender.reclaim(None if nbytes is None else int(nbytes), float(fields.get("timeout_s", 30.0)))
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
