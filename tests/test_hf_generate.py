"""The generate hook: with aqua_alloc on, every generate call's KV cache is a context of its own.

On CPU the real allocator never applies (contexts are CUDA only), so a fake allocator stands
in for it where the hook must act; exact call records are asserted.
"""

from __future__ import annotations

import contextlib
import gc
import warnings

import pytest
import torch
from transformers import DynamicCache, StoppingCriteriaList
from transformers.generation.utils import GenerationMixin

from aqua_alloc.hf import generate_hook as hf_generate, kv_cache
from aqua_alloc.hf.kv_cache import ContextKVCache
from aqua_alloc.hf.generate_hook import cache_argument, returned_cache
from tiny_models import GREEDY, AtStep, build, llama_config, prompt_ids


@pytest.fixture(scope="module")
def model():
    return build(llama_config())


@pytest.fixture
def hook():
    hf_generate.install_generate_hook()
    yield
    hf_generate.uninstall_generate_hook()


class FakeAllocator:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def is_enabled(self):
        return True

    @contextlib.contextmanager
    def context(self, tag, device=None):
        self.calls.append(("context", tag))
        yield tag

    def release(self, tag):
        self.calls.append(("release", tag))


@pytest.fixture
def fake(monkeypatch, hook):
    allocator = FakeAllocator()
    monkeypatch.setattr(hf_generate, "memory_for", lambda device: allocator)
    monkeypatch.setattr(kv_cache, "memory_for", lambda device: allocator)
    return allocator


def tags(calls, kind):
    """Tags of the calls of one kind, first appearance order (a context is entered per chunk)."""
    return list(dict.fromkeys(tag for k, tag in calls if k == kind))


def test_install_and_uninstall_are_idempotent():
    original = GenerationMixin.generate
    hf_generate.install_generate_hook()
    hf_generate.install_generate_hook()
    try:
        assert GenerationMixin.generate is not original
        assert hf_generate.is_generate_hook_installed()
    finally:
        hf_generate.uninstall_generate_hook()
        hf_generate.uninstall_generate_hook()
    assert GenerationMixin.generate is original
    assert not hf_generate.is_generate_hook_installed()


def test_cpu_calls_pass_through(model, hook):
    ids = prompt_ids(8, seed=1)
    hf_generate.uninstall_generate_hook()
    expected = model.generate(ids, max_new_tokens=10, **GREEDY)
    hf_generate.install_generate_hook()
    out = model.generate(ids, max_new_tokens=10, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, expected)
    assert type(returned_cache(out)) is DynamicCache  # untouched: aqua_alloc does not apply on CPU


def test_each_call_gets_its_own_context_released_at_return(model, fake):
    ids = prompt_ids(8, seed=1)
    expected = model.generate(ids, max_new_tokens=10, use_cache=True, **cache_argument(DynamicCache(config=model.config)),
                              **GREEDY)
    first = model.generate(ids, max_new_tokens=10, **GREEDY)
    second = model.generate(input_ids=ids, max_new_tokens=10, **GREEDY)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    made, released = tags(fake.calls, "context"), tags(fake.calls, "release")
    assert len(made) == 2 and all(tag.startswith("generate-") for tag in made)
    assert released == made  # each released once, at its call's return
    assert sum(1 for k, _ in fake.calls if k == "release") == 2


def test_calls_that_choose_their_cache_are_untouched(model, fake):
    ids = prompt_ids(8, seed=1)
    model.generate(ids, max_new_tokens=4, **cache_argument(DynamicCache(config=model.config)), **GREEDY)
    model.generate(ids, max_new_tokens=4, cache_implementation="static", **GREEDY)
    model.generate(ids, max_new_tokens=4, use_cache=False, **GREEDY)
    assert fake.calls == []


def test_context_released_when_generate_raises(model, fake):
    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.generate(prompt_ids(8, seed=1), max_new_tokens=6,
                       stopping_criteria=StoppingCriteriaList([AtStep(2, boom)]), **GREEDY)
    [made] = tags(fake.calls, "context")
    assert tags(fake.calls, "release") == [made]


def test_returned_cache_is_released_when_collected(model, fake):
    out = model.generate(prompt_ids(8, seed=1), max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
    assert isinstance(returned_cache(out), ContextKVCache)
    assert tags(fake.calls, "release") == []  # the caller still holds the cache
    [made] = tags(fake.calls, "context")
    del out
    gc.collect()
    assert tags(fake.calls, "release") == [made]


# ---------------------------------------------------------------------- the cache keyword


def test_cache_passed_under_cache_keyword_is_used_without_warning(model, hook):
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model.generate(prompt_ids(8, seed=1), max_new_tokens=3, return_dict_in_generate=True,
                             **cache_argument(cache), **GREEDY)
    assert returned_cache(out) is cache
    assert cache.get_seq_length() == 8 + 3 - 1


@pytest.mark.skipif(hf_generate.cache_keyword() != "cache", reason="this transformers takes past_key_values")
def test_deprecated_cache_name_warns_at_the_callers_line(model, fake):
    cache = DynamicCache(config=model.config)
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated .* Use `cache`") as record:
        out = model.generate(prompt_ids(8, seed=1), max_new_tokens=3, return_dict_in_generate=True,
                             past_key_values=cache, **GREEDY)
    assert [w.filename for w in record] == [__file__]  # not the aqua_alloc line that passes it on
    assert returned_cache(out) is cache and fake.calls == []  # the caller's cache, so no context
