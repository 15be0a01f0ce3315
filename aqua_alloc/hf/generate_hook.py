"""Every HuggingFace ``generate`` call keeps its KV cache in a context of its own.

:func:`install_generate_hook` wraps the public entry point ``GenerationMixin.generate`` (and
nothing inside transformers). While aqua_alloc is enabled and the model is on a CUDA device,
each call that would have made transformers' default ``DynamicCache`` gets a
:class:`~aqua_alloc.hf.kv_cache.ContextKVCache` instead, tagged ``"generate-<n>"``: the context is
made by the cache's first chunk and released when the call returns (or raises). If the caller
asked for the cache back (``return_dict_in_generate=True``), it is released when that cache is
garbage collected. Calls that pass their own ``past_key_values`` (the scheduler does), ask for
another cache implementation, or run on CPU go through untouched.

Thread-safety: install/uninstall take a lock and are idempotent; the wrapper itself keeps no
shared state beyond a process-wide counter, so calls may run in many threads at once.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
from typing import Any, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerationMixin

from aqua_alloc.hf.context_memory import memory_for
from aqua_alloc.hf.kv_cache import DEFAULT_CHUNK_TOKENS, ContextKVCache

_lock = threading.Lock()
_original_generate: Callable[..., Any] | None = None
_call_numbers = itertools.count()


def install_generate_hook() -> None:
    """Wrap ``GenerationMixin.generate`` (idempotent)."""
    global _original_generate
    with _lock:
        if _original_generate is not None:
            return
        original = GenerationMixin.generate

        @functools.wraps(original)
        def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
            return _generate_in_context(original, self, args, kwargs)

        generate.__aqua_hook__ = True
        GenerationMixin.generate = generate
        _original_generate = original


def uninstall_generate_hook() -> None:
    """Put the original ``GenerationMixin.generate`` back (idempotent)."""
    global _original_generate
    with _lock:
        if _original_generate is None:
            return
        GenerationMixin.generate = _original_generate
        _original_generate = None


def is_generate_hook_installed() -> bool:
    return _original_generate is not None


def _generate_in_context(original: Callable[..., Any], model: Any, args: tuple, kwargs: dict) -> Any:
    device = model_device(model)
    if memory_for(device) is None:
        return original(model, *args, **kwargs)
    cache = make_context_cache(model, args, kwargs, f"generate-{next(_call_numbers)}", device)
    if cache is None:
        return original(model, *args, **kwargs)
    try:
        output = original(model, *args, past_key_values=cache, **kwargs)
    except BaseException:
        cache.release()
        raise
    if getattr(output, "past_key_values", None) is cache:
        cache.release_when_collected()
    else:
        cache.release()
    return output


# ---------------------------------------------------------------------- generate call arguments


def unscheduled_generate(model: Any) -> Callable[..., Any]:
    """``model.generate`` before any :meth:`aqua_alloc.hf.scheduler.Scheduler.wrap`."""
    return model.__dict__.get("_aqua_unscheduled_generate") or model.generate


def model_device(model: Any) -> torch.device | None:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else None


def bind_arguments(model: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Named arguments of a generate call (positional ones named by generate's signature)."""
    try:
        bound = inspect.signature(unscheduled_generate(model)).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        parameter = bound.signature.parameters[name]
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


def with_stopping_criterion(model: Any, args: tuple, kwargs: dict, hook: StoppingCriteria) -> tuple[tuple, dict]:
    """The call's arguments with ``hook`` first among its stopping criteria (so a step is counted
    even when a caller's criterion raises in it)."""
    try:
        bound = inspect.signature(unscheduled_generate(model)).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        bound = None
    if bound is not None and "stopping_criteria" in bound.signature.parameters:
        existing = bound.arguments.get("stopping_criteria")
        bound.arguments["stopping_criteria"] = StoppingCriteriaList([hook, *(existing or [])])
        return bound.args, bound.kwargs
    call_kwargs = dict(kwargs)  # a signature we cannot read: pass the criterion by keyword
    call_kwargs["stopping_criteria"] = StoppingCriteriaList([hook, *(call_kwargs.get("stopping_criteria") or [])])
    return args, call_kwargs


def describe_call(model: Any, args: tuple, kwargs: dict) -> tuple[int, int | None]:
    """(batch size, max new tokens or None if unknown) of a generate call."""
    named = bind_arguments(model, args, kwargs)
    inputs = next((named[k] for k in ("inputs", "input_ids", "inputs_embeds") if named.get(k) is not None), None)
    batch_size = int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) and inputs.dim() > 0 else 1
    max_new_tokens = named.get("max_new_tokens")
    if max_new_tokens is None and "max_length" not in named:
        config = named.get("generation_config") or getattr(model, "generation_config", None)
        max_new_tokens = getattr(config, "max_new_tokens", None)
    return batch_size, max_new_tokens


def make_context_cache(
    model: Any, args: tuple, kwargs: dict, tag: str, device: torch.device | None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> ContextKVCache | None:
    """A :class:`ContextKVCache` for this generate call, or None where generate would not have
    made a ``DynamicCache`` itself (the caller passed a cache, asked for another cache
    implementation or none, or the model is encoder-decoder or brings its own cache)."""
    named = bind_arguments(model, args, kwargs)
    if named.get("past_key_values") is not None or named.get("use_cache") is False:
        return None
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    generation_config = named.get("generation_config") or getattr(model, "generation_config", None)
    cache_implementation = named.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
    if cache_implementation not in (None, "dynamic"):
        return None
    if getattr(generation_config, "use_cache", True) is False:
        return None
    supports_dynamic = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports_dynamic) and not supports_dynamic():
        return None
    return ContextKVCache(config.get_text_config(decoder=True), tag=tag, device=device, chunk_tokens=chunk_tokens)
