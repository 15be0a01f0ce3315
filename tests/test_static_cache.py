"""ContextStaticCache: transformers' static cache with its tensors in a context (CPU).

What can fail here: token ids (equal to transformers' own static cache, alone, through the
generate hook and under the scheduler), which allocations land in the context (exactly the
layers' tensors), release (once, and the tensors dropped), the length buckets.
"""

from __future__ import annotations

import concurrent.futures
import inspect

import pytest
import torch

from aqua_alloc.hf import generate_hook, kv_cache, scheduler as scheduler_module, static_cache
from aqua_alloc.hf.generate_hook import cache_argument, install_generate_hook, uninstall_generate_hook
from aqua_alloc.hf.scheduler import Scheduler
from aqua_alloc.hf.static_cache import MIN_BUCKET_TOKENS, ContextStaticCache, static_cache_length
from test_kv_cache import FakeAllocator, assert_released_when_collected
from tiny_models import GREEDY, Caller, build, llama_config, mistral_config, prompt_ids

MODELS = {"llama": llama_config, "mistral-sliding": lambda: mistral_config(sliding_window=8)}


@pytest.fixture(scope="module")
def models():
    return {name: build(make()) for name, make in MODELS.items()}


def static_solo(model, ids, n, **kwargs):
    """transformers' own static cache: the reference."""
    return model.generate(ids, max_new_tokens=n, cache_implementation="static", **GREEDY, **kwargs)


class FakeMemory(FakeAllocator):
    """test_kv_cache's fake (counts what is made while a context is entered; records
    releases) with what the scheduler's memory side calls."""

    # (nothing moves on CPU)
    def park(self, tag):
        pass

    def resume(self, tag, wait=True):
        done = concurrent.futures.Future()
        done.set_result(None)
        return None if wait else done

    def prefetch(self, tag):
        return self.resume(tag, wait=False)

    def wait_on_stream(self, future, stream=None):
        return False

    def where(self, tag, wait=True):
        return {"gpu0": self.inside.get(tag, 0), "host": 0}

    def reclaim_pending(self):
        return False


@pytest.fixture
def fake(monkeypatch):
    memory = FakeMemory()
    for module in (kv_cache, static_cache, generate_hook, scheduler_module):
        monkeypatch.setattr(module, "memory_for", lambda device: memory)
    for name in ("zeros", "empty"):
        real = getattr(torch, name)

        def counting(*args, real=real, **kwargs):
            tensor = real(*args, **kwargs)
            if memory.current is not None:
                memory.inside[memory.current] = memory.inside.get(memory.current, 0) + tensor.numel() * tensor.element_size()
            return tensor

        monkeypatch.setattr(torch, name, counting)
    return memory


def test_lengths_fall_in_few_buckets():
    assert [static_cache_length(n) for n in (1, 256, 257, 1000, 1024, 1025, 9000)] == [
        MIN_BUCKET_TOKENS, 256, 512, 1024, 1024, 2048, 16384]
    assert len({static_cache_length(n) for n in range(1, 8193)}) == 6  # 256 ... 8192
    for bad in (0, -3, 2.5, True, "12"):
        with pytest.raises(ValueError, match=r"num_tokens=.*: expected a whole number of tokens, at least 1"):
            static_cache_length(bad)


@pytest.mark.parametrize("name", list(MODELS))
def test_same_tokens_as_transformers_static_cache(models, name):
    model = models[name]
    for ids, n in ((prompt_ids(9, 1), 12), (prompt_ids(7, 2, batch=3), 9)):
        cache = ContextStaticCache(model.config, max_cache_len=static_cache_length(ids.shape[-1] + n))
        out = model.generate(ids, max_new_tokens=n, **cache_argument(cache), **GREEDY)
        assert torch.equal(out, static_solo(model, ids, n))


def test_only_the_layers_tensors_are_made_in_the_context_and_release_is_exact(models, fake):
    model = models["llama"]
    cache = ContextStaticCache(model.config, max_cache_len=256, tag="ctx")
    out = model.generate(prompt_ids(6, 1), max_new_tokens=9, **cache_argument(cache), **GREEDY)
    assert torch.equal(out, static_solo(model, prompt_ids(6, 1), 9))
    assert cache.context_created
    assert fake.inside == {"ctx": cache.nbytes} and cache.nbytes > 0  # the keys and values, nothing else
    layers = model.config.num_hidden_layers
    per_token = 2 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads) * 4
    assert cache.nbytes == layers * per_token * 256              # fp32, 256 tokens each layer
    assert cache.live_bytes() == layers * per_token * (6 + 9 - 1)  # the last token is never written back
    cache.release()
    cache.release()
    assert fake.released == ["ctx"] and cache.nbytes == 0
    with pytest.raises(RuntimeError, match="was released"):
        model.generate(prompt_ids(6, 1), max_new_tokens=2, **cache_argument(cache), **GREEDY)


def test_release_when_collected(models, fake):
    model = models["llama"]
    assert_released_when_collected(model, ContextStaticCache(model.config, max_cache_len=256, tag="kept"), fake)


def test_generate_hook_keeps_a_static_call_in_a_context(models, fake):
    model = models["llama"]
    ids = prompt_ids(9, 3)
    expected = static_solo(model, ids, 10)
    install_generate_hook()
    try:
        out = model.generate(ids, max_new_tokens=10, cache_implementation="static", **GREEDY)
        model.generation_config.cache_implementation = "static"  # set on the model instead of the call
        try:
            out_config = model.generate(ids, max_new_tokens=10, **GREEDY)
        finally:
            model.generation_config.cache_implementation = None
    finally:
        uninstall_generate_hook()
    assert torch.equal(out, expected) and torch.equal(out_config, expected)
    assert len(fake.released) == 2 and all(tag.startswith("generate-") for tag in fake.released)
    assert all(fake.inside[tag] == 2 * model.config.num_hidden_layers * 256 * 4 * model.config.num_key_value_heads
               * (model.config.hidden_size // model.config.num_attention_heads) for tag in fake.released)


def test_scheduler_serves_static_calls_each_in_its_own_context(models, fake, monkeypatch):
    """Several static-cache calls at once through sched.generate and sched.wrap: each gets
    its own cache in its own context (the model-held cache of transformers would be shared),
    tokens equal to each call alone."""
    model = models["llama"]
    sched = Scheduler(slice_steps=2, use_context_cache=True)
    counts = []  # the token count each live_bytes call was given (None: read from the device)
    live_bytes = ContextStaticCache.live_bytes
    monkeypatch.setattr(ContextStaticCache, "live_bytes",
                        lambda self, tokens=None: counts.append(tokens) or live_bytes(self, tokens))
    specs = [(prompt_ids(5 + 3 * i, 10 + i), 8 + 2 * i) for i in range(3)]
    callers = [Caller(lambda ids=ids, n=n: sched.generate(model, ids, max_new_tokens=n, cache_implementation="static",
                                                          **GREEDY)) for ids, n in specs]
    for caller, (ids, n) in zip(callers, specs):
        caller.join()
        assert caller.error is None, caller.error
        assert torch.equal(caller.result, static_solo(model, ids, n))
    assert sorted(fake.released) == sorted(p.tag for p in sched.stats().prompts)
    assert len(sched.stats().slices) > 3  # they were interleaved
    # At each park the scheduler counts the cache's valid KV from the tokens it has seen (the
    # device's count is not read): the prompt plus the tokens of every slice but the last, less
    # the newest token, whose keys the next step writes.
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads \
        * (model.config.hidden_size // model.config.num_attention_heads) * 4  # K and V, fp32
    assert counts and None not in counts
    by_length = {prompt.num_tokens: prompt for prompt in sched.stats().prompts}  # specs' lengths differ
    for ids, n in specs:
        prompt = by_length[n]
        steps = [s.num_steps for s in sched.stats().slices if s.tag == prompt.tag]
        assert len(steps) > 1, prompt.tag  # parked at least once
        assert prompt.parked_kv_bytes == per_token * (ids.shape[1] + sum(steps[:-1]) - 1), prompt.tag
    references = [static_solo(model, ids, n) for ids, n in specs]
    sched.wrap(model)
    try:
        wrapped = [Caller(lambda ids=ids, n=n: model.generate(ids, max_new_tokens=n, cache_implementation="static",
                                                              **GREEDY)) for ids, n in specs]
        for caller in wrapped:
            caller.join()
    finally:
        Scheduler.unwrap(model)
    for caller, expected in zip(wrapped, references):
        assert caller.error is None, caller.error
        assert torch.equal(caller.result, expected)
    assert len(fake.released) == 6


def test_a_static_call_is_sized_by_its_largest_limit_and_beam_search_is_left_to_transformers(models, fake):
    """The cache holds whatever limit transformers ends up using (here the model's default
    max_new_tokens, which wins over a passed config's max_length); a beam search keeps
    transformers' own static cache (it replaces the tensors each step)."""
    from transformers import GenerationConfig

    model = models["llama"]
    ids = prompt_ids(9, 5)
    model.generation_config.max_new_tokens = 300
    try:
        config = GenerationConfig(max_length=20, cache_implementation="static", do_sample=False, pad_token_id=0)
        cache = generate_hook.make_context_cache(model, (ids,), {"generation_config": config}, "sized", None)
        assert isinstance(cache, ContextStaticCache) and cache.layers[0].max_cache_len == static_cache_length(9 + 300) == 512
    finally:
        model.generation_config.max_new_tokens = None
    beams = generate_hook.make_context_cache(model, (ids,), {"cache_implementation": "static", "num_beams": 2,
                                                             "max_new_tokens": 5}, "beams", None)
    assert beams is None
    install_generate_hook()
    try:
        out = model.generate(ids, max_new_tokens=6, num_beams=2, cache_implementation="static", **GREEDY)
    finally:
        uninstall_generate_hook()
    assert torch.equal(out, static_solo(model, ids, 6, num_beams=2))
    assert fake.released == []  # no context was made for it


def test_a_passed_generation_config_gets_the_cache_implementation_not_a_keyword(models, fake, capfd):
    """With a static cache, cache_implementation=None goes into a copy of the caller's
    generation config (a keyword beside it is deprecated by transformers); the caller's
    config is left as it was."""
    from transformers import GenerationConfig

    model = models["llama"]
    ids = prompt_ids(9, 6)
    config = GenerationConfig(max_new_tokens=7, cache_implementation="static", do_sample=False, pad_token_id=0)
    expected = model.generate(ids, generation_config=config)
    install_generate_hook()
    try:
        out = model.generate(ids, generation_config=config)
    finally:
        uninstall_generate_hook()
    assert torch.equal(out, expected)
    assert config.cache_implementation == "static"
    assert len(fake.released) == 1
    # transformers logs (to stderr) "Passing `generation_config` together with generation-related
    # arguments=({'cache_implementation'}) is deprecated" for a keyword beside the config.
    assert "Passing `generation_config` together" not in capfd.readouterr().err


def test_the_decode_step_on_a_context_cache_traces_as_one_graph(models, fake):
    """transformers compiles the decode step on a static cache as one graph (CUDA graphs on
    a GPU); the context cache's update must not break it. Traced here with dynamo's eager
    backend and fullgraph=True (a graph break raises), after an eager prefill that made the
    layers' tensors in the context; the compiled steps pick the eager steps' tokens (their
    logits agree to float rounding: the traced graph may order a reduction differently)."""
    model = models["llama"]
    ids = prompt_ids(16, 3)
    # transformers 5.2x names forward's cache argument `cache` (`past_key_values` deprecated).
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, backend="eager")
    with torch.inference_mode():
        results = {}
        for compiled in (False, True):
            cache = ContextStaticCache(model.config, max_cache_len=64, tag=f"graph-{compiled}")
            out = model(ids, **{cache_kw: cache}, use_cache=True)
            assert fake.inside[f"graph-{compiled}"] > 0  # the layers' tensors are in the context
            logits = []
            token = out.logits[:, -1:].argmax(-1)
            for k in range(3):
                forward = step if compiled else model.forward
                out = forward(token, **{cache_kw: cache}, use_cache=True, cache_position=torch.tensor([16 + k]))
                logits.append(out.logits)
                token = out.logits[:, -1:].argmax(-1)
            results[compiled] = torch.cat(logits)
            cache.release()
    torch._dynamo.reset()
    assert torch.equal(results[True].argmax(-1), results[False].argmax(-1))
    torch.testing.assert_close(results[True], results[False], rtol=1e-4, atol=1e-4)


class OffDeviceMemory(FakeMemory):
    """FakeMemory whose context tensors all report living on host (a spilled context)."""

    def placement(self, tensor):
        return {"gpu0": 0, "host": tensor.untyped_storage().nbytes()}


def test_a_prefill_attends_over_a_copy_of_off_device_layers_and_decode_reads_in_place(models, monkeypatch):
    """A layer whose bytes are off the GPU is read once per block of queries by a prefill's
    attention: the cache hands attention one copy instead (decode steps, one query, read the
    cache itself). Same tokens either way; the cache's own tensors keep the KV."""
    memory = OffDeviceMemory()
    monkeypatch.setattr(static_cache, "memory_for", lambda device: memory)
    model = models["llama"]
    cache = ContextStaticCache(model.config, max_cache_len=64, tag="spilled")
    returned = []
    real_update = ContextStaticCache.update

    def recording_update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = real_update(self, key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        returned.append((key_states.shape[-2], keys.data_ptr() == layer.keys.data_ptr(),
                         values.data_ptr() == layer.values.data_ptr(), torch.equal(keys, layer.keys)))
        return keys, values

    monkeypatch.setattr(ContextStaticCache, "update", recording_update)
    out = model.generate(prompt_ids(6, 1), max_new_tokens=5, **cache_argument(cache), **GREEDY)
    assert torch.equal(out, static_solo(model, prompt_ids(6, 1), 5))
    layers = model.config.num_hidden_layers
    assert returned[:layers] == [(6, False, False, True)] * layers      # prefill: a copy, equal to the cache
    assert returned[layers:] == [(1, True, True, True)] * (4 * layers)  # decode: the cache itself
    cache.release()


def test_a_prefill_reads_layers_on_the_gpu_in_place(models, fake):
    fake.placement = lambda tensor: {"gpu0": tensor.untyped_storage().nbytes(), "host": 0}
    model = models["llama"]
    cache = ContextStaticCache(model.config, max_cache_len=64, tag="home")
    keys, values = cache.update(torch.ones(1, 2, 5, 16), torch.ones(1, 2, 5, 16), 0)
    assert keys is cache.layers[0].keys and values is cache.layers[0].values
    cache.release()


def test_a_prefill_reads_in_place_when_the_gpu_has_no_room_for_the_copy(models, monkeypatch):
    monkeypatch.setattr(static_cache, "memory_for", lambda device: OffDeviceMemory())
    model = models["llama"]
    cache = ContextStaticCache(model.config, max_cache_len=64, tag="full")
    real_clone = torch.Tensor.clone

    def no_room(self, *args, **kwargs):
        if self.shape[-2] == 64:  # the cache's own tensors: their copy does not fit
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_clone(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", no_room)
    keys, values = cache.update(torch.ones(1, 2, 5, 16), torch.ones(1, 2, 5, 16), 0)
    assert keys is cache.layers[0].keys and values is cache.layers[0].values
    monkeypatch.undo()
    cache.release()


def test_live_bytes_from_a_token_count_the_host_knows_equals_the_devices(models, fake):
    """``live_bytes(tokens)`` (the scheduler's count, no device read) equals ``live_bytes()``
    (the cache's own count) for the tokens the cache holds, on full and sliding-window layers;
    a count that is not a whole number of tokens is refused, naming it."""
    for name, model in models.items():
        ids = prompt_ids(6, 4)
        cache = ContextStaticCache(model.config, max_cache_len=static_cache_length(6 + 12), tag=f"live-{name}")
        try:
            out = model.generate(ids, **cache_argument(cache), max_new_tokens=12, **GREEDY)
            held = out.shape[1] - 1  # the last token's keys were never written
            assert int(cache.get_seq_length()) == held
            assert cache.live_bytes(tokens=held) == cache.live_bytes() > 0, name
            for bad in (-1, True, 2.5, "3"):
                with pytest.raises(ValueError, match="tokens="):
                    cache.live_bytes(tokens=bad)
        finally:
            cache.release()
