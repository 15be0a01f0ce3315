"""Why is a decode step slower through aqua_alloc than through plain generate? (GPU probe)

The llama-1b shape in bf16, the settings of bench_serve (deterministic algorithms and
cuBLAS). First one prompt run each way (plain generate, our KV cache outside any context);
then the same prompts as plain generate calls in threads taking a lock (fcfs with a thread
per request, the baseline); then through the scheduler, one prompt and several at once, in
variants (prefetch off, a budget that holds them all, longer slices), with the time of each
decode step split into the model's work (wall and thread CPU) and the scheduler's hook
(timing wrappers added by this probe).

    python benchmarks/probe_step_time.py [--prompt 1000] [--new 64] [--concurrent 4] [--no-cudnn-sdp]

results/probe_step_time-cudnn-on-*.log came from an earlier form of this script (no lock
baseline, no thread CPU); -cudnn-off-*.log from this one.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import threading
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

import aqua_alloc  # noqa: E402
from aqua_alloc.hf.generate_hook import cache_argument  # noqa: E402
from aqua_alloc.hf.kv_cache import ContextKVCache  # noqa: E402
from aqua_alloc.hf.scheduler import Scheduler  # noqa: E402
from serve_harness import build_model  # noqa: E402


class StepClock(StoppingCriteria):
    """Host time at the end of each decode step (generate syncs on its stop check each step)."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.t.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def ms_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.t[1:], self.t[2:])]
        return statistics.median(gaps) * 1e3 if gaps else float("nan")


def kwargs(prompt: torch.Tensor, new: int, clock: StepClock) -> dict:
    return dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))


# ---- timing wrappers around the scheduler's phases (probe only) ----
TIMES: dict[str, list[float]] = collections.defaultdict(list)
_tls = threading.local()


def timed(name, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TIMES[name].append(time.perf_counter() - t0)
    return wrapper


orig_on_step = Scheduler._on_step


def on_step(self, prompt, input_ids):
    t_in, cpu_in = time.perf_counter(), time.thread_time()
    last = getattr(_tls, "t_out", None)
    in_slice = prompt.slice_num_steps  # steps done in this slice before this one
    if last is not None and in_slice >= 1:
        TIMES["model step (between hooks, inside a slice)"].append(t_in - last)
        TIMES["  its thread CPU time"].append(cpu_in - _tls.cpu_out)
    elif last is not None:  # the thread just got the device back (its last hook returned then)
        TIMES["first step of a slice (after a switch)"].append(t_in - last)
    slice_ends = prompt.slice_num_steps + 1 >= self.slice_steps
    try:
        return orig_on_step(self, prompt, input_ids)
    finally:
        t_out = time.perf_counter()
        _tls.cpu_out = time.thread_time()
        TIMES["hook at a slice end (incl. waiting for others)" if slice_ends else "hook inside a slice"].append(
            t_out - t_in)
        _tls.t_out = t_out


def install_timers():
    Scheduler._on_step = on_step
    for name in ("_resume", "_park", "_prefetch_next", "_begin_slice", "_unprefetch_locked"):
        setattr(Scheduler, name, timed(name, getattr(Scheduler, name)))


def report(label, wall, tokens):
    print(f"  {label}: {tokens} tokens in {wall:.2f} s = {wall / tokens * 1e3:.2f} ms per token overall", flush=True)
    for name, xs in sorted(TIMES.items()):
        print(f"    {name:50s} n={len(xs):5d} total {sum(xs):8.3f} s  median {statistics.median(xs) * 1e3:8.3f} ms"
              f"  max {max(xs) * 1e3:8.2f} ms", flush=True)
    TIMES.clear()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=1000)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--concurrent", type=int, default=4)
    p.add_argument("--no-cudnn-sdp", action="store_true", help="SDPA without cuDNN attention")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (tiny model, no aqua_alloc)")
    a = p.parse_args()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if a.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    print(f"cudnn sdp {torch.backends.cuda.cudnn_sdp_enabled()}", flush=True)
    dev = torch.device(a.device)
    model = build_model("llama-1b" if dev.type == "cuda" else "tiny", dev)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 500, (1, a.prompt), generator=g).to(dev) for _ in range(a.concurrent)]

    def run(name, fn, repeat=2):
        ms = []
        for _ in range(repeat):
            clock = StepClock()
            fn(clock)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ms.append(clock.ms_per_step())
        print(f"{name:55s} {ms[-1]:8.2f} ms/step (first run {ms[0]:.2f})", flush=True)

    with torch.inference_mode():
        run("plain generate (DynamicCache)", lambda c: model.generate(**kwargs(prompts[0], a.new, c)))
        run("generate + ContextKVCache, no context",
            lambda c: model.generate(**kwargs(prompts[0], a.new, c), **cache_argument(ContextKVCache(model.config))))
        lock = threading.Lock()
        clocks = [StepClock() for _ in range(a.concurrent)]

        def serialized(i):
            with lock:
                model.generate(**kwargs(prompts[i], a.new, clocks[i]))
        t0 = time.perf_counter()
        threads = [threading.Thread(target=serialized, args=(i,)) for i in range(a.concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        print(f"plain generate, {a.concurrent} threads one at a time (a lock): {wall / (a.concurrent * a.new) * 1e3:.2f} "
              f"ms per token overall; ms/step {[round(c.ms_per_step(), 2) for c in clocks]}", flush=True)
        install_timers()
        for budget_mib, prefetch, slice_steps in ((128, True, 5), (128, False, 5), (1024, True, 5), (128, True, 20)):
            if dev.type == "cuda":
                aqua_alloc.enable(local_budget=budget_mib << 20, lend=0)
            sched = Scheduler(device=dev, policy="fair", slice_steps=slice_steps, chunk_tokens=256, prefetch=prefetch)
            label = f"budget {budget_mib} MiB, prefetch {prefetch}, slice {slice_steps}"
            c = StepClock()
            sched.generate(model, tag="warm", **kwargs(prompts[0], 8, c))
            TIMES.clear()
            t0 = time.perf_counter()
            c = StepClock()
            sched.generate(model, tag="one", **kwargs(prompts[0], a.new, c))
            report(f"{label}, one prompt ({c.ms_per_step():.2f} ms/step)", time.perf_counter() - t0, a.new)
            threads = []
            moves = (lambda: aqua_alloc.stats()["num_moves"]) if dev.type == "cuda" else (lambda: 0)
            moves0 = moves()
            t0 = time.perf_counter()
            for i in range(a.concurrent):
                t = threading.Thread(target=lambda i=i: sched.generate(
                    model, tag=f"c{i}", **kwargs(prompts[i], a.new, StepClock())))
                threads.append(t)
                t.start()
            for t in threads:
                t.join()
            report(f"{label}, {a.concurrent} prompts at once ({moves() - moves0} moves)",
                   time.perf_counter() - t0, a.concurrent * a.new)
            sched.shutdown()
            if dev.type == "cuda":
                aqua_alloc.disable()


if __name__ == "__main__":
    main()
