"""Several threads call HuggingFace ``generate`` at once, time-shared fairly by aqua_alloc.

A tiny Llama-shaped model with random weights (built from a config, no download) serves
``--prompts`` prompts of different lengths, one thread each. Every thread's output is checked
against the same call run alone (greedy: token for token), and the per-prompt metrics are
printed: time to first token in scheduler steps, slices, time parked.

    python examples/threaded_generate.py                     # CPU or GPU, scheduling only
    python examples/threaded_generate.py --aqua --local-budget 96MiB --prompt-len 2048 \
        --hidden 1024 --heads 8 --kv-heads 8 --layers 4   # GPU: 64 MiB contexts park to host

With ``--aqua`` (CUDA only) aqua_alloc is enabled first, so each prompt's KV cache lives in its
own context; a small ``--local-budget`` forces parked contexts off the GPU, and the parked
footprint (context bytes over live KV bytes) is reported. The last line is a JSON summary.
Exit status 1 if any output differs from its solo run.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import aqua_alloc
from aqua_alloc.hf.scheduler import Scheduler, SchedulerShutdown, run_threads


def build_model(device: torch.device, layers: int, hidden: int, heads: int, kv_heads: int) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
        initializer_range=0.5, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="concurrent prompts (threads)")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens generated per prompt")
    parser.add_argument("--prompt-len", type=int, default=16, help="tokens of the shortest prompt")
    parser.add_argument("--policy", default="fair", choices=["fair", "rr", "fcfs"])
    parser.add_argument("--slice-steps", type=int, default=5, help="decode steps per slice")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=256, help="tokens per KV chunk of a context")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--aqua", action="store_true", help="enable aqua_alloc (CUDA): KV caches in contexts")
    parser.add_argument("--local-budget", default=None, help="with --aqua: bytes of contexts the GPU keeps (e.g. 8MiB)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model = build_model(device, args.layers, args.hidden, args.heads, args.kv_heads)
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, 512, (1, args.prompt_len + 8 * i), generator=generator).to(device)
              for i in range(args.prompts)]
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    solo = [model.generate(ids, **kwargs) for ids in inputs]  # references: plain transformers, run alone

    if args.aqua:
        settings = {"local_budget": args.local_budget} if args.local_budget else {}
        aqua_alloc.enable(**settings)
    scheduler = Scheduler(device=device, policy=args.policy, slice_steps=args.slice_steps,
                          chunk_tokens=args.chunk_tokens)
    outputs: list[torch.Tensor | None] = [None] * len(inputs)

    def serve(i: int) -> None:
        try:
            outputs[i] = scheduler.generate(model, inputs[i], tag=f"user-{i}", **kwargs)
        except SchedulerShutdown:
            pass   # Ctrl-C: the scheduler was shut down under this prompt

    # Ctrl-C while the threads serve: the scheduler is shut down and every thread joined
    # (run_threads says why a plain join could abort the process).
    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(inputs))]
    interrupted = run_threads(threads, lambda: scheduler.shutdown(wait=False), on_start=lambda: print(
        f"serving {len(inputs)} prompts from {len(inputs)} threads", flush=True))
    if interrupted:
        print("interrupted: every thread stopped", file=sys.stderr)
        return 130

    stats = scheduler.stats()
    scheduler.shutdown()
    identical = [torch.equal(out, ref) for out, ref in zip(outputs, solo)]
    print(f"{'prompt':<8} {'same':>5} {'tokens':>6} {'slices':>6} {'ttft steps':>10} {'parked ms':>9} {'moved MiB':>9}")
    for prompt, same in zip(stats.prompts, identical):
        ttft = prompt.first_token_step - prompt.arrival_step
        print(f"{prompt.tag:<8} {str(same):>5} {prompt.num_tokens:>6} {prompt.num_slices:>6} {ttft:>10} "
              f"{prompt.parked_ns / 1e6:>9.2f} {prompt.bytes_moved / 2**20:>9.2f}")
    summary = {
        "device": str(device), "policy": args.policy, "aqua": aqua_alloc.is_enabled(),
        "identical": all(identical), "num_prompts": len(inputs), "num_steps": stats.num_steps,
        "slices": [s.tag for s in stats.slices],
        "bytes_moved": sum(p.bytes_moved for p in stats.prompts),
        "parked_ns": sum(p.parked_ns for p in stats.prompts),
    }
    # Parked footprint: bytes a parked context held over the live KV bytes in it (target <= 1.1).
    summary["parked_footprint"] = {p.tag: round(p.parked_context_bytes / p.parked_kv_bytes, 3)
                                   for p in stats.prompts if p.parked_kv_bytes}
    print(json.dumps(summary))
    return 0 if all(identical) else 1


if __name__ == "__main__":
    sys.exit(main())
