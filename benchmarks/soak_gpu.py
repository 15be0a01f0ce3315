"""GPU soak: concurrent scheduled generation under a small context budget, bounded in time.

Threads call ``Scheduler.generate`` at once, again and again, on a Llama-shaped model with
random weights; the local budget holds only a few contexts, so every slice switch parks one
context to host and brings another back: thousands of moves. Every output is compared with
the same request run alone with plain transformers (greedy: token for token). Meanwhile
another thread asks a context for more memory than every tier together has: each attempt
must raise ``torch.OutOfMemoryError`` in that thread while the prompts go on.

    python benchmarks/soak_gpu.py --seconds 240

Prints counts and writes a JSON summary (``--out``). Exit status 1 on any mismatch, any
unexpected error, or an out-of-memory that did not surface as torch's error.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import sys
import threading
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import aqua_alloc as aq
from aqua_alloc.memory.config import parse_size
from aqua_alloc.hf.scheduler import Scheduler

MiB, GiB = 1 << 20, 1 << 30


def build_model(layers: int, hidden: int) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192,
                         initializer_range=0.5, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).cuda().eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="how long the soak runs (bounded)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent generate callers")
    parser.add_argument("--requests", type=int, default=16, help="distinct requests (each checked against its solo run)")
    parser.add_argument("--local-budget", default="48MiB", help="bytes of contexts GPU 0 keeps (small: forces moves)")
    parser.add_argument("--host-budget", default="1GiB", help="pinned host bytes for contexts")
    parser.add_argument("--slice-steps", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "soak_gpu.json"))
    parser.add_argument("--oom-period", type=float, default=0.5, help="seconds between out-of-memory attempts (0: none)")
    parser.add_argument("--no-prefetch", action="store_true", help="scheduler without prefetching the next context")
    parser.add_argument("--stack-mib", type=int, default=0, help="thread stack size (MiB; 0: the default)")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash prints every thread's Python stack
    if not torch.cuda.is_available():
        print("soak_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    local_budget = parse_size(args.local_budget, "--local-budget", allow_percent=False)
    host_budget = parse_size(args.host_budget, "--host-budget", allow_percent=False)

    model = build_model(args.layers, args.hidden)
    rng = random.Random(0)
    requests = []
    for i in range(args.requests):
        prompt = torch.randint(0, 1024, (1, rng.randint(64, 768)),
                               generator=torch.Generator().manual_seed(i)).cuda()
        requests.append((prompt, rng.randint(8, 40)))
    kv_per_token = 2 * args.layers * args.hidden * 4  # K and V, fp32, 8 KV heads x 64 dims = hidden
    greedy = dict(do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        solo = [model.generate(p, max_new_tokens=n, min_new_tokens=n, **greedy) for p, n in requests]
    print(f"soak: {len(requests)} requests ({min(p.shape[1] for p, _ in requests)}-"
          f"{max(p.shape[1] for p, _ in requests)} prompt tokens, KV {kv_per_token // 1024} KiB/token), "
          f"solo references in {time.perf_counter() - t0:.1f} s", flush=True)

    aq.enable(local_budget=local_budget, host_budget=host_budget, host_reserve=host_budget)
    if args.stack_mib:
        threading.stack_size(args.stack_mib << 20)
    scheduler = Scheduler(policy="fair", slice_steps=args.slice_steps, prefetch=not args.no_prefetch)
    lock = threading.Lock()
    counts = {"completed": 0, "identical": 0, "mismatched": 0, "errors": 0, "oom_raised": 0, "oom_wrong": 0}
    errors: list[str] = []
    deadline = time.monotonic() + args.seconds

    def caller(k: int) -> None:
        r = random.Random(100 + k)
        n = 0
        while time.monotonic() < deadline:
            i = r.randrange(len(requests))
            prompt, new = requests[i]
            try:
                with torch.inference_mode():
                    out = scheduler.generate(model, prompt, tag=f"t{k}-{n}", max_new_tokens=new, min_new_tokens=new,
                                             **greedy)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    counts["errors"] += 1
                    errors.append(f"caller {k} request {i}: {type(exc).__name__}: {exc}")
                continue
            same = torch.equal(out, solo[i])
            with lock:
                counts["completed"] += 1
                counts["identical" if same else "mismatched"] += 1
            n += 1

    def out_of_memory() -> None:
        # More than every tier has: the GPU's budget, host's budget, and more.
        nbytes = local_budget + host_budget + GiB
        n = 0
        while time.monotonic() < deadline:
            tag = f"oom-{n}"
            try:
                with aq.context(tag):
                    torch.empty(nbytes, dtype=torch.uint8, device="cuda")
                with lock:
                    counts["oom_wrong"] += 1
                    errors.append(f"an allocation of {nbytes} bytes succeeded")
            except torch.OutOfMemoryError:
                with lock:
                    counts["oom_raised"] += 1
            except Exception as exc:  # noqa: BLE001 - the wrong error type
                with lock:
                    counts["oom_wrong"] += 1
                    errors.append(f"out of memory raised {type(exc).__name__}: {exc}")
            aq.release(tag)
            n += 1
            time.sleep(args.oom_period)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(args.threads)]
    if args.oom_period > 0:
        threads.append(threading.Thread(target=out_of_memory))
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        next(t for t in threads if t.is_alive()).join(timeout=10)
        with lock:
            print(f"soak: {time.perf_counter() - t_start:.0f} s: {counts}, {aq.stats()['num_moves']} moves", flush=True)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    stats = aq.stats()
    sched = scheduler.stats()
    summary = {
        "gpu": torch.cuda.get_device_name(0), "seconds": round(elapsed, 1), "threads": args.threads,
        "local_budget": local_budget, "host_budget": host_budget, **counts,
        "num_moves": stats["num_moves"], "bytes_moved": stats["bytes_moved"],
        "moves_to_host": stats["tiers"]["host"]["num_moves_in"], "moves_to_gpu0": stats["tiers"]["gpu0"]["num_moves_in"],
        "scheduler_steps": sched.num_steps, "slices_recorded": len(sched.slices),  # the last 10,000 at most
        "peak_bytes": {t: s["peak"] for t, s in stats["tiers"].items()},
        "errors_sample": errors[:10],
    }
    scheduler.shutdown()
    aq.disable()
    print(json.dumps(summary, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    ok = (counts["mismatched"] == 0 and counts["errors"] == 0 and counts["oom_wrong"] == 0 and counts["completed"] > 0
          and (counts["oom_raised"] > 0 or args.oom_period <= 0))
    print("soak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
