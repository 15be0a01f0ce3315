"""The serving process of ``benchmarks/cluster_serve.py --sim``: what a server does to memory,
on the simulated backend, where no model can run.

It joins the coordinator through ``aqua_alloc.enable()`` (``AQUA_COORDINATOR`` in its
environment, owning no GPU: it only borrows), makes ``--contexts`` contexts of
``--context-bytes`` of random bytes each on its GPU, whose local budget holds
``--local-contexts`` of them, and then, until ``--seconds`` have passed, gives each
context the GPU in turn as the fair scheduler does: resume, a slice (``--slice-ms``), park.
Parked contexts that do not fit spill to host; its coordinator client then borrows room on
the lenders' GPUs and later spills go there, until a lender takes its memory back.

At the end every context is resumed and its bytes compared with what was written: the
stand-in for "every output identical to its solo run". One JSON line on stdout (and in
``--out``): moves, bytes moved, peak bytes per tier, what the coordinator client borrowed,
failures, and ``intact``. Exit status 0 when every context is intact and nothing failed, 1
otherwise.

    AQUA_BACKEND=sim AQUA_COORDINATOR=/tmp/x.sock AQUA_COORDINATOR_GPUS=none \\
        python benchmarks/cluster_sim_server.py --device 0 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import aqua_alloc as aq
from aqua_alloc.memory import sim
from aqua_alloc.memory.config import parse_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=int, default=0, help="this server's simulated GPU (ordinal)")
    p.add_argument("--contexts", type=int, default=10)
    p.add_argument("--context-bytes", default="40MiB",
                   help="bytes of each context (default: what its host bytes need more than one 256 MiB borrow)")
    p.add_argument("--local-contexts", type=int, default=2, help="contexts the GPU's local budget holds")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--slice-ms", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("contexts", "local_contexts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a whole number, at least 1")
    if args.seconds <= 0 or args.slice_ms < 0:
        p.error("--seconds: expected more than 0; --slice-ms: expected 0 or more")
    args.context_nbytes = parse_size(args.context_bytes, "--context-bytes", allow_percent=False)
    return args


def serve(args: argparse.Namespace) -> dict[str, Any]:
    d = args.device
    aq.enable(local_budget={d: args.local_contexts * args.context_nbytes})
    rng = random.Random(args.seed + d)
    written: dict[str, tuple[int, bytes]] = {}   # tag -> (address, bytes written there)
    failures: list[str] = []
    rounds = 0
    try:
        for i in range(args.contexts):
            tag = f"server{d}-c{i}"
            with aq.context(tag, device=d):
                ptr = sim.malloc(args.context_nbytes, d)
            data = rng.randbytes(args.context_nbytes)
            sim.write(ptr, data)
            written[tag] = (ptr, data)
            aq.park(tag)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for tag in written:
                try:
                    aq.resume(tag)
                    time.sleep(args.slice_ms / 1e3)
                    aq.park(tag)
                except Exception as e:  # report it; the run goes on
                    failures.append(f"{tag}: {type(e).__name__}: {e}")
            rounds += 1
        spread = {tag: aq.where(tag) for tag in written}
        intact = {}
        for tag, (ptr, data) in written.items():
            aq.resume(tag)
            intact[tag] = sim.read(ptr, len(data)) == data
            aq.park(tag)
        stats = aq.stats()
        return {"device": d, "rounds": rounds, "failures": failures,
                "intact": all(intact.values()) and len(intact) == args.contexts,
                "not_intact": sorted(t for t, ok in intact.items() if not ok),
                "num_moves": int(stats["num_moves"]), "bytes_moved": int(stats["bytes_moved"]),
                "peak_bytes": {tier: int(s["peak"]) for tier, s in stats["tiers"].items()},
                "where_at_end": spread, "coordinator": stats.get("coordinator")}
    finally:
        for tag, (ptr, _) in written.items():
            sim.free(ptr)
            aq.release(tag)
        aq.disable()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = serve(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out is not None:
        args.out.write_text(line + "\n")
    return 0 if result["intact"] and not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
