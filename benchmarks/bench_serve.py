"""Serving benchmark: replay a real request trace on one GPU, served by plain generate one at a
time (fcfs), by concurrent threads, by aqua_alloc's fair scheduler parking contexts to host
(aqua-host) or to a peer GPU (aqua-peer), and by transformers' continuous batching (hf-cb).

Every system serves the same requests (the trace's prompt and output lengths, random prompt
ids, a random-weight model of a real shape) at offered loads that are shares of the request
rate fcfs sustains (measured first). Reports time to first token, time per output token,
throughput, failures and peak memory per tier, and each system's ratio to fcfs; checks that
outputs equal the same requests run alone. The logic lives in benchmarks/serve_harness.py (traces:
benchmarks/serve_trace.py; options and the checks that need no torch: benchmarks/serve_options.py).

    python benchmarks/bench_serve.py                                  # llama-1b shape (tiny on CPU), conv trace
    python benchmarks/bench_serve.py --model tiny --device cpu --systems fcfs,aqua-host  # smoke test

--rounds N runs, at each load, every system in turn N times (paired rounds: each run's ratio
to fcfs is to the fcfs run of its own round, so a machine whose speed drifts moves both), and
prints the per-round ratios and their median.

Writes, under --out (default benchmarks/results): bench_serve-<trace>-<gpu>.json (one row per
system, load and round), .meta.json (settings, calibration, per-request records, paired ratios),
.log, -ttft.png, and an aqua_alloc trace per aqua run (with a PNG of bytes per tier for the
highest load).
Exit status: 0; 1 if an output differs from its solo run (fcfs, threads, aqua-*); 2 for bad
arguments (checked before torch is imported, so refused at once; serve_options.py); 130 on Ctrl-C
(every thread of the run in progress stopped and joined first; the results file keeps the runs
that finished; a second Ctrl-C ends the process at once).

Data: Azure LLM inference traces (CC-BY-4.0), Patel et al., "Splitwise", ISCA 2024.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from serve_options import DEFAULT_MODEL, MODEL_DEFAULTS, BenchOptions, System, check_arguments
from serve_trace import BenchInputError, parse_loads, parse_names


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "0", "") else int(text)


def build_parser() -> argparse.ArgumentParser:
    d = BenchOptions()

    def per_model(field: str) -> str:
        return "default per model: " + ", ".join(f"{name} {getattr(defaults, field)}"
                                                 for name, defaults in MODEL_DEFAULTS.items())

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    add = p.add_argument
    add("--trace", default=d.trace, help="conv, code (Azure CSVs), mooncake (JSON lines), conv-excerpt (packaged) or a .csv / .jsonl "
        "path (default %(default)s)")
    add("--traces-dir", default=None, help="directory of the named traces (default: shared/traces near the repo)")
    add("--window-start", type=float, default=d.window_start_s, help="window start, trace s (default %(default)s)")
    add("--window-s", type=float, default=d.window_s, help="window duration, trace s (default %(default)s)")
    add("--max-requests", type=_optional_int, default=d.max_requests,
        help="first requests of the window kept; 0 or none: all (default %(default)s)")
    add("--max-prompt", type=int, default=None, help=f"clip prompts to this many tokens ({per_model('max_prompt')})")
    add("--max-output", type=int, default=None, help=f"clip outputs to this many tokens ({per_model('max_output')})")
    add("--model", default=d.model, choices=list(MODEL_DEFAULTS),
        help=f"model shape, random weights (default {DEFAULT_MODEL['cuda']} on a GPU, {DEFAULT_MODEL['cpu']} on CPU)")
    add("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    add("--kv-budget", default=None, help=f"GPU bytes for contexts, e.g. 256MiB ({per_model('kv_budget')})")
    add("--systems", default=",".join(s.value for s in System), help="comma-separated (default: all)")
    add("--loads", default="0.5,0.8,0.95", help="offered loads, shares of what fcfs sustains (default %(default)s)")
    add("--seed", type=int, default=d.seed, help="weights, prompt ids, correctness sample (default %(default)s)")
    add("--check", type=int, default=d.check,
        help="requests run alone (twice each) first: calibration and output references (default %(default)s)")
    add("--slice-steps", type=int, default=d.slice_steps, help="aqua scheduler slice, steps (default %(default)s)")
    add("--switch-overhead", type=float, default=d.switch_overhead,
        help="aqua scheduler: lengthen the slices of prompts whose switch in costs more than this share of a "
             "slice, e.g. 0.1 (default: fixed slices)")
    add("--newcomer-order", default=d.newcomer_order, choices=["arrival", "shortest"],
        help="aqua scheduler: which waiting prompt gets its prefill first (default %(default)s)")
    add("--chunk-tokens", type=int, default=d.chunk_tokens, help="aqua KV chunk, tokens (default %(default)s)")
    add("--budget-s", type=float, default=d.budget_s,
        help="target seconds for all replays: fewer requests when the estimate is over, and runs that would end "
             "past 1.5x it are cut or skipped; 0: no limit (default %(default)s)")
    add("--min-requests", type=int, default=d.min_requests, help="the budget never trims below (default %(default)s)")
    add("--rounds", type=int, default=d.rounds, metavar="N",
        help="paired rounds: at each load, run every system in turn, N times (round 1: all systems, round 2: all "
             "systems, ...); ratios pair each run with fcfs of the same round, and the per-round ratios and their "
             "median are printed; the time budget counts all N rounds (default %(default)s)")
    add("--out", default=str(d.out_dir), help="output directory (default %(default)s)")
    add("--name", default=None, help="file name stem (default bench_serve-<trace>-<gpu name>)")
    add("--no-plots", action="store_true", help="do not draw PNGs")
    add("--verbose", action="store_true", help="one log line per request")
    add("--cache", default=d.cache, choices=["dynamic", "static"],
        help="KV cache of every generate call: dynamic (transformers' default) or static (transformers' static "
             "cache, its decode step compiled on a GPU; aqua: a static cache in each prompt's context) "
             "(default %(default)s)")
    add("--attn", default=d.attn, choices=["aqua_sdpa", "sdpa"],
        help="every system's attention: aqua_sdpa (transformers' sdpa, except that a one-token step over a static "
             "cache reads each KV head once: aqua_alloc/hf/grouped_attention.py) or sdpa (default %(default)s)")
    add("--deterministic", action="store_true",
        help="deterministic algorithms and cuBLAS (torch.use_deterministic_algorithms): slower steps, for "
             "runs made to check outputs rather than to time them")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; the exit status (see the module docstring)."""
    try:
        return _bench(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: every worker stopped", file=sys.stderr, flush=True)
        return 130


def _bench(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = BenchOptions(
            trace=args.trace, traces_dir=args.traces_dir, window_start_s=args.window_start, window_s=args.window_s,
            max_requests=args.max_requests, max_prompt=args.max_prompt, max_output=args.max_output,
            model=args.model, device=args.device, kv_budget=args.kv_budget,
            systems=parse_names(args.systems, [s.value for s in System], "--systems"),
            loads=parse_loads(args.loads), seed=args.seed, check=args.check, slice_steps=args.slice_steps,
            switch_overhead=args.switch_overhead, newcomer_order=args.newcomer_order,
            chunk_tokens=args.chunk_tokens, budget_s=args.budget_s or None, min_requests=args.min_requests,
            rounds=args.rounds, cache=args.cache, attn=args.attn, deterministic=args.deterministic,
            out_dir=args.out, name=args.name, plots=not args.no_plots, verbose=args.verbose)
        check_arguments(options)  # before torch is imported (seconds): a bad argument is refused at once
    except BenchInputError as e:
        parser.error(str(e))  # exits 2 with the usage line
    if options.deterministic:
        # Deterministic cuBLAS (before CUDA starts): a request's output must not depend on
        # which split-K reduction a GEMM happened to use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from serve_harness import Log, format_table, run_benchmark, write_results  # noqa: PLC0415 - imports torch

    try:
        log = Log()
        log("bench_serve " + " ".join(sys.argv[1:] if argv is None else argv))
        result = run_benchmark(options, log)
    except BenchInputError as e:
        parser.error(str(e))  # exits 2 with the usage line
    log("")
    log(format_table(result.rows))
    files = write_results(result, options.out_dir, log, plots=options.plots)
    if result.ok:
        log("outputs identical to the solo runs for every system that must match (fcfs, threads, aqua-*)")
    else:
        log(f"OUTPUT MISMATCH (must be identical to the solo runs): {', '.join(result.mismatches)}")
    log.write(Path(files["log"]))
    return 0 if result.ok else 1


if __name__ == "__main__":
    status = main()
    # Nothing left to stop: a Ctrl-C during the interpreter's exit ends the process at once
    # (status 130 in a shell) instead of a KeyboardInterrupt in an exit handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(status)
