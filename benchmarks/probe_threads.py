"""Is work slower in a non-main Python thread on this machine, and which kind of work?
(GPU probe, no aqua_alloc.) Runs each loop in the main thread and in a new thread, and
prints wall and thread-CPU ms: pure Python, small CPU torch ops, CUDA kernel launches, and
one decode step of the llama-1b shape in bf16 through generate.

    python benchmarks/probe_threads.py [cpu] [--no-cudnn-sdp]
"""
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

from serve_harness import build_model  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--")]
dev = torch.device(args[0] if args else "cuda")
if "--no-cudnn-sdp" in sys.argv:  # SDPA without cuDNN attention (flash / memory-efficient instead)
    torch.backends.cuda.enable_cudnn_sdp(False)
print(f"cpus {os.cpu_count()}, affinity {sorted(os.sched_getaffinity(0))}, psutil {psutil.cpu_count()} "
      f"(physical {psutil.cpu_count(logical=False)}); switch interval {sys.getswitchinterval()} s; "
      f"torch threads {torch.get_num_threads()}; cudnn sdp {torch.backends.cuda.cudnn_sdp_enabled()}", flush=True)


def measure(fn):
    """(wall ms, thread CPU ms) of fn()."""
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - w) * 1e3, (time.thread_time() - c) * 1e3


def both(name, fn, repeat=3):
    out = {}

    def in_thread():
        res = []
        t = threading.Thread(target=lambda: res.extend(measure(fn) for _ in range(repeat)))
        t.start()
        t.join()
        return res
    for where, runs in (("main", lambda: [measure(fn) for _ in range(repeat)]), ("thread", in_thread)):
        res = runs()
        out[where] = res[-1]
    print(f"{name:45s} main {out['main'][0]:8.2f} ms wall {out['main'][1]:8.2f} ms cpu | new thread "
          f"{out['thread'][0]:8.2f} ms wall {out['thread'][1]:8.2f} ms cpu", flush=True)


def python_loop():
    s = 0
    for i in range(2_000_000):
        s += i
    return s


small = torch.ones(16)


def torch_cpu_ops():
    x = small
    for _ in range(20_000):
        x = x + 1


g = torch.ones(16, device=dev)


def cuda_launches():
    x = g
    for _ in range(5_000):
        x = x + 1
    if dev.type == "cuda":
        torch.cuda.synchronize()


both("pure Python loop (2M adds)", python_loop)
both("20k small CPU torch adds", torch_cpu_ops)
both("5k tiny kernels on " + dev.type, cuda_launches)


class StepClock(StoppingCriteria):
    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores, **kw):
        self.t.append((time.perf_counter(), time.thread_time()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


model = build_model("llama-1b" if dev.type == "cuda" else "tiny", dev)
p = torch.randint(1, 500, (1, 1000 if dev.type == "cuda" else 50)).to(dev)


def decode():
    c = StepClock()
    model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=24, min_new_tokens=24,
                   do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([c]))
    wall = statistics.median(b[0] - a[0] for a, b in zip(c.t[1:], c.t[2:])) * 1e3
    cpu = statistics.median(b[1] - a[1] for a, b in zip(c.t[1:], c.t[2:])) * 1e3
    print(f"    decode step: {wall:.2f} ms wall, {cpu:.2f} ms thread CPU "
          f"({'main' if threading.current_thread() is threading.main_thread() else 'new'} thread)", flush=True)


both("generate, 24 tokens after a 1000-token prompt", decode, repeat=2)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t = threading.Thread(target=decode)
    t.start()
    t.join()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    decode()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
