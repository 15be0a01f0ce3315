"""CPU, one prompt: ms per token of plain generate, generate with ContextKVCache, and through
the scheduler (the per-step overhead of the memory side and the scheduler, no GPU); then the
scheduler's own CPU time per step, one prompt alone and four at once.

    python benchmarks/scheduler_overhead_cpu.py
"""
import os, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tiny_models import prompt_ids, GREEDY
from transformers import LlamaConfig, AutoModelForCausalLM
from aqua_alloc.hf.generate_hook import cache_argument
from aqua_alloc.hf.kv_cache import ContextKVCache
from aqua_alloc.hf.scheduler import Scheduler
cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(cfg).eval()
p = prompt_ids(1000, 1)
def t(f, n=3):
    best = 1e9
    for _ in range(n):
        t0 = time.perf_counter(); f(); best = min(best, time.perf_counter() - t0)
    return best
N = 64
kw = dict(max_new_tokens=N, min_new_tokens=N, **GREEDY)
with torch.inference_mode():
    a = t(lambda: m.generate(p, **kw))
    b = t(lambda: m.generate(p, **cache_argument(ContextKVCache(m.config)), **kw))
    s = Scheduler(policy="fair", slice_steps=5, use_context_cache=True)
    c = t(lambda: s.generate(m, p, **kw))
print(f"ms/token: dynamic {a/N*1e3:.2f}  context cache {b/N*1e3:.2f}  scheduler {c/N*1e3:.2f}")

# The scheduler's own CPU time per step (its per-step hooks, in the prompt's thread; waiting
# for a turn costs none): PromptStats.hook_cpu_ns over decode steps, one prompt alone and
# four at once (switches every 5 steps; on a CPU no context moves, so park and resume cost
# only their Python side here).
import threading
for num_prompts in (1, 4):
    s = Scheduler(policy="fair", slice_steps=5)
    with torch.inference_mode():
        threads = [threading.Thread(target=s.generate, args=(m, prompt_ids(64, i + 2)), kwargs=kw)
                   for i in range(num_prompts)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    st = s.stats()
    s.shutdown()
    steps = sum(p.num_steps for p in st.prompts)
    print(f"{num_prompts} prompt(s) at once: {steps} steps, scheduler CPU {sum(p.hook_cpu_ns for p in st.prompts) / steps / 1e3:.1f} us per step")
