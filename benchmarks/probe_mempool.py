"""Probe: which of PyTorch's MemPool operations, repeated, crashes the process? (The GPU
soak died after a few hundred contexts; each context is a MemPool.)

    python benchmarks/probe_mempool.py MODE N
      aqua      aqua_alloc contexts: make, allocate, free, release (snapshot + pool delete)
      nosnap    the same pools, deleted without asking torch for a snapshot first
      torch     plain torch.cuda.MemPool() (no pluggable allocator), with a snapshot
      torchnosnap  plain torch.cuda.MemPool(), no snapshot
      torchall  plain torch.cuda.MemPool(), with a snapshot of the whole allocator
"""

import faulthandler
import sys

import torch

import aqua_alloc as aq

faulthandler.enable()
mode, n = sys.argv[1], int(sys.argv[2])
if mode in ("aqua", "nosnap"):
    aq.enable()
junk = []
for i in range(n):
    if mode == "aqua":
        with aq.context(f"probe-{i}"):
            t = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
        del t
        aq.release(f"probe-{i}")
    elif mode == "nosnap":
        with aq.context(f"probe-{i}"):
            t = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
        del t
        state = aq.allocator._state
        ctx = state.contexts.pop(f"probe-{i}")
        aq._native.lib().aqua_context_release(ctx.id)
        pool, ctx.pool = ctx.pool, None
        del pool  # torch frees the pool's segments (aqua_free)
    else:
        pool = torch.cuda.MemPool()
        with torch.cuda.use_mem_pool(pool):
            t = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
        del t
        if mode == "torch":
            pool.snapshot()
        elif mode == "torchall":
            torch.cuda.memory_snapshot()
        del pool
    junk.append({"i": i, "s": str(i) * 10})  # Python allocations that a corrupted heap trips on
    if i % 100 == 0:
        print(mode, i, flush=True)
print(mode, "done", n)
