"""Why is the same decode step 16 ms in one run and 55 ms in another, on the same thread?
(GPU probe, no aqua_alloc.) A decode step is CPU-bound here (kernel launches); this times it
(1) back to back on one thread, (2) after the thread slept, (3) when four threads take turns
(the scheduler's pattern: one runs a slice of 5 steps while the others wait), and (2)/(3)
again with every thread pinned to one CPU core.

    python benchmarks/probe_cpu_warmth.py [cpu]
"""
import os
import statistics
import sys
import threading
import time

import psutil
import torch
from transformers import DynamicCache

from serve_harness import build_model

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
model = build_model("llama-1b" if dev.type == "cuda" else "tiny", dev)
PROMPT = 1000 if dev.type == "cuda" else 50
caches = []
with torch.no_grad():
    for i in range(4):
        c = DynamicCache(config=model.config)
        model(input_ids=torch.randint(1, 500, (1, PROMPT), device=dev), past_key_values=c)
        caches.append(c)
tok = torch.ones((1, 1), dtype=torch.long, device=dev)


def step(i: int) -> float:
    """One decode step on cache i (then cropped back, so every step sees the same length); ms."""
    t = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=tok, past_key_values=caches[i])
        out.logits[0, -1].argmax().item()
    extra = caches[i].get_seq_length() - PROMPT
    try:
        caches[i].crop(PROMPT)          # transformers <= 5.17: keep the first PROMPT tokens
    except ValueError:
        caches[i].crop(-extra)          # later 5.x: remove that many tokens
    return (time.perf_counter() - t) * 1e3


def pin():
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # this thread only


def report(name, xs):
    print(f"{name:62s} median {statistics.median(xs):7.2f} ms  min {min(xs):7.2f}  max {max(xs):7.2f}  (n={len(xs)})",
          flush=True)


def back_to_back():
    report("one thread, steps back to back", [step(0) for _ in range(60)])


def after_sleep(pinned):
    def body():
        if pinned:
            pin()
        xs = []
        for _ in range(12):
            time.sleep(0.3)
            xs += [step(0) for _ in range(5)]
        report(f"one thread, 5 steps after each 0.3 s sleep{', pinned' if pinned else ''}", xs)
    t = threading.Thread(target=body)
    t.start()
    t.join()


def taking_turns(pinned, n=4, turns=8, slice_steps=5):
    cond = threading.Condition()
    state = {"turn": 0}
    xs = []

    def body(i):
        if pinned:
            pin()
        for k in range(turns):
            with cond:
                while state["turn"] % n != i:
                    cond.wait()
            xs.extend(step(i) for _ in range(slice_steps))
            with cond:
                state["turn"] += 1
                cond.notify_all()
    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    report(f"{n} threads taking turns, {slice_steps} steps each{', pinned to one core' if pinned else ''}", xs)


print(f"cpu freq {psutil.cpu_freq()}", flush=True)
for _ in range(2):
    back_to_back()
    after_sleep(False)
    after_sleep(True)
    taking_turns(False)
    taking_turns(True)
    taking_turns(False, slice_steps=20, turns=3)
