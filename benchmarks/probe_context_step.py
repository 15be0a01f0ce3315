"""Why is one prompt's decode step slower through the scheduler under a 128 MiB budget than
under 1 GiB? (GPU probe.) Prints ms per step and where the running context's bytes are
(aqua_alloc.where) in the middle of its generate, for each budget, next to plain generate
and generate with ContextKVCache outside any context.

    python benchmarks/probe_context_step.py
"""
import os
import statistics
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

import aqua_alloc  # noqa: E402
from aqua_alloc.hf.attention import use_decode_friendly_attention  # noqa: E402
from aqua_alloc.hf.generate_hook import cache_argument  # noqa: E402
from aqua_alloc.hf.kv_cache import ContextKVCache  # noqa: E402
from aqua_alloc.hf.scheduler import Scheduler  # noqa: E402
from serve_harness import build_model  # noqa: E402


class Clock(StoppingCriteria):
    def __init__(self, tag=None):
        self.t, self.tag, self.where = [], tag, None

    def __call__(self, input_ids, scores, **kw):
        self.t.append(time.perf_counter())
        if self.tag and len(self.t) == 10:
            self.where = aqua_alloc.where(self.tag)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def ms(self):
        return statistics.median(b - a for a, b in zip(self.t[1:], self.t[2:])) * 1e3


torch.use_deterministic_algorithms(True, warn_only=True)
use_decode_friendly_attention()
dev = torch.device("cuda")
model = build_model("llama-1b", dev)
p = torch.randint(1, 500, (1, 1000), generator=torch.Generator().manual_seed(0)).to(dev)


def kw(c, n=48):
    return dict(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0, stopping_criteria=StoppingCriteriaList([c]))


for _ in range(2):
    c = Clock()
    model.generate(**kw(c))
    print(f"plain generate: {c.ms():.2f} ms/step", flush=True)
    c = Clock()
    model.generate(**kw(c), **cache_argument(ContextKVCache(model.config)))
    print(f"ContextKVCache, no context: {c.ms():.2f} ms/step", flush=True)
for budget in (128 << 20, 1 << 30, 128 << 20):
    aqua_alloc.enable(local_budget=budget, lend=0)
    s = Scheduler(device=dev, slice_steps=5)
    for i in range(3):
        c = Clock(tag=f"p{i}")
        s.generate(model, tag=f"p{i}", **kw(c))
        st = aqua_alloc.stats()
        print(f"budget {budget >> 20} MiB run {i}: {c.ms():.2f} ms/step; context at step 10: {c.where}; tiers now "
              f"{ {t: (v['current'] >> 20, v['budget'] >> 20, v['peak'] >> 20) for t, v in st['tiers'].items()} } "
              f"(current, budget, peak MiB); moves {st['num_moves']}", flush=True)
    s.shutdown()
    aqua_alloc.disable()
