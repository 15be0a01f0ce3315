"""ContextKVCache: the same tokens as transformers' DynamicCache; chunks written in place.

CPU, aqua_alloc off (chunks are ordinary tensors), except where a fake allocator checks that
the chunks, and only they, are allocated inside the context and that release is exact.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import DynamicCache

from aqua_alloc.hf import kv_cache
from aqua_alloc.hf.kv_cache import ChunkedLayer, ContextKVCache, _ChunkedSequence, chunk_sizes
from aqua_alloc.hf.generate_hook import cache_argument
from tiny_models import GREEDY, build, gpt2_config, llama_config, mistral_config, prompt_ids

MODELS = {
    "llama": llama_config,
    "mistral-full": lambda: mistral_config(sliding_window=None),
    "mistral-sliding": lambda: mistral_config(sliding_window=8),
    "gpt2": gpt2_config,
}


@pytest.fixture(scope="module")
def models():
    return {name: build(make()) for name, make in MODELS.items()}


def padded_batch():
    ids = prompt_ids(11, seed=4, batch=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :1] = 0
    return dict(input_ids=ids, attention_mask=mask)


CALLS = {
    "single": lambda: dict(input_ids=prompt_ids(13, seed=1)),
    "batch": padded_batch,
    "beams": lambda: dict(input_ids=prompt_ids(7, seed=2), num_beams=3),
}


@pytest.mark.parametrize("chunk_tokens", [1, 5, 256])
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("name", list(MODELS))
def test_same_tokens_as_dynamic_cache(models, name, call, chunk_tokens):
    model = models[name]
    kwargs = dict(CALLS[call](), max_new_tokens=20, **GREEDY)
    expected = model.generate(**kwargs, **cache_argument(DynamicCache(config=model.config)))
    default = model.generate(**kwargs)
    cache = ContextKVCache(model.config, chunk_tokens=chunk_tokens)
    out = model.generate(**kwargs, **cache_argument(cache))
    assert torch.equal(out, expected) and torch.equal(out, default)
    chunked = [layer for layer in cache.layers if isinstance(layer, ChunkedLayer)]
    if name == "mistral-sliding":
        assert chunked == []  # sliding layers keep transformers' own class
    else:
        assert len(chunked) == len(cache.layers)
        prompt_len = kwargs["input_ids"].shape[1]
        assert cache.get_seq_length() == prompt_len + 20 - 1


def test_layers_made_lazily_without_config(models):
    model = models["llama"]
    ids = prompt_ids(9, seed=3)
    cache = ContextKVCache(chunk_tokens=4)
    out = model.generate(ids, max_new_tokens=10, **cache_argument(cache), **GREEDY)
    assert torch.equal(out, model.generate(ids, max_new_tokens=10, **GREEDY))
    assert [type(layer) for layer in cache.layers] == [ChunkedLayer, ChunkedLayer]


def test_chunks_grow_in_place_and_bytes_are_exact(models):
    model = models["llama"]  # 2 layers, 2 KV heads, head dim 16, fp32: 128 bytes per token per K (or V)
    cache = ContextKVCache(model.config, chunk_tokens=8)
    model.generate(prompt_ids(10, seed=1), max_new_tokens=12, **cache_argument(cache), **GREEDY)
    layer = cache.layers[0]
    # Prefill of 10 tokens: one chunk of 16 (10 rounded up to 8s); 11 decode tokens: 6 free + one chunk of 8.
    assert [c.shape[-2] for c in layer._key_store.chunks] == [16, 8]
    assert layer.get_seq_length() == 21
    assert cache.nbytes == 2 * 2 * 24 * 128  # layers x (K, V) x tokens of capacity x bytes per token
    assert cache.live_bytes() == 2 * 2 * 21 * 128
    pointers = [c.data_ptr() for c in layer._key_store.chunks]
    layer.update(torch.ones(1, 2, 2, 16), torch.ones(1, 2, 2, 16))  # 2 more tokens fit: no new chunk
    assert [c.data_ptr() for c in layer._key_store.chunks] == pointers
    assert torch.equal(layer.keys[:, :, -2:], torch.ones(1, 2, 2, 16))
    cache.release()
    assert cache.nbytes == 0 and cache.get_seq_length() == 0
    cache.release()  # idempotent


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=12),
       chunk_tokens=st.integers(min_value=1, max_value=6), crop=st.integers(min_value=0, max_value=5))
def test_chunked_sequence_equals_concatenation(sizes, chunk_tokens, crop):
    allocated: list[int] = []

    def allocate(shape, dtype, device):
        allocated.append(shape[-2])
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    seq = _ChunkedSequence(allocate, chunk_tokens)
    parts = [torch.randn(2, 3, n, 4) for n in sizes]
    for part in parts:
        seq.append(part)
    reference = torch.cat(parts, dim=-2)
    assert seq.length == reference.shape[-2]
    assert torch.equal(seq.materialize(), reference)
    assert seq.materialize().is_contiguous()
    # Each new chunk is the overflow rounded up to chunk_tokens; never more than one chunk of slack.
    assert all(n % chunk_tokens == 0 for n in allocated)
    assert seq.capacity - seq.length < max(chunk_tokens, 1) or seq.length == 0
    # Assigning a crop of itself (as DynamicLayer.crop does) keeps the chunks.
    keep = max(seq.length - crop, 0)
    num_allocations = len(allocated)
    seq.assign(seq.materialize()[:, :, :keep])
    assert seq.length == keep and len(allocated) == num_allocations
    if keep:
        assert torch.equal(seq.materialize(), reference[:, :, :keep])


MiB = 1 << 20


def test_chunk_sizes_follow_the_caching_allocator_segment_classes():
    assert chunk_sizes(10, 128, 8) == [16]                      # small: rounded up to chunk_tokens
    assert chunk_sizes(2048, 4096, 256) == [256] * 8            # 8 MiB would share 20 MiB segments: 1 MiB pieces
    assert chunk_sizes(300, 4096, 256) == [256, 256]
    assert chunk_sizes(4096, 4096, 256) == [4096]               # 16 MiB: a segment of its own
    assert chunk_sizes(2600, 4096, 8) == [3072]                 # 10.2 MiB -> its 12 MiB segment, filled
    assert chunk_sizes(1, 3 * MiB, 1) == [1]                    # one token over 1 MiB: cannot split
    assert chunk_sizes(4, 3 * MiB, 1) == [4]                    # 12 MiB: own segment


@settings(max_examples=200, deadline=None)
@given(num_tokens=st.integers(1, 100_000), token_bytes=st.integers(1, 1 << 16), chunk_tokens=st.integers(1, 512))
def test_chunk_sizes_hold_the_tokens_without_sharing_20mib_segments(num_tokens, token_bytes, chunk_tokens):
    sizes = chunk_sizes(num_tokens, token_bytes, chunk_tokens)
    rounded = -(-num_tokens // chunk_tokens) * chunk_tokens
    assert sum(sizes) >= rounded
    for size in sizes:
        nbytes = size * token_bytes
        assert nbytes <= MiB or nbytes >= 10 * MiB or size == 1
    if len(sizes) == 1 and sizes[0] * token_bytes >= 10 * MiB:
        assert sizes[0] * token_bytes <= -(-rounded * token_bytes // (2 * MiB)) * 2 * MiB  # fills its segment
    else:
        assert sum(sizes) == rounded


def test_keys_setter_rebuilds_on_new_batch_size():
    layer = ChunkedLayer(chunk_tokens=4)
    layer.update(torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8))
    keys = layer.keys
    layer.batch_repeat_interleave(3)
    assert torch.equal(layer.keys, keys.repeat_interleave(3, dim=0))
    layer.batch_select_indices(torch.tensor([0, 5]))
    assert torch.equal(layer.keys, keys[[0, 1]])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.keys is None


def test_mismatched_states_are_refused():
    layer = ChunkedLayer(chunk_tokens=4)
    layer.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="do not match"):
        layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))


class FakeAllocator:
    """Counts what is allocated inside a context (by wrapping torch.empty while inside)."""

    def __init__(self):
        self.inside: dict[str, int] = {}
        self.released: list[str] = []
        self.current: str | None = None

    def is_enabled(self):
        return True

    @contextlib.contextmanager
    def context(self, tag, device=None):
        self.current = tag
        try:
            yield tag
        finally:
            self.current = None

    def release(self, tag):
        self.released.append(tag)


def test_only_chunks_are_allocated_in_the_context(models, monkeypatch):
    model = models["gpt2"]
    fake = FakeAllocator()
    monkeypatch.setattr(kv_cache, "memory_for", lambda device: fake)
    real_empty = torch.empty

    def counting_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        if fake.current is not None:
            fake.inside[fake.current] = fake.inside.get(fake.current, 0) + tensor.numel() * tensor.element_size()
        return tensor

    monkeypatch.setattr(torch, "empty", counting_empty)
    cache = ContextKVCache(model.config, tag="ctx", chunk_tokens=8)
    model.generate(prompt_ids(6, seed=1), max_new_tokens=9, **cache_argument(cache), **GREEDY)
    assert cache.context_created
    assert fake.inside == {"ctx": cache.nbytes}  # exactly the chunks, nothing else
    cache.release()
    cache.release()
    assert fake.released == ["ctx"]  # released once


def assert_released_when_collected(model, cache, fake) -> None:
    """A cache handed to its caller (``release_when_collected``, context tag "kept") releases
    its context when collected, not before (the mixin both context caches share)."""
    model.generate(prompt_ids(6, seed=1), max_new_tokens=3, **cache_argument(cache), **GREEDY)
    cache.release_when_collected()
    cache.release()  # the caller holds it: no early release
    assert fake.released == []
    del cache
    gc.collect()
    assert fake.released == ["kept"]


def test_release_when_collected(models, monkeypatch):
    model = models["gpt2"]
    fake = FakeAllocator()
    monkeypatch.setattr(kv_cache, "memory_for", lambda device: fake)
    assert_released_when_collected(model, ContextKVCache(model.config, tag="kept", chunk_tokens=8), fake)
