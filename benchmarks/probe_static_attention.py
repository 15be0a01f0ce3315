"""Why is a compiled decode step on a static cache slow at long contexts, and what is faster? (GPU probe)

transformers' ``sdpa`` attention, with a static cache under ``torch.compile``, cannot use
SDPA's grouped-query mode (the static cache needs a mask, and masked GQA falls back to the
math kernel), so it repeats each KV head ``num_attention_heads / num_key_value_heads``
times (``repeat_kv``) and runs masked attention over the copies. On the 8B shape at 32k
tokens that step took 57.8 ms against 21 ms for the eager dynamic cache
(results/bench_long_prompt-static-1gpu-h200.log), and with half the cache on host it took
227 ms: the repeat reads each host element four times over PCIe.

Variants, each with its step compiled by ``generate`` (the 8B shape, one prompt):

- ``sdpa``: transformers' default (repeat_kv, masked SDPA);
- ``packed-sdpa``: one query token's heads folded onto its KV head (``[B, Hkv, G, D]``),
  masked SDPA on the KV heads as they are: nothing repeated;
- ``packed-matmul``: the same folding, then ``q @ K^T``, softmax in float32, ``@ V``
  (each K and V element read once, by a matrix multiply spread over the whole GPU);
- ``flex_attention``: transformers' FlexAttention integration (split-KV decoding kernel).

For each: a plain static cache (``ContextStaticCache`` with no context, ordinary memory)
and, in the same compiled graph, the cache in an aqua_alloc context whose local budget is
half its size (the rest placed in host memory at allocation, read in place). Prints ms
per token (median step) and the first step (compilation included), and whether tokens
equal the ``sdpa`` variant's.

    python benchmarks/probe_static_attention.py [--prompt 32768] [--new 16] [--variants ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from typing import Any

import torch
from transformers import AttentionInterface, LlamaForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import aqua_alloc as aq
from aqua_alloc.hf.attention import use_decode_friendly_attention
from aqua_alloc.hf.static_cache import ContextStaticCache
from bench_long_prompt import kv_bytes_per_token, llama_8b_config

MiB = 1 << 20


def _packed(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``[B, H, 1, D]`` query -> ``[B, Hkv, G, D]``: head h = kv * G + g, as repeat_kv pairs them."""
    b, h, _, d = query.shape
    return query.reshape(b, key.shape[1], h // key.shape[1], d)


def packed_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> tuple:
    if query.shape[2] != 1 or attention_mask is None or key.shape[1] == query.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    b, h, _, d = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(_packed(query, key), key, value,
                                                           attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, 1, h, d), None  # [B, Hkv, G, D] -> [B, 1, H, D]


def packed_matmul(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> tuple:
    if query.shape[2] != 1 or attention_mask is None or key.shape[1] == query.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    b, h, _, d = query.shape
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.matmul(_packed(query, key), key.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, G, D]
    return out.reshape(b, 1, h, d), None


CUSTOM = {"packed-sdpa": packed_sdpa, "packed-matmul": packed_matmul}


class StepClock(StoppingCriteria):
    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run(model: Any, prompt: torch.Tensor, new: int, tag: str | None) -> dict[str, Any]:
    cache = ContextStaticCache(model.config, max_cache_len=prompt.shape[1] + new, tag=tag, device=prompt.device)
    clock = StepClock()
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
        torch.cuda.synchronize()
        where = aq.where(tag) if tag is not None else {}
    finally:
        cache.release()
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {"tokens": out[0, prompt.shape[1]:].tolist(), "prefill_s": clock.times[0] - t0,
            "first_step_s": steps[0], "ms_per_token": 1000 * statistics.median(steps[1:]), "where": where}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--variants", default="packed-matmul,packed-sdpa,sdpa,flex_attention")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    use_decode_friendly_attention()
    torch._dynamo.config.recompile_limit = 64
    for name, fn in CUSTOM.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config = llama_8b_config(args.layers)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    kv = kv_bytes_per_token(config, torch.bfloat16) * (args.prompt + args.new)
    print(f"8B shape, {args.layers} layers; prompt {args.prompt}, {args.new} new; KV {kv / 2**30:.2f} GiB; "
          f"torch {torch.__version__}", flush=True)
    rows = []
    with torch.inference_mode():
        model.generate(prompt[:, :1024], max_new_tokens=2, do_sample=False, pad_token_id=0)
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            torch._dynamo.reset()
            model.set_attn_implementation(variant)
            for placement in ("gpu", "half-host"):
                t = time.perf_counter()
                try:
                    if placement == "gpu":
                        r = run(model, prompt, args.new, None)
                    else:
                        aq.enable(host_reserve=kv + 256 * MiB, local_budget={0: kv // 2}, lend="0")
                        try:
                            r = run(model, prompt, args.new, f"probe-{variant}")
                        finally:
                            gc.collect()
                            aq.disable()
                except Exception as e:  # a variant that fails is reported, the others still run
                    traceback.print_exc()
                    r = {"error": f"{type(e).__name__}: {e}"[:400]}
                r.update(variant=variant, placement=placement, wall_s=time.perf_counter() - t)
                if "tokens" in r:
                    print(f"{variant:>15} {placement:>9}: {r['ms_per_token']:7.2f} ms/token, first step "
                          f"{r['first_step_s']:.1f} s, prefill {r['prefill_s']:.2f} s, where {r['where']} "
                          f"({r['wall_s']:.0f} s)", flush=True)
                else:
                    print(f"{variant:>15} {placement:>9}: {r['error']}", flush=True)
                rows.append(r)
    ref = next((r["tokens"] for r in rows if r["variant"] == "sdpa" and r.get("placement") == "gpu"
                and "tokens" in r), None)
    for r in rows:
        if "tokens" in r and ref is not None:
            r["same_tokens_as_sdpa"] = r["tokens"] == ref
            print(f"{r['variant']:>15} {r['placement']:>9}: same tokens as sdpa/gpu: {r['same_tokens_as_sdpa']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
