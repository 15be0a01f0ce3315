"""Does a server that makes a new static cache per request keep its CUDA graphs? (GPU probe)

transformers compiles the decode step on a static cache with CUDA graphs (``torch.compile``
mode ``reduce-overhead``). The cache's tensors are static inputs of the graph (transformers
marks their addresses static), so a new cache, at new addresses, makes torch's CUDA graph
trees record a new graph; torch (``torch._inductor.config.triton.cudagraph_unexpected_rerecord_limit``,
128) may stop recording after enough of them and run the step without graphs from then on.
aqua_alloc's generate hook and ``Scheduler`` make one ``ContextStaticCache`` per request, so
a long-running server could cross that limit, unless new caches land at the addresses of
released ones. This probe serves ``--requests`` requests of the
same bucket one after another, twice, on the llama-1b shape with aqua_alloc on:

- ``new``: a new ``ContextStaticCache`` (own context) per request, as the hook makes them;
- ``reused``: one ``ContextStaticCache`` for the bucket, ``reset()`` between requests.

Per request: ms/token (median decode step), the first decode step (a graph recording when
the cache is new), and torch's count of CUDA graph skips so far. Tokens of every request are
compared with the first request's (same prompt: they must be equal).

    python benchmarks/probe_graph_rerecord.py [--requests 200] [--new 16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters
from transformers import StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aqua_alloc as aq  # noqa: E402
from aqua_alloc.hf.generate_hook import cache_argument  # noqa: E402
from aqua_alloc.hf.static_cache import ContextStaticCache, static_cache_length  # noqa: E402
from probe_static_attention import StepClock  # noqa: E402 - host time at each step, the device synchronised
from serve_harness import build_model  # noqa: E402


def serve(model: Any, prompt: torch.Tensor, new: int, requests: int, mode: str) -> list[dict[str, Any]]:
    """``requests`` generate calls on one bucket; a new cache per call (``new``) or one reset cache (``reused``)."""
    length = static_cache_length(prompt.shape[1] + new)
    shared = ContextStaticCache(model.config, max_cache_len=length, tag=f"probe-{mode}", device=prompt.device) \
        if mode == "reused" else None
    rows = []
    try:
        for i in range(requests):
            cache = shared if shared is not None else ContextStaticCache(
                model.config, max_cache_len=length, tag=f"probe-{mode}-{i}", device=prompt.device)
            if shared is not None and i:
                shared.reset()
            clock = StepClock()
            try:
                out = model.generate(prompt, **cache_argument(cache), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, stopping_criteria=StoppingCriteriaList([clock]))
            finally:
                if shared is None:
                    cache.release()
            steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
            rows.append({"mode": mode, "request": i, "first_step_ms": 1000 * steps[0],
                         "ms_per_token": 1000 * statistics.median(steps[1:]),
                         "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
                         "tokens": out[0, prompt.shape[1]:].tolist()})
    finally:
        if shared is not None:
            shared.release()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--new", type=int, default=16, help="new tokens per request")
    parser.add_argument("--prompt", type=int, default=200, help="prompt tokens")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    limit = torch._inductor.config.triton.cudagraph_unexpected_rerecord_limit
    print(f"torch {torch.__version__}; cudagraph_unexpected_rerecord_limit {limit}", flush=True)
    aq.enable(lend="0")
    model = build_model("llama-1b", torch.device("cuda"))
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    result: dict[str, Any] = {"torch": torch.__version__, "rerecord_limit": limit, "requests": args.requests,
                              "new_tokens": args.new, "prompt_tokens": args.prompt, "modes": {}}
    with torch.inference_mode():
        for mode in ("reused", "new"):
            torch._dynamo.reset()
            counters.clear()
            t = time.perf_counter()
            rows = serve(model, prompt, args.new, args.requests, mode)
            wall = time.perf_counter() - t
            ref = rows[0]["tokens"]
            same = all(r["tokens"] == ref for r in rows)
            for r in rows:
                r.pop("tokens")
            tail = [r["ms_per_token"] for r in rows[-20:]]
            head = [r["ms_per_token"] for r in rows[1:21]]
            summary = {"wall_s": wall, "first_request_first_step_ms": rows[0]["first_step_ms"],
                       "median_first_step_ms_after_first": statistics.median(r["first_step_ms"] for r in rows[1:]),
                       "ms_per_token_requests_2_to_21": statistics.median(head),
                       "ms_per_token_last_20": statistics.median(tail),
                       "cudagraph_skips": rows[-1]["cudagraph_skips"], "same_tokens": same, "rows": rows}
            result["modes"][mode] = summary
            print(f"{mode:>7}: {args.requests} requests in {wall:.1f} s; ms/token requests 2-21 "
                  f"{summary['ms_per_token_requests_2_to_21']:.2f}, last 20 {summary['ms_per_token_last_20']:.2f}; "
                  f"first decode step: request 1 {summary['first_request_first_step_ms']:.0f} ms, later median "
                  f"{summary['median_first_step_ms_after_first']:.1f} ms; "
                  f"cudagraph skips {summary['cudagraph_skips']}; tokens equal across requests: {same}", flush=True)
            for r in rows:
                if r["request"] % 25 == 0 or r["request"] == args.requests - 1:
                    print(f"    {mode} request {r['request']:4d}: {r['ms_per_token']:.2f} ms/token, first step "
                          f"{r['first_step_ms']:.1f} ms, skips {r['cudagraph_skips']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
