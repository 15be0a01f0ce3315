"""The scheduler's cost per token, measured in pairs that cancel the machine's drift (GPU probe).

bench_serve found aqua-host at 0.79 to 0.97 of fcfs's output tokens/s at load 0.8 (median
0.85), and probe_step_time.py found four scheduled prompts 18% slower per token than the same
four generate calls taking a lock; but those runs measured each system minutes apart on a
machine whose decode step drifts between 16 and 34 ms. Here each round runs, back to back in
one process, the same prompts:

- ``lock``: N plain ``generate`` calls in N threads taking a lock (fcfs, a thread per request);
- ``sched``: the same N prompts through ``Scheduler(policy="fair")`` with aqua_alloc on and a
  KV budget (bench_serve's: 128 MiB, contexts parked to host at switches);
- ``sched-roomy``: the same with a budget that holds every context (no move);
- ``lock-ctx``: ``lock`` with aqua_alloc on (roomy budget) and each call's KV in a
  ``ContextKVCache`` context: the context cache's cost without the scheduler;
- ``sched-dyn``: the scheduler with aqua_alloc on (roomy) but transformers' ``DynamicCache``
  (``use_context_cache=False``): the scheduler's cost without the context cache;

and reports each round's ms per token overall, the median model step (between two scheduler
hooks, wall and thread CPU) and the ratio sched / lock of the same round, then the medians over
rounds. The llama-1b shape in bf16 with random weights, cuDNN attention off, as bench_serve.

    python benchmarks/probe_sched_paired.py [--rounds 5] [--prompts 4] [--prompt 1000] [--new 48]
"""

from __future__ import annotations

import argparse
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
from aqua_alloc.kv_cache import ContextKVCache  # noqa: E402
from aqua_alloc.scheduler import Scheduler  # noqa: E402
from aqua_alloc.serve_bench import build_model  # noqa: E402

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
                model.generate(past_key_values=cache, **pst.kwargs(prompts[i], new, pst.StepClock()))
            finally:
                cache.release()
    if device.type == "cuda":
        aqua_alloc.enable(local_budget=4096 * MiB, lend=0)
    try:
        return run_threads(one, len(prompts))
    finally:
        if device.type == "cuda":
            aqua_alloc.disable()


def run_sched(model, prompts, new, device, budget, use_context_cache=None):
    if device.type == "cuda":
        aqua_alloc.enable(local_budget=budget, lend=0)
    sched = Scheduler(device=device, policy="fair", slice_steps=5, chunk_tokens=256,
                      use_context_cache=use_context_cache)
    try:
        sched.generate(model, tag="warm", **pst.kwargs(prompts[0], 4, pst.StepClock()))
        pst.TIMES.clear()
        wall = run_threads(lambda i: sched.generate(model, tag=f"p{i}", **pst.kwargs(prompts[i], new,
                                                                                    pst.StepClock())), len(prompts))
        step = pst.TIMES["model step (between hooks, inside a slice)"]
        cpu = pst.TIMES["  its thread CPU time"]
        return wall, statistics.median(step) * 1e3, statistics.median(cpu) * 1e3
    finally:
        pst.TIMES.clear()
        sched.shutdown()
        if device.type == "cuda":
            aqua_alloc.disable()


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
    tokens = a.prompts * a.new
    ratios, ratios_roomy, ratios_ctx, ratios_dyn = [], [], [], []
    with torch.inference_mode():
        run_lock(model, prompts, 4)  # warm-up
        for r in range(1, a.rounds + 1):
            lock_wall = run_lock(model, prompts, a.new)
            wall, step, cpu = run_sched(model, prompts, a.new, device, 128 * MiB)
            roomy_wall, roomy_step, roomy_cpu = run_sched(model, prompts, a.new, device, 4096 * MiB)
            ctx_wall = run_lock_ctx(model, prompts, a.new, device)
            dyn_wall, dyn_step, dyn_cpu = run_sched(model, prompts, a.new, device, 4096 * MiB, use_context_cache=False)
            ratios.append(wall / lock_wall)
            ratios_roomy.append(roomy_wall / lock_wall)
            ratios_ctx.append(ctx_wall / lock_wall)
            ratios_dyn.append(dyn_wall / lock_wall)
            print(f"round {r}: lock {lock_wall / tokens * 1e3:6.2f} ms/token | sched {wall / tokens * 1e3:6.2f} "
                  f"(step {step:5.2f} ms, CPU {cpu:5.2f}) x{ratios[-1]:.3f} | sched-roomy "
                  f"{roomy_wall / tokens * 1e3:6.2f} (step {roomy_step:5.2f}, CPU {roomy_cpu:5.2f}) "
                  f"x{ratios_roomy[-1]:.3f} | lock-ctx {ctx_wall / tokens * 1e3:6.2f} x{ratios_ctx[-1]:.3f} | "
                  f"sched-dyn {dyn_wall / tokens * 1e3:6.2f} (step {dyn_step:5.2f}) x{ratios_dyn[-1]:.3f}", flush=True)
    print(f"median over {a.rounds} rounds: sched / lock {statistics.median(ratios):.3f} "
          f"({', '.join(f'{x:.3f}' for x in ratios)}); sched-roomy / lock {statistics.median(ratios_roomy):.3f}; "
          f"lock-ctx / lock {statistics.median(ratios_ctx):.3f}; sched-dyn / lock {statistics.median(ratios_dyn):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
