"""Read-ahead of spilled KV chunks (aqua_alloc.hf.read_ahead) on the CPU: the same tokens as
DynamicCache, only off-GPU chunks staged, the window respected, stale copies never used.

A fake allocator stands for aqua_alloc: it says which chunks are "off the GPU" (a rule on the
layer) and what the context's bytes per tier are. On the CPU the copies run in line; the
stream ordering is exercised by the GPU test (tests/test_gpu.py, spill to host).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache

from aqua_alloc.hf import kv_cache
from aqua_alloc.hf.kv_cache import ChunkedLayer, ContextKVCache
from aqua_alloc.hf.read_ahead import ReadAhead
from aqua_alloc.hf.generate_hook import cache_argument
from tiny_models import GREEDY, build, llama_config, prompt_ids


class SpillingAllocator:
    """A fake aqua_alloc whose context has the chunks of ``remote_layers`` off the GPU, on
    ``tier`` (host, or a peer GPU such as gpu1)."""

    def __init__(self, remote_layers: set[int], spilled: bool = True, tier: str = "host"):
        self.remote_layers = remote_layers
        self.tier = tier
        self.spilled = spilled          # False: where() says the whole context is on the GPU
        self.chunk_layer: dict[int, int] = {}  # chunk data_ptr -> layer index (filled by the test)
        self.placements = 0             # placement() calls
        self.moves = 0                  # bumped by tests: where() changes
        self.busy = False               # True: where(wait=False) cannot tell (a move in progress)
        self.released: list[str] = []

    def is_enabled(self):
        return True

    @contextlib.contextmanager
    def context(self, tag, device=None):
        yield tag

    def release(self, tag):
        self.released.append(tag)

    def where(self, tag, wait=True):
        if self.busy and not wait:
            return None
        return {"gpu0": 1 + self.moves, "host": 0, "gpu1": 0} | ({self.tier: 1} if self.spilled else {})

    def placement(self, chunk):
        self.placements += 1
        nbytes = chunk.numel() * chunk.element_size()
        remote = self.chunk_layer.get(chunk.data_ptr()) in self.remote_layers
        return {"gpu0": 0 if remote else nbytes, "host": 0, "gpu1": 0} | {self.tier: nbytes if remote else 0}


@pytest.fixture(scope="module")
def model():
    return build(llama_config())


def spilling_cache(model, monkeypatch, fake, **kwargs) -> ContextKVCache:
    monkeypatch.setattr(kv_cache, "memory_for", lambda device: fake)
    cache = ContextKVCache(model.config, tag="long", **kwargs)
    # Chunks are allocated while a layer updates: remember that layer as the chunk's.
    real_allocate = cache._allocate
    current = {"layer": None}
    real_update = ContextKVCache.update

    def update(self, key_states, value_states, layer_idx, *args, **kw):
        current["layer"] = layer_idx
        return real_update(self, key_states, value_states, layer_idx, *args, **kw)

    monkeypatch.setattr(ContextKVCache, "update", update)

    def tracking_allocate(shape, dtype, device):
        chunk = real_allocate(shape, dtype, device)
        fake.chunk_layer[chunk.data_ptr()] = current["layer"]
        return chunk

    for layer in cache.layers:
        if isinstance(layer, ChunkedLayer):
            layer._key_store._allocate = layer._value_store._allocate = tracking_allocate
    return cache


def run(model, cache, new_tokens=12, prompt_len=21):
    return model.generate(prompt_ids(prompt_len, seed=3), max_new_tokens=new_tokens, **cache_argument(cache), **GREEDY)


def layer_bytes(cache, index) -> int:
    return cache.layers[index].nbytes


@pytest.mark.parametrize("window", [1, 10**9])
def test_same_tokens_and_only_spilled_layers_are_staged(model, monkeypatch, window):
    expected = run(model, DynamicCache(config=model.config))
    fake = SpillingAllocator(remote_layers={1})
    cache = spilling_cache(model, monkeypatch, fake, chunk_tokens=8, read_ahead_bytes=window)
    out = run(model, cache)
    assert torch.equal(out, expected)
    ra = cache.read_ahead
    # Layer 1 (of 2) is staged at every decode step (11 steps after the prefill), read from
    # the staged copy, and nothing else is staged: layer 0 is on the GPU.
    assert (ra.layers_staged, ra.layers_used, ra.layers_dropped) == (11, 11, 0)
    assert ra.peak_bytes == layer_bytes(cache, 1)
    cache.release()
    assert fake.released == ["long"]


@pytest.mark.parametrize("read_ahead_peers", [False, True])
def test_a_peers_chunks_are_read_in_place_unless_asked(model, monkeypatch, read_ahead_peers):
    """KV spilled to a peer GPU is read in place by default (over NVLink that was faster than
    staging it); read_ahead_peers=True stages it like host KV. Same tokens either way."""
    expected = run(model, DynamicCache(config=model.config))
    fake = SpillingAllocator(remote_layers={1}, tier="gpu1")
    cache = spilling_cache(model, monkeypatch, fake, chunk_tokens=8, read_ahead_peers=read_ahead_peers)
    assert torch.equal(run(model, cache), expected)
    ra = cache.read_ahead
    if read_ahead_peers:
        assert (ra.layers_staged, ra.layers_used) == (11, 11)
    else:
        assert ra.layers_staged == 0 and fake.placements == 0  # not even asked where chunks are


def test_window_bounds_the_staging_held_at_once(model, monkeypatch):
    config = llama_config()
    config.num_hidden_layers = 6
    deep = build(config)
    expected = run(deep, DynamicCache(config=deep.config))
    fake = SpillingAllocator(remote_layers={2, 3, 4, 5})
    # Measure one layer's bytes at the end, then run again with a window of two layers.
    probe = spilling_cache(deep, monkeypatch, fake, chunk_tokens=64, read_ahead_bytes=0)
    run(deep, probe)
    per_layer = layer_bytes(probe, 2)
    monkeypatch.undo()
    fake = SpillingAllocator(remote_layers={2, 3, 4, 5})
    cache = spilling_cache(deep, monkeypatch, fake, chunk_tokens=64, read_ahead_bytes=2 * per_layer)
    assert torch.equal(run(deep, cache), expected)
    ra = cache.read_ahead
    assert ra.layers_staged == ra.layers_used == 4 * 11 and ra.layers_dropped == 0
    assert ra.peak_bytes == 2 * per_layer  # two layers ahead, never three


def test_nothing_is_staged_or_asked_when_the_context_is_on_its_gpu(model, monkeypatch):
    fake = SpillingAllocator(remote_layers={0, 1}, spilled=False)
    cache = spilling_cache(model, monkeypatch, fake, chunk_tokens=8)
    run(model, cache)
    assert cache.read_ahead.layers_staged == 0 and fake.placements == 0


def test_off_switch_reads_in_place(model, monkeypatch):
    fake = SpillingAllocator(remote_layers={0, 1})
    cache = spilling_cache(model, monkeypatch, fake, chunk_tokens=8, read_ahead_bytes=0)
    run(model, cache)
    assert cache.read_ahead is None and fake.placements == 0
    with pytest.raises(ValueError, match="read_ahead_bytes"):
        ContextKVCache(model.config, read_ahead_bytes=-1)


def test_placement_is_asked_once_per_chunk_until_the_context_moves(model, monkeypatch):
    fake = SpillingAllocator(remote_layers={1})
    cache = spilling_cache(model, monkeypatch, fake, chunk_tokens=64)
    out = run(model, cache, new_tokens=12)
    # Layer 1's key and value chunks, once (layer 0 is never ahead of another layer).
    assert fake.placements == 2
    fake.moves += 1  # the context's bytes per tier change: every chunk is asked again
    model.generate(out, max_new_tokens=3, **cache_argument(cache), **GREEDY)
    assert fake.placements == 4


@pytest.mark.parametrize("spilled", [True, False])
def test_while_aqua_alloc_is_busy_the_last_forwards_answer_stands(model, monkeypatch, spilled):
    # A forward does not wait for a move of other contexts to learn where its own chunks are.
    expected = run(model, DynamicCache(config=model.config), new_tokens=15)
    fake = SpillingAllocator(remote_layers={1}, spilled=spilled)
    cache = spilling_cache(model, monkeypatch, fake, chunk_tokens=64)
    out = run(model, cache, new_tokens=12)
    staged, placements = cache.read_ahead.layers_staged, fake.placements
    fake.busy = True
    fake.moves += 1  # would make every chunk be asked again, if where() were asked
    out = model.generate(out, max_new_tokens=3, **cache_argument(cache), **GREEDY)
    assert torch.equal(out, expected)
    assert fake.placements == placements
    # Spilled: layer 1 still staged at each of the 3 steps; on its GPU: still nothing staged.
    assert cache.read_ahead.layers_staged == staged + (3 if spilled else 0)
    fake.busy = False
    model.generate(out, max_new_tokens=2, **cache_argument(cache), **GREEDY)
    assert fake.placements == placements + (2 if spilled else 0)  # asked again once it can tell


# --- the ReadAhead on its own, driven like a forward: stale copies are dropped -------------


def forward_like(cache, states_per_layer):
    return [cache.update(k, v, i) for i, (k, v) in enumerate(states_per_layer)]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # cuda: copies on a side stream, events


@pytest.mark.parametrize("device", DEVICES)
def test_a_layer_rewritten_after_staging_is_read_in_place_not_from_the_stale_copy(device):
    cache = ContextKVCache(None, chunk_tokens=4)
    cache.read_ahead = ReadAhead(1 << 30, is_remote=lambda chunk: True, placement_key=lambda: "spilled")
    reference = DynamicCache()
    g = torch.Generator().manual_seed(0)

    def states(n):
        return [(torch.randn(1, 2, n, 8, generator=g).to(device), torch.randn(1, 2, n, 8, generator=g).to(device))
                for _ in range(3)]

    for step in states(6), states(1):
        for i, (k, v) in enumerate(step):
            assert all(torch.equal(a, b) for a, b in zip(cache.update(k, v, i), reference.update(k, v, i)))
    # Next forward: layer 0 updates, which stages layers 1 and 2; then layer 1 is rewritten
    # (a crop, as assisted decoding does) before its turn.
    step = states(1)
    for cache_like in (cache, reference):
        cache_like.update(*step[0], 0)
    assert set(cache.read_ahead._staged) == {1, 2}
    for cache_like in (cache, reference):
        cache_like.layers[1].crop(-2)  # drop the last 2 of its 7 tokens
    for i in (1, 2):
        got, want = cache.update(*step[i], i), reference.update(*step[i], i)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"layer {i}"
    assert cache.read_ahead.layers_dropped == 1 and cache.read_ahead.layers_used >= 1
    cache.read_ahead.release()


@settings(max_examples=40, deadline=None)
@given(
    prefill=st.integers(1, 20),
    steps=st.lists(st.integers(1, 3), min_size=1, max_size=8),
    remote=st.sets(st.integers(0, 3)),
    window_layers=st.integers(0, 4),
    chunk_tokens=st.integers(1, 9),
)
def test_read_ahead_equals_dynamic_cache(prefill, steps, remote, window_layers, chunk_tokens):
    layers = 4
    cache = ContextKVCache(None, chunk_tokens=chunk_tokens)
    layer_of: dict[int, int] = {}
    per_layer_bytes = 2 * 2 * (prefill + sum(steps) + 100) * 8 * 4  # an upper bound of one layer's chunks
    cache.read_ahead = ReadAhead(window_layers * per_layer_bytes, is_remote=lambda c: layer_of.get(c.data_ptr()) in remote,
                                 placement_key=lambda: "spilled")
    reference = DynamicCache()
    g = torch.Generator().manual_seed(prefill)
    for n in [prefill, *steps]:
        for i in range(layers):
            k, v = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
            got, want = cache.update(k, v, i), reference.update(k, v, i)
            for store in (cache.layers[i]._key_store, cache.layers[i]._value_store):
                for chunk in store.chunks:
                    layer_of.setdefault(chunk.data_ptr(), i)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ra = cache.read_ahead
    assert ra.layers_dropped == 0
    assert ra.layers_used == ra.layers_staged
    if remote - {0}:
        # Every decode step stages the remote layers after the first (layer 0 has no layer
        # before it in a forward to stage it from: it is read in place).
        assert ra.layers_staged == len(steps) * len(remote - {0})


@pytest.mark.parametrize("device", DEVICES)
def test_read_ahead_on_a_device_equals_dynamic_cache(device):
    """Several forwards, every chunk "spilled", a window of about one layer: staged copies
    are used layer after layer (on CUDA: side-stream copies the main stream waits for)."""
    cache = ContextKVCache(None, chunk_tokens=8)
    cache.read_ahead = ReadAhead(1, is_remote=lambda chunk: True, placement_key=lambda: "spilled")
    reference = DynamicCache()
    g = torch.Generator().manual_seed(2)
    for n in (300, 1, 1, 1, 7, 1):
        for i in range(4):
            k, v = (torch.randn(1, 4, n, 64, generator=g).to(device) for _ in range(2))
            got, want = cache.update(k, v, i), reference.update(k, v, i)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (n, i)
    ra = cache.read_ahead
    assert ra.layers_staged == ra.layers_used == 5 * 3 and ra.layers_dropped == 0


def test_no_gpu_memory_for_staging_reads_in_place_and_nothing_fails(monkeypatch):
    cache = ContextKVCache(None, chunk_tokens=4)
    cache.read_ahead = ReadAhead(1 << 30, is_remote=lambda chunk: True, placement_key=lambda: "spilled")
    reference = DynamicCache()
    g = torch.Generator().manual_seed(1)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    for step, n in enumerate((5, 1, 1)):
        if step == 1:
            monkeypatch.setattr(torch, "empty_like", no_memory)
        for i in range(3):
            k, v = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
            got, want = cache.update(k, v, i), reference.update(k, v, i)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ra = cache.read_ahead
    # One refusal per decode forward (it stops staging for the rest of that forward).
    assert ra.out_of_memory == 2 and ra.layers_staged == 0
