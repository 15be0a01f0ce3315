"""Cost of tracing: scheduled generate throughput with and without AQUA_TRACE, in one run.

Each measurement is a fresh process (so the exit hook and its dump are real), alternating
off / on `--repeat` times: aqua_alloc enabled, a Llama-shaped model with random weights,
`--prompts` threads calling generate through the fair scheduler with a local budget small
enough to park contexts to host. Throughput counts generated tokens over the wall time of
the scheduled section; the dump itself happens at exit and is timed apart (the child
writes the trace on demand once, then again at exit).

    python benchmarks/bench_trace_overhead.py [--repeat 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import aqua_alloc
    from aqua_alloc.obs import trace
    from aqua_alloc.hf.scheduler import Scheduler

    aqua_alloc.enable(local_budget=args.local_budget, host_reserve="2GiB")  # honours AQUA_TRACE
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    prompts = [torch.randint(0, 32000, (1, args.prompt_len + 64 * i), device="cuda") for i in range(args.prompts)]
    sched = Scheduler(policy="fair", slice_steps=4)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    sched.generate(model, input_ids=prompts[0][:, :16], **kw)  # warm-up
    torch.cuda.synchronize()
    threads = [threading.Thread(target=sched.generate, args=(model,), kwargs=dict(input_ids=p, **kw)) for p in prompts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    result = {"tok_s": args.prompts * args.new_tokens / elapsed, "elapsed_s": elapsed,
              "moves": aqua_alloc.stats()["num_moves"], "trace": bool(os.environ.get("AQUA_TRACE"))}
    if os.environ.get("AQUA_TRACE"):
        t1 = time.perf_counter()
        trace.dump(os.environ["AQUA_TRACE"] + ".ondemand.json")
        result["dump_s"] = time.perf_counter() - t1
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--local-budget", default="128MiB")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    tmp = tempfile.mkdtemp(prefix="aqua-trace-")
    for i in range(args.repeat):
        for mode in ("off", "on"):
            env = dict(os.environ)
            env.pop("AQUA_TRACE", None)
            if mode == "on":
                env["AQUA_TRACE"] = os.path.join(tmp, f"trace-{i}.json")
            cmd = [sys.executable, __file__, "--child", "--prompts", str(args.prompts), "--prompt-len",
                   str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--local-budget", args.local_budget]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            r = json.loads(lines[-1][7:])
            if mode == "on":
                r["trace_bytes"] = os.path.getsize(env["AQUA_TRACE"])
            runs[mode].append(r)
            print(f"run {i} tracing {mode:3s}: {r['tok_s']:8.1f} tok/s  ({r['moves']} moves)"
                  + (f"  on-demand dump {r['dump_s'] * 1e3:.1f} ms, exit trace {r['trace_bytes']} bytes"
                     if mode == "on" else ""), flush=True)
    off = statistics.median(r["tok_s"] for r in runs["off"])
    on = statistics.median(r["tok_s"] for r in runs["on"])
    summary = {"tok_s_off": off, "tok_s_on": on, "slowdown": 1 - on / off, "runs": runs}
    print(f"median tok/s: without AQUA_TRACE {off:.1f}, with {on:.1f}: {100 * (1 - on / off):+.2f}% slower")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
