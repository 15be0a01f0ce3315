"""A lender takes its memory back while a scheduler serves prompts whose parked contexts it
holds: every output must equal its solo run, no request may fail, and the time until the
memory is back is reported. Needs two GPUs.

    python benchmarks/reclaim_under_load.py --out benchmarks/results/reclaim_under_load-2gpu-h200.json

GPU 0 runs a model (``--model``, random weights) and a fair :class:`Scheduler` over
``--prompts`` prompts of ``--prompt-tokens`` tokens, each generating ``--new-tokens``
tokens greedily in its own thread; its local budget holds ``--local-contexts`` contexts, so
the others' KV is parked on GPU 1, which lends. Two phases, each with all prompts at once:

- ``reclaim``: GPU 1 lends up to ``--lend``; once it holds at least ``--trigger`` bytes
  of parked contexts, the main thread calls ``aqua_alloc.reclaim(1)`` (everything it lends).
- ``own-allocations``: GPU 1's lend budget is elastic (its free memory less
  ``--lend-margin``, re-read every ``--lend-poll-ms``); at the same trigger the main thread
  allocates on GPU 1, outside any context, enough that the budget falls to nothing.

Each phase reports the bytes GPU 1 held for others at the trigger, the seconds until it
held none (``lent_zero_s``: the reclaim's moves, parked contexts at once and running ones
at their next step), what ``reclaim()`` returned, the requests finished and failed, and
which outputs differ from their solo runs. The solo runs (each prompt alone through the
same scheduler, same settings) come first. Outputs are compared with deterministic
algorithms on (``--no-deterministic`` for kernels as users run them): this run checks
correctness and times a reclaim, not decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

import aqua_alloc as aq
from aqua_alloc.hf.scheduler import Scheduler
from aqua_alloc.memory.config import parse_size

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_harness import MODELS, build_model, kv_bytes_per_token  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
PHASES = ("reclaim", "own-allocations")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b", choices=tuple(MODELS))
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--slice-steps", type=int, default=4)
    p.add_argument("--local-contexts", type=int, default=2, help="contexts GPU 0's local budget holds")
    p.add_argument("--lend", default="8GiB", help="GPU 1's fixed lend budget in the reclaim phase")
    p.add_argument("--lend-margin", default="8GiB", help="free memory GPU 1 keeps in the elastic phase")
    p.add_argument("--lend-poll-ms", type=int, default=20, help="how often the elastic budget is re-read")
    p.add_argument("--trigger", default=None, help="bytes parked on GPU 1 that start the reclaim "
                                                   "(default: two contexts)")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--timeout-s", type=float, default=120.0, help="per phase")
    p.add_argument("--no-deterministic", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for name in ("prompts", "prompt_tokens", "new_tokens", "slice_steps", "local_contexts", "lend_poll_ms"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a whole number, at least 1")
    args.phase_list = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = [s for s in args.phase_list if s not in PHASES]
    if unknown or not args.phase_list:
        p.error(f"--phases: {', '.join(unknown) or 'none given'}; expected some of {', '.join(PHASES)}")
    try:
        args.lend_bytes = parse_size(args.lend, "--lend", allow_percent=False)
        args.lend_margin_bytes = parse_size(args.lend_margin, "--lend-margin", allow_percent=False)
        args.trigger_bytes = None if args.trigger is None else parse_size(args.trigger, "--trigger", allow_percent=False)
    except ValueError as e:
        p.error(str(e))
    return args


def lent_on(device: int) -> int:
    return int(aq.stats()["tiers"][f"gpu{device}"]["lent"])


def serve(model: Any, prompts: list[torch.Tensor], args: argparse.Namespace,
          on_trigger: Any = None, trigger_bytes: int = 0) -> dict[str, Any]:
    """Runs every prompt in its own thread through one fair scheduler. With `on_trigger`,
    the main thread calls it once GPU 1 holds `trigger_bytes` for others, and measures the
    time until it holds none. Returns tokens per prompt (None if it failed) and timings."""
    sched = Scheduler(policy="fair", slice_steps=args.slice_steps)
    tokens: list[list[int] | None] = [None] * len(prompts)
    errors: dict[int, str] = {}

    def work(i: int) -> None:
        try:
            out = sched.generate(model, prompts[i], tag=f"p{i}", max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False)
            tokens[i] = out[0, prompts[i].shape[1]:].tolist()
        except Exception as e:  # a failed request is reported, not raised: the others go on
            errors[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=work, args=(i,), name=f"prompt-{i}") for i in range(len(prompts))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    result: dict[str, Any] = {"triggered": False}
    peak_lent = 0
    deadline = t0 + args.timeout_s
    while on_trigger is not None and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        lent = lent_on(1)
        peak_lent = max(peak_lent, lent)
        if lent >= trigger_bytes:
            t_trigger = time.monotonic()
            result.update(triggered=True, lent_at_trigger=lent, trigger_at_s=t_trigger - t0)
            result["action"] = on_trigger()
            while lent_on(1) > 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            result["lent_zero_s"] = time.monotonic() - t_trigger if lent_on(1) == 0 else None
            result["gpu1_free_after_bytes"] = torch.cuda.mem_get_info(1)[0]
            break
        time.sleep(0.002)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    stats = sched.stats()
    sched.shutdown(wait=not hung, timeout=5)
    result.update(tokens=tokens, errors=errors, hung=hung, wall_s=time.monotonic() - t0, peak_lent_seen=peak_lent,
                  bytes_moved=sum(p.bytes_moved for p in stats.prompts))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.cuda.device_count() < 2:
        print(f"reclaim_under_load: needs two GPUs (GPU 1 lends); this machine has {torch.cuda.device_count()}",
              file=sys.stderr)
        return 2
    if not args.no_deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # No NaN fill of new tensors: the own-allocations phase allocates most of GPU 1.
        torch.utils.deterministic.fill_uninitialized_memory = False
    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    model = build_model(args.model, device, args.seed)
    kv_context = kv_bytes_per_token(model) * (args.prompt_tokens + args.new_tokens)
    trigger = args.trigger_bytes if args.trigger_bytes is not None else 2 * kv_context
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    prompts = [torch.randint(10, model.config.vocab_size, (1, args.prompt_tokens), generator=gen).to(device)
               for _ in range(args.prompts)]
    local_budget = args.local_contexts * kv_context + 64 * MiB  # room for the contexts' rounding
    print(f"model {args.model}; {args.prompts} prompts of {args.prompt_tokens} tokens, {args.new_tokens} new; "
          f"KV per context {kv_context / MiB:.0f} MiB; GPU 0 local budget {local_budget / MiB:.0f} MiB; "
          f"trigger at {trigger / MiB:.0f} MiB parked on GPU 1; "
          f"{'deterministic' if not args.no_deterministic else 'kernels as users run them'}", flush=True)
    report: dict[str, Any] = {"benchmark": "reclaim_under_load", "args": {k: v for k, v in vars(args).items()
                                                                        if isinstance(v, (int, float, str, list))},
                              "gpus": [torch.cuda.get_device_name(d) for d in range(torch.cuda.device_count())],
                              "versions": {"torch": torch.__version__}, "kv_bytes_per_context": kv_context,
                              "phases": {}}

    aq.enable(local_budget={0: local_budget}, lend={0: 0, 1: args.lend_bytes}, lend_poll_ms=args.lend_poll_ms,
              lend_margin=args.lend_margin_bytes)
    try:
        with torch.inference_mode():
            serve(model, prompts[:1], args)  # warm-up; then each prompt alone
            solo_tokens = []
            for i in range(args.prompts):
                r = serve(model, prompts[i:i + 1], args)
                if r["errors"] or r["hung"]:
                    raise RuntimeError(f"solo run of prompt {i} failed: {r['errors'] or r['hung']}")
                solo_tokens.append(r["tokens"][0])
            failures = 0
            for phase in args.phase_list:
                aq.lend(1, args.lend_bytes)  # back to lending before each phase
                hog: list[torch.Tensor] = []
                if phase == "reclaim":
                    def act() -> dict[str, Any]:
                        res = aq.reclaim(1, timeout=10.0)
                        return {"moved_bytes": res.moved_bytes, "pending_bytes": res.pending_bytes,
                                "seconds": res.seconds}
                else:
                    aq.lend(1, None)  # elastic: free memory less the margin

                    def act() -> dict[str, Any]:
                        free, _ = torch.cuda.mem_get_info(1)
                        lent = lent_on(1)
                        # After this the budget (lent + free - margin) is at most zero.
                        nbytes = max(0, free - args.lend_margin_bytes + lent)
                        hog.append(torch.empty(nbytes, dtype=torch.uint8, device="cuda:1"))
                        return {"allocated_bytes": nbytes, "free_before_bytes": free}
                r = serve(model, prompts, args, on_trigger=act, trigger_bytes=trigger)
                hog.clear()
                torch.cuda.empty_cache()
                differ = [i for i, t in enumerate(r["tokens"]) if t is not None and t != solo_tokens[i]]
                row = {k: v for k, v in r.items() if k != "tokens"}
                row.update(num_finished=sum(t is not None for t in r["tokens"]), outputs_differ=differ)
                report["phases"][phase] = row
                ok = r["triggered"] and not r["errors"] and not r["hung"] and not differ and r.get("lent_zero_s")
                failures += not ok
                print(f"{phase}: triggered {r['triggered']} with {r.get('lent_at_trigger', 0) / MiB:.0f} MiB on GPU 1; "
                      f"lent back to 0 in {r.get('lent_zero_s')} s; action {r.get('action')}; "
                      f"finished {row['num_finished']} of {args.prompts}, errors {r['errors'] or 0}, "
                      f"hung {r['hung'] or 0}, outputs differing from solo {differ or 'none'}; "
                      f"{r['wall_s']:.1f} s", flush=True)
    finally:
        aq.disable()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
