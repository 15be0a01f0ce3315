"""Long-prompt benchmark: one prompt whose KV cache is larger than the GPU memory it may use.

A Llama-3.1-8B-shaped model (random weights, bf16; no download) gets one prompt of
``--prompt-tokens`` tokens and decodes ``--new-tokens`` tokens greedily. Its KV cache
(128 KiB per token for this shape) is capped on the local GPU at ``--local-kv`` bytes
(default: half the KV), standing for a GPU too small for the whole context. Compared in
the same run, on the same prompt:

- ``local``: transformers' DynamicCache with no cap, eager: the ceiling users of plain
  transformers get by default (everything on the GPU);
- ``static``: transformers' ``StaticCache`` of the aqua systems' length, no cap; ``generate``
  compiles its decode step (CUDA graphs): the fastest plain transformers offers;
- ``static-sdpa`` (``--cache static``, when ``--attn`` is not ``sdpa``): the same with
  transformers' default attention, what a user gets without choosing one;
- ``aqua-local``: aqua_alloc's cache with no cap (the cache's own cost, no spill);
- ``aqua-host``: that cache in an aqua_alloc context whose local budget is the cap: what
  does not fit is placed in pinned host memory at allocation. With ``--cache dynamic``
  (ContextKVCache), while a layer computes, later layers' spilled chunks are copied in on a
  side stream (read-ahead, ``--read-ahead`` bytes of staging at most;
  aqua_alloc/hf/read_ahead.py); further windows given to ``--read-ahead`` run as
  ``aqua-host-ra<size>`` in the same rounds. With ``--cache static`` (ContextStaticCache,
  compiled step) attention reads the spilled layers in place;
- ``aqua-host-in-place`` (``--cache dynamic`` only): read-ahead off: attention's inputs are
  gathered from the host chunks in place (a kernel reading over PCIe, in series with the
  compute);
- ``aqua-peer``: the same with a peer GPU as the spill tier (needs two GPUs; skipped with
  a reason otherwise);
- ``offloaded``, ``offloaded-static``: transformers' ``cache_implementation="offloaded"``
  and ``"offloaded_static"`` (each layer's KV streamed from host before use and sent back
  after; the static one with a compiled step, run only when ``--systems`` names it: it
  crashed the process on the H200).

``--cache`` chooses the aqua systems' cache: ``dynamic`` (ContextKVCache, eager, the
default) or ``static`` (ContextStaticCache of the exact length, the step compiled by
``generate`` as for ``static``). Tokens are compared with ``local`` (dynamic) or ``static``
(static), and speeds with the faster of the offloaded systems run. ``--attn`` is every
system's attention (default ``aqua_sdpa``, aqua_alloc/hf/grouped_attention.py: transformers'
``sdpa`` except a one-token step over a static cache, which reads each KV head once instead
of repeating it; the dynamic-cache systems' steps are ``sdpa``'s either way). A compiled system's
first call compiles: its first decode step of the first round is reported
(``first_step_s``); the median step is the figure.

For each: decode tokens/s (the median step after the first token, each step timed with
the device synchronized; the mean is recorded too), prefill seconds, where the context's bytes were (per tier), and
whether the generated token ids equal the reference's. Ratios against the faster offloaded
system. Exits 1 where a system with the reference's decode step (``decode_step_of``: the aqua
systems with the same cache kind) gives other tokens while it and the reference reproduce
their own, or where a capped aqua system's differ from aqua-local's; other steps' tokens
(eager against compiled, another attention) are reported only.

Writes benchmarks/results/bench_long_prompt-<gpu-name>-<n>gpu.json (rows
``{"system", "prompt_tokens", "kv_bytes", "bytes_per_tier", "decode_tok_s",
"same_tokens_as_reference", ...}``). Run on a GPU machine:

    python benchmarks/bench_long_prompt.py --prompt-tokens 32768 --new-tokens 32
    python benchmarks/bench_long_prompt.py --cache static --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import StaticCache

import aqua_alloc as aq
from aqua_alloc.hf import grouped_attention
from aqua_alloc.hf.attention import use_decode_friendly_attention
from aqua_alloc.memory.config import parse_size
from aqua_alloc.hf.generate_hook import cache_argument
from aqua_alloc.hf.kv_cache import ContextKVCache
from aqua_alloc.hf.read_ahead import DEFAULT_READ_AHEAD_BYTES
from aqua_alloc.hf.static_cache import ContextStaticCache

MiB, GiB = 1 << 20, 1 << 30
SYSTEMS = ("local", "static", "static-sdpa", "aqua-local", "aqua-host", "aqua-host-in-place", "aqua-peer", "offloaded",
           "offloaded-static")
# What runs when --systems is not given, per --cache.
DEFAULT_SYSTEMS = {
    "dynamic": ("local", "static", "aqua-local", "aqua-host", "aqua-host-in-place", "aqua-peer", "offloaded"),
    # offloaded-static only when asked for (--systems): in its first round on an H200 (torch
    # 2.11, transformers 5.17) it killed the process with SIGSEGV, and every result with it
    # (benchmarks/results/bench_long_prompt-static-segfault-1gpu-h200.log).
    "static": ("local", "static", "static-sdpa", "aqua-local", "aqua-host", "aqua-peer", "offloaded"),
}
CAPPED = ("aqua-host", "aqua-host-in-place", "aqua-peer")
# Plain transformers, no aqua_alloc: cache_implementation per system (None: its default).
PLAIN = {"local": None, "static": "static", "static-sdpa": "static", "offloaded": "offloaded",
         "offloaded-static": "offloaded_static"}
OFFLOADED = ("offloaded", "offloaded-static")


def is_capped(system: str) -> bool:
    """Whether a system runs under the local KV cap (aqua-host-ra<size> included)."""
    return system in CAPPED or system.startswith("aqua-host-ra")


def llama_8b_config(layers: int) -> LlamaConfig:
    """Llama-3.1-8B's shape (hidden 4096, 32 heads, 8 KV heads, head dim 128)."""
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       attn_implementation="sdpa")


def kv_bytes_per_token(config: LlamaConfig, dtype: torch.dtype) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


class StepClock(StoppingCriteria):
    """Records the time each token is produced (device synchronized), and where the
    context's bytes are at the last step."""

    def __init__(self, tag: str | None) -> None:
        self.times: list[float] = []
        self.tag = tag
        self.where: dict[str, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.tag is not None and aq.is_enabled() and self.tag in aq.contexts():
            self.where = aq.where(self.tag)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def reference_system(cache: str) -> str:
    """The system whose tokens the others are compared with: plain transformers with the
    same kind of cache (the same kernels, for a static cache the same compiled step)."""
    return "static" if cache == "static" else "local"


def choose_systems(systems_arg: str | None, cache: str, windows: list[tuple[str, int]]) -> list[str]:
    """The systems to run, in order, from --systems (None: DEFAULT_SYSTEMS[cache]) and the
    --read-ahead windows (further windows add aqua-host-ra<size>, dynamic cache only).
    Raises ValueError naming the option and what it accepts."""
    if cache not in DEFAULT_SYSTEMS:
        raise ValueError(f"--cache {cache!r}: expected one of {', '.join(DEFAULT_SYSTEMS)}")
    if systems_arg is None:
        systems = list(DEFAULT_SYSTEMS[cache])
    else:
        systems = [s.strip() for s in systems_arg.split(",") if s.strip()]
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"--systems: unknown {', '.join(unknown)} (known: {', '.join(SYSTEMS)})")
        if not systems:
            raise ValueError(f"--systems: give at least one of {', '.join(SYSTEMS)}")
    if cache == "static":
        if "aqua-host-in-place" in systems:
            raise ValueError("--systems aqua-host-in-place: with --cache static every aqua system reads its spilled KV "
                             "in place (no read-ahead); run aqua-host")
        if len(windows) > 1:
            raise ValueError("--read-ahead: one size only with --cache static (a static cache has no read-ahead)")
        return systems
    if "aqua-host" in systems:
        at = systems.index("aqua-host") + 1
        for text, _ in windows[1:]:
            systems.insert(at, f"aqua-host-ra{text}")
            at += 1
    return systems


def attention_of(system: str, attn: str) -> str:
    """The attention ``system`` runs: ``--attn``'s, except static-sdpa's transformers' sdpa."""
    return "sdpa" if system == "static-sdpa" else attn


def decode_step_of(system: str, cache: str, attn: str) -> tuple[str, str]:
    """What computes ``system``'s decode step: (``compiled`` over a static cache or ``eager``,
    the attention). Systems with different steps may pick other tokens at a near tie (bf16
    sums in another order), so only systems with the reference's step are held to its tokens."""
    if system.startswith("aqua-"):  # a ContextStaticCache with a compiled step, or ContextKVCache eager
        compiled = cache == "static"
    else:  # plain transformers: compiled where generate makes a static cache
        compiled = PLAIN.get(system) in ("static", "offloaded_static")
    return ("compiled" if compiled else "eager", attention_of(system, attn))


def token_failures(rows: list[dict[str, Any]], reference: str, cache: str, attn: str) -> list[str]:
    """Systems whose tokens differ from ``reference``'s where that is a failure: the same
    decode step as the reference's, the system reproducing its own tokens round after round,
    and the reference reproducing itself (its repeat agrees)."""
    mismatched = [row["system"] for row in rows if row.get("same_tokens_as_reference") is False]
    if f"{reference}-repeat" in mismatched:
        return []
    step = decode_step_of(reference, cache, attn)
    return [row["system"] for row in rows if row["system"] in mismatched
            and row.get("same_tokens_every_round") is not False
            and decode_step_of(row["system"].removesuffix("-repeat"), cache, attn) == step]


def moved_bytes_gave_other_tokens(rows: list[dict[str, Any]], aqua_local_reproducible: bool) -> list[str]:
    """The capped aqua systems whose tokens differ from aqua-local's (same kernels, the bytes
    elsewhere: a failure), counted only where both reproduce their own tokens round after
    round (kernels as users run them need not be deterministic)."""
    return [row["system"] for row in rows if row.get("same_tokens_as_aqua_local") is False
            and row.get("same_tokens_every_round") and aqua_local_reproducible]


def run_once(model: Any, prompt: torch.Tensor, new_tokens: int, cache: Any, tag: str | None,
             **generate_kwargs: Any) -> dict[str, Any]:
    clock = StepClock(tag)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         **cache_argument(cache), stopping_criteria=StoppingCriteriaList([clock]),
                         pad_token_id=0, **generate_kwargs)
    torch.cuda.synchronize()
    steps = clock.times
    intervals = [b - a for a, b in zip(steps, steps[1:])]
    # The median step: batch-1 generate is host-bound and a garbage collection or a late
    # thread wake-up can stretch one step many times over.
    median_s = statistics.median(intervals)
    return {
        "tokens": out[0, prompt.shape[1]:].tolist(),
        "prefill_s": steps[0] - t0,
        "decode_tok_s": 1.0 / median_s,
        "decode_ms_per_token": 1000 * median_s,
        "decode_mean_ms_per_token": 1000 * (steps[-1] - steps[0]) / len(intervals),
        "first_step_s": intervals[0],  # a compiled step's first call compiles here
        "where": clock.where,
    }


def run_system(system: str, model: Any, prompt: torch.Tensor, args: argparse.Namespace, kv_bytes: int,
               local_kv: int) -> dict[str, Any]:
    num_gpus = torch.cuda.device_count()
    attention = attention_of(system, args.attn)
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)  # a compiled step is compiled again for it (once: dynamo keeps both)
    if system == "aqua-peer" and num_gpus < 2:
        return {"skipped": f"needs a second GPU for the peer tier; this machine has {num_gpus}"}
    if system in PLAIN:
        implementation = PLAIN[system]
        if implementation == "static":
            # transformers' StaticCache of the aqua systems' length. generate's own is one token
            # shorter (max_length - 1): in the H200 run where `static` had it, its compiled step took
            # 15.5 ms against aqua-local's 9.5 to 10.6 ms and their tokens differed
            # (bench_long_prompt-static-aqua_sdpa-1gpu-h200.log; cause not isolated).
            cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + args.new_tokens)
            return run_once(model, prompt, args.new_tokens, cache, None)
        kwargs = {} if implementation is None else {"cache_implementation": implementation}
        return run_once(model, prompt, args.new_tokens, None, None, **kwargs)
    # aqua systems: only the context's KV chunks count against the local budget.
    settings: dict[str, Any] = dict(host_reserve=kv_bytes + 256 * MiB)
    if system == "aqua-local":
        pass  # no cap
    elif is_capped(system) and system != "aqua-peer":
        settings.update(local_budget={0: local_kv}, lend="0")
    else:  # aqua-peer: GPU 1 lends; host only if it is full
        settings.update(local_budget={0: local_kv}, lend={d: (kv_bytes if d == 1 else 0) for d in range(num_gpus)})
    aq.enable(**settings)
    try:
        tag = f"long-prompt-{system}"
        if args.cache == "static":
            # The exact length, as transformers' own static cache of `static` gets (a
            # server would bucket it: static_cache_length); generate compiles the step.
            cache = ContextStaticCache(model.config, max_cache_len=prompt.shape[1] + args.new_tokens, tag=tag,
                                       device=prompt.device)
            try:
                result = run_once(model, prompt, args.new_tokens, cache, tag)
            finally:
                cache.release()
        else:
            read_ahead = args.read_ahead_by_system.get(system, 0)
            cache = ContextKVCache(model.config, tag=tag, device=prompt.device, read_ahead_bytes=read_ahead,
                                   read_ahead_peers=args.read_ahead_peers)
            try:
                result = run_once(model, prompt, args.new_tokens, cache, tag)
                ra = cache.read_ahead
                result["read_ahead"] = {"window_bytes": read_ahead, "peers": args.read_ahead_peers, **(
                    {} if ra is None else {
                        "layers_staged": ra.layers_staged, "layers_used": ra.layers_used,
                        "layers_dropped": ra.layers_dropped, "bytes_staged": ra.bytes_staged,
                        "peak_staging_bytes": ra.peak_bytes})}
            finally:
                cache.release()
        result["stats"] = {t: {k: v for k, v in s.items() if k in ("current", "peak", "budget", "lent")}
                           for t, s in aq.stats()["tiers"].items()}
        return result
    finally:
        gc.collect()
        aq.disable()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: the 8B shape)")
    parser.add_argument("--local-kv", default=None,
                        help="bytes of KV the local GPU may hold (e.g. '2GiB'); default: half the KV")
    parser.add_argument("--read-ahead", default=str(DEFAULT_READ_AHEAD_BYTES),
                        help="aqua-host's read-ahead staging bytes (e.g. '1GiB'); a comma list adds a system "
                             "aqua-host-ra<size> per further size")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic algorithms and cuBLAS: slower steps, for runs made to compare tokens")
    parser.add_argument("--read-ahead-peers", action="store_true",
                        help="aqua-peer: stage the peer's KV too (default: read it in place over NVLink)")
    parser.add_argument("--name", default="", help="suffix of the result file's name (keeps earlier runs)")
    parser.add_argument("--systems", default=None,
                        help=f"comma list of {', '.join(SYSTEMS)} (default per --cache: "
                             f"{'; '.join(f'{k}: ' + ','.join(v) for k, v in DEFAULT_SYSTEMS.items())})")
    parser.add_argument("--cache", default="dynamic", choices=tuple(DEFAULT_SYSTEMS),
                        help="the aqua systems' KV cache: dynamic (ContextKVCache, eager) or static "
                             "(ContextStaticCache, compiled step)")
    parser.add_argument("--attn", default=grouped_attention.NAME, choices=(grouped_attention.NAME, "sdpa"),
                        help="every system's attention (static-sdpa's excepted): aqua_sdpa (default; reads each KV "
                             "head once in a one-token step over a static cache) or transformers' sdpa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every system, in turn; the best counts")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    try:
        windows = [(text.strip(), parse_size(text.strip(), "--read-ahead", allow_percent=False))
                   for text in args.read_ahead.split(",") if text.strip()]
        if not windows:
            raise ValueError("--read-ahead: give at least one size")
        systems = choose_systems(args.systems, args.cache, windows)
        if args.attn == "sdpa" and "static-sdpa" in systems:
            if args.systems is not None:
                raise ValueError("--systems static-sdpa: with --attn sdpa it is `static` again; name static")
            systems.remove("static-sdpa")  # it would be `static` again
    except ValueError as e:
        parser.error(str(e))
    if args.prompt_tokens <= 0 or args.new_tokens < 2:
        parser.error("--prompt-tokens must be positive and --new-tokens at least 2")
    # System -> read-ahead bytes: aqua-host gets the first window, further ones their own system.
    args.read_ahead_by_system = {"aqua-local": windows[0][1], "aqua-host": windows[0][1], "aqua-peer": windows[0][1],
                                 **{f"aqua-host-ra{text}": nbytes for text, nbytes in windows[1:]}}
    reference = reference_system(args.cache)
    if not torch.cuda.is_available():
        print("bench_long_prompt: needs a CUDA GPU", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    if args.deterministic:
        # Deterministic cuBLAS (before CUDA starts) and algorithms: for runs made to compare
        # tokens, not to time them. The NaN fill of new tensors stays off: a kernel per
        # allocation that none of the systems needs (each writes its buffers before reading).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    print(f"kernels: {'deterministic (--deterministic)' if args.deterministic else 'as users run them'}; "
          f"aqua systems' cache: {args.cache}; attention: {args.attn}"
          + (" (static-sdpa: transformers' sdpa)" if "static-sdpa" in systems else ""))
    grouped_attention.register()
    if any(PLAIN.get(s) in ("static", "offloaded_static") for s in systems) or args.cache == "static":
        # Each static system compiles the step for its own cache class and length: more
        # variants than dynamo's default limit of recompiles per function.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if use_decode_friendly_attention():  # else each decode step builds a cuDNN graph (aqua_alloc/hf/attention.py)
        print("attention: cuDNN attention off for every system (a graph build per new sequence length)")
    dtype = torch.bfloat16
    config = llama_8b_config(args.layers)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    print(f"model: Llama-3.1-8B shape, {args.layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}e9 "
          f"parameters, bf16, random weights (seed {args.seed}), built in {time.perf_counter() - t0:.1f} s")
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(args.seed))
    per_token = kv_bytes_per_token(config, dtype)
    kv_bytes = per_token * (args.prompt_tokens + args.new_tokens)
    local_kv = parse_size(args.local_kv, "--local-kv", allow_percent=False) if args.local_kv else kv_bytes // 2
    gpu = torch.cuda.get_device_name(0)
    num_gpus = torch.cuda.device_count()
    print(f"GPU: {gpu} x{num_gpus}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new; "
          f"KV {per_token} B/token = {kv_bytes / GiB:.2f} GiB; local KV cap for capped systems {local_kv / GiB:.2f} GiB")

    results: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        # Warm-up at the full prompt length: kernel selection and library start-up happen
        # here, not inside the first system's timings.
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        print(f"warm-up: {time.perf_counter() - t:.1f} s")
        # Rounds: every system once per round, in turn; each system's best round counts (the
        # host-bound decode loop of one run can be slowed by the machine, not the system).
        for round_index in range(args.rounds):
            for system in systems:
                t = time.perf_counter()
                r = run_system(system, model, prompt, args, kv_bytes, local_kv)
                if "skipped" in r:
                    results[system] = r
                    if round_index == 0:
                        print(f"{system:>18}: skipped: {r['skipped']}")
                    continue
                where = {k: v for k, v in r["where"].items() if v}
                print(f"round {round_index + 1} {system:>18}: decode {r['decode_tok_s']:7.2f} tok/s "
                      f"({r['decode_ms_per_token']:.1f} ms/token), prefill {r['prefill_s']:.2f} s, "
                      f"context per tier {where or '-'} ({time.perf_counter() - t:.0f} s)")
                best = results.get(system)
                r["rounds_tok_s"] = (best or {}).get("rounds_tok_s", []) + [r["decode_tok_s"]]
                r["rounds_agree"] = best is None or (best["rounds_agree"] and r["tokens"] == best["tokens"])
                if best is not None and r["tokens"] != best["tokens"]:
                    print(f"  {system}: round {round_index + 1} tokens differ from an earlier round")
                if best is None or r["decode_tok_s"] > best["decode_tok_s"]:
                    results[system] = r
                else:
                    best["rounds_tok_s"], best["rounds_agree"] = r["rounds_tok_s"], r["rounds_agree"]
                torch.cuda.empty_cache()

        if reference in systems:
            # The baseline's own run-to-run agreement (greedy decoding of random bf16 weights
            # can flip on near ties when kernels differ): the reference again, after everything.
            results[f"{reference}-repeat"] = run_system(reference, model, prompt, args, kv_bytes, local_kv)
            print(f"{reference}-repeat: decode {results[f'{reference}-repeat']['decode_tok_s']:.2f} tok/s")

    reference_tokens = results.get(reference, {}).get("tokens")
    local_tokens = results.get("aqua-local", {}).get("tokens")
    # Transformers' fastest offloading option in this run: the baseline of the ratios.
    offloaded_rates = {s: results[s]["decode_tok_s"] for s in OFFLOADED if "decode_tok_s" in results.get(s, {})}
    offloaded_best = max(offloaded_rates, key=offloaded_rates.get) if offloaded_rates else None
    offloaded = offloaded_rates.get(offloaded_best)
    rows = []
    for system, r in results.items():
        if "skipped" in r:
            rows.append({"system": system, "skipped": r["skipped"]})
            continue
        plain = system.removesuffix("-repeat")
        if plain in PLAIN:
            # Not in an aqua_alloc context: the KV is on the GPU or streamed per layer.
            bytes_per_tier = ({"host": kv_bytes, "gpu0(streamed)": kv_bytes} if plain in OFFLOADED
                              else {"gpu0": kv_bytes})
        else:
            bytes_per_tier = {k: v for k, v in r["where"].items() if v}
        rows.append({
            "system": system, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "kv_bytes": kv_bytes, "local_kv_cap": local_kv if is_capped(system) else None,
            "bytes_per_tier": bytes_per_tier, "decode_tok_s": r["decode_tok_s"],
            "decode_ms_per_token": r["decode_ms_per_token"], "rounds_tok_s": r.get("rounds_tok_s"),
            "decode_mean_ms_per_token": r["decode_mean_ms_per_token"], "prefill_s": r["prefill_s"],
            "tokens": r["tokens"],
            # A capped aqua system runs aqua-local's kernels on the same bytes, wherever they are:
            # its tokens must equal aqua-local's.
            "same_tokens_as_aqua_local": (r["tokens"] == local_tokens if is_capped(plain) and local_tokens is not None
                                          else None),
            "same_tokens_as_reference": None if reference_tokens is None else r["tokens"] == reference_tokens,
            "reference": reference,
            "same_tokens_every_round": r.get("rounds_agree"),
            "ratio_to_offloaded": r["decode_tok_s"] / offloaded if offloaded else None,
            "offloaded_baseline": offloaded_best,
            "first_step_s": r["first_step_s"],
            "cache": args.cache if plain not in PLAIN else PLAIN[plain] or "dynamic",
            "attention": attention_of(plain, args.attn),
            "deterministic": args.deterministic,
            **({"read_ahead": r["read_ahead"]} if "read_ahead" in r else {}),
        })
    print()
    print(f"ratios against {offloaded_best or '(no offloaded system run)'}; tokens against {reference}")
    print(f"{'system':>18} | {'decode tok/s':>12} | {'x offloaded':>11} | {'same tokens':>11} | context per tier (GiB)")
    for row in rows:
        if "skipped" in row:
            print(f"{row['system']:>18} | skipped: {row['skipped']}")
            continue
        ratio = f"{row['ratio_to_offloaded']:.2f}" if row["ratio_to_offloaded"] else "-"
        tiers = ", ".join(f"{k} {v / GiB:.2f}" for k, v in row["bytes_per_tier"].items())
        print(f"{row['system']:>18} | {row['decode_tok_s']:12.2f} | {ratio:>11} | {str(row['same_tokens_as_reference']):>11} "
              f"| {tiers}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_long_prompt{'-' + args.name if args.name else ''}-{gpu.replace(' ', '_')}-{num_gpus}gpu.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\nwrote {path}")
    moved_wrong = moved_bytes_gave_other_tokens(rows, results.get("aqua-local", {}).get("rounds_agree", False))
    if moved_wrong:
        print(f"tokens differ from aqua-local's (same kernels, bytes elsewhere): {', '.join(moved_wrong)}",
              file=sys.stderr)
        return 1
    mismatched = [row["system"] for row in rows if row.get("same_tokens_as_reference") is False]
    if mismatched:
        print(f"tokens differ from {reference}: {', '.join(mismatched)}", file=sys.stderr)
        # A failure only where the step is the reference's (other kernels may pick another
        # token at a near tie), the system's own rounds agree (one whose rounds differ is
        # reported as not reproducible) and the reference agrees with its own repeat.
        unstable = [row["system"] for row in rows if row.get("same_tokens_every_round") is False]
        if unstable:
            print(f"not reproducible (tokens differ between its own rounds): {', '.join(unstable)}", file=sys.stderr)
        failures = token_failures(rows, reference, args.cache, args.attn)
        if failures:
            print(f"tokens differ from {reference} with the same decode step: {', '.join(failures)}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
