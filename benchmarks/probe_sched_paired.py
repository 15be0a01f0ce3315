"""The scheduler's cost per token, measured in pairs that cancel the machine's drift (GPU probe).

bench_serve found aqua-host at 0.79 to 0.97 of fcfs's output tokens/s at load 0.8 (median
0.85), and probe_step_time.py found four scheduled prompts 18% slower per token than the same
four generate calls taking a lock; but those runs measured each system minutes apart on a
machine whose decode step drifts between 16 and 34 ms. Here each round runs, back to back in
one process, the same prompts:

- ``lock``: N plain ``generate`` calls in N threads taking a lock (fcfs, a thread per request);
- ``worker``: the same calls one after another on one long-lived thread (bench_serve's fcfs);
- ``sched``: the same N prompts through ``Scheduler(policy="fair")`` with aqua_alloc on and a
  KV budget (bench_serve's: 128 MiB, contexts parked to host at switches);
- ``sched-pool``: ``sched`` with the calls made from a pool of long-lived threads (started
  once, reused every round, as a server's request pool) instead of a new thread per call;
- ``sched-roomy``: ``sched`` with a budget that holds every context (no move);
- ``lock-ctx``: ``lock`` with aqua_alloc on (roomy budget) and each call's KV in a
  ``ContextKVCache`` context: the context cache's cost without the scheduler;
- ``sched-dyn``: the scheduler with aqua_alloc on (roomy) but transformers' ``DynamicCache``
  (``use_context_cache=False``): the scheduler's cost without the context cache;

and reports each round's ms per token overall, the median model step (between two scheduler
hooks) and each variant's ratio to lock in the same round, then the medians over rounds. The llama-1b shape in bf16 with random weights, cuDNN attention off, as bench_serve.

    python benchmarks/probe_sched_paired.py [--rounds 5] [--prompts 4] [--prompt 1000] [--new 48]
        [--variants lock,worker,sched,sched-pool,sched-roomy,lock-ctx,sched-dyn]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_step_time as pst  # noqa: E402  (StepClock, kwargs, the scheduler's timing wrappers)

import aqua_alloc  # noqa: E402
from aqua_alloc.hf.generate_hook import cache_argument  # noqa: E402
from aqua_alloc.hf.kv_cache import ContextKVCache  # noqa: E402
from aqua_alloc.hf.scheduler import Scheduler  # noqa: E402
from serve_harness import build_model  # noqa: E402

MiB = 1 << 20


def run_lock(model, prompts, new):
    lock = threading.Lock()

    def one(i):
        with lock:
            model.generate(**pst.kwargs(prompts[i], new, pst.StepClock()))
    return run_threads(one, len(prompts))


def run_lock_ctx(model, prompts, new, device):
    lock = threading.Lock()

    def one(i):
        with lock:
            cache = ContextKVCache(model.config, tag=f"l{i}", device=device, chunk_tokens=256)
            try:
                model.generate(**cache_argument(cache), **pst.kwargs(prompts[i], new, pst.StepClock()))
            finally:
                cache.release()
    if device.type == "cuda":
        aqua_alloc.enable(local_budget=4096 * MiB, lend=0)
    try:
        return run_threads(one, len(prompts))
    finally:
        if device.type == "cuda":
            aqua_alloc.disable()


def run_sched(model, prompts, new, device, budget, use_context_cache=None, runner=None):
    if device.type == "cuda":
        aqua_alloc.enable(local_budget=budget, lend=0)
    sched = Scheduler(device=device, policy="fair", slice_steps=5, chunk_tokens=256,
                      use_context_cache=use_context_cache)
    try:
        sched.generate(model, tag="warm", **pst.kwargs(prompts[0], 4, pst.StepClock()))
        pst.TIMES.clear()
        wall = (runner or run_threads)(lambda i: sched.generate(model, tag=f"p{i}", **pst.kwargs(prompts[i], new,
                                                                                               pst.StepClock())),
                                       len(prompts))
        step = pst.TIMES["model step (between hooks, inside a slice)"]
        cpu = pst.TIMES["  its thread CPU time"]
        first = pst.TIMES.get("first step of a slice (after a switch)") or [float("nan")]
        ends = pst.TIMES.get("hook at a slice end (incl. waiting for others)") or [0.0]
        if a_verbose:
            print(f"    steps {len(step)} median {statistics.median(step) * 1e3:.2f} ms, sum {sum(step):.3f} s; "
                  f"first steps of slices {len(first)} median {statistics.median(first) * 1e3:.2f} ms, "
                  f"sum {sum(first):.3f} s; slice-end hooks {len(ends)} sum {sum(ends):.3f} s; wall {wall:.3f} s",
                  flush=True)
        return wall, statistics.median(step) * 1e3, statistics.median(cpu) * 1e3
    finally:
        pst.TIMES.clear()
        sched.shutdown()
        if device.type == "cuda":
            aqua_alloc.disable()


def run_worker(model, prompts, new):
    """fcfs as bench_serve serves it: one long-lived worker thread runs the calls in turn."""
    return POOL1.run(lambda i: model.generate(**pst.kwargs(prompts[i], new, pst.StepClock())), len(prompts),
                     one_at_a_time=True)


class Pool:
    """Long-lived threads (made once, reused every round), as a server's request pool."""

    def __init__(self, n):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=n)
        barrier = threading.Barrier(n)
        list(self.executor.map(lambda _: barrier.wait(), range(n)))  # start all n threads now

    def run(self, target, n, one_at_a_time=False):
        t0 = time.perf_counter()
        if one_at_a_time:
            for i in range(n):
                self.executor.submit(target, i).result()
        else:
            for f in [self.executor.submit(target, i) for i in range(n)]:
                f.result()
        return time.perf_counter() - t0


POOL1: Pool
POOLN: Pool
a_verbose = False  # --verbose: the step breakdown of each scheduled run


def run_threads(target, n):
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt", type=int, default=1000, help="prompt tokens")
    p.add_argument("--new", type=int, default=48, help="new tokens per prompt")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (tiny model)")
    p.add_argument("--verbose", action="store_true", help="the step breakdown of each scheduled run")
    p.add_argument("--variants", default="lock,sched,sched-roomy,lock-ctx,sched-dyn",
                   help="comma-separated, lock first: lock, worker, sched, sched-pool, sched-roomy, lock-ctx, sched-dyn")
    a = p.parse_args()
    if a.rounds < 1 or a.prompts < 1 or a.prompt < 1 or a.new < 2:
        p.error("--rounds, --prompts, --prompt must be >= 1 and --new >= 2")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("probe_sched_paired: needs a CUDA GPU (or --device cpu)", file=sys.stderr)
        return 2
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model("llama-1b" if device.type == "cuda" else "tiny", device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 500, (1, a.prompt), generator=g).to(device) for _ in range(a.prompts)]
    pst.install_timers()
    global POOL1, POOLN, a_verbose
    a_verbose = a.verbose
    POOL1, POOLN = Pool(1), Pool(a.prompts)
    roomy = 4096 * MiB
    variants = {  # name -> () -> (wall s, median model step ms or None)
        "lock": lambda: (run_lock(model, prompts, a.new), None),
        "worker": lambda: (run_worker(model, prompts, a.new), None),
        "sched": lambda: run_sched(model, prompts, a.new, device, 128 * MiB)[:2],
        "sched-pool": lambda: run_sched(model, prompts, a.new, device, 128 * MiB, runner=POOLN.run)[:2],
        "sched-roomy": lambda: run_sched(model, prompts, a.new, device, roomy)[:2],
        "lock-ctx": lambda: (run_lock_ctx(model, prompts, a.new, device), None),
        "sched-dyn": lambda: run_sched(model, prompts, a.new, device, roomy, use_context_cache=False)[:2],
    }
    chosen = a.variants.split(",")
    unknown = [v for v in chosen if v not in variants]
    if unknown or chosen[0] != "lock":
        p.error(f"--variants: lock first, then any of {', '.join(variants)} (unknown: {unknown})")
    tokens = a.prompts * a.new
    ratios: dict[str, list[float]] = {v: [] for v in chosen[1:]}
    with torch.inference_mode():
        run_lock(model, prompts, 4)  # warm-up
        for r in range(1, a.rounds + 1):
            parts = []
            lock_wall = None
            for v in chosen:
                wall, step = variants[v]()
                if lock_wall is None:
                    lock_wall = wall
                else:
                    ratios[v].append(wall / lock_wall)
                text = f"{v} {wall / tokens * 1e3:6.2f} ms/token"
                if step is not None:
                    text += f" (step {step:5.2f})"
                if v != "lock":
                    text += f" x{ratios[v][-1]:.3f}"
                parts.append(text)
            print(f"round {r}: " + " | ".join(parts), flush=True)
    print(f"median over {a.rounds} rounds, ratio to lock: " + "; ".join(
        f"{v} {statistics.median(xs):.3f} ({', '.join(f'{x:.3f}' for x in xs)})" for v, xs in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
