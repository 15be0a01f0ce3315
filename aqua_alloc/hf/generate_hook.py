"""Every HuggingFace ``generate`` call keeps its KV cache in a context of its own.

:func:`install_generate_hook` wraps the public entry point ``GenerationMixin.generate`` (and
nothing inside transformers). While aqua_alloc is enabled and the model is on a CUDA device,
each call that would have made transformers' default ``DynamicCache`` gets a
:class:`~aqua_alloc.hf.kv_cache.ContextKVCache` instead, tagged ``"generate-<n>"``: the context is
made by the cache's first chunk and released when the call returns (or raises). If the caller
asked for the cache back (``return_dict_in_generate=True``), it is released when that cache is
garbage collected. Calls that pass their own cache (the scheduler does), ask for another cache
implementation, or run on CPU go through untouched.

The cache keyword: transformers 5.25 renamed generate's ``past_key_values`` to ``cache`` (the old
name still works there, with a FutureWarning per call, until 6.0; its outputs' field is renamed
too). :func:`cache_keyword` tells which name the installed transformers takes; aqua_alloc passes
and reads caches under that name only, so that none of its own calls warns.

Thread-safety: install/uninstall take a lock and are idempotent; the wrapper itself keeps no
shared state beyond a process-wide counter, so calls may run in many threads at once.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import sys
import threading
import warnings
from typing import Any, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import StaticCache
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

from aqua_alloc.hf.context_memory import memory_for
from aqua_alloc.hf.kv_cache import DEFAULT_CHUNK_TOKENS, ContextKVCache
from aqua_alloc.hf.static_cache import ContextStaticCache, static_cache_length

_lock = threading.Lock()
_original_generate: Callable[..., Any] | None = None
_call_numbers = itertools.count()

# Names under which a generate call may carry a cache, this transformers' or not (5.25 deprecates
# the last two; ``cache_params`` was the state-space models' name).
_CACHE_NAMES = ("cache", "past_key_values", "cache_params")


@functools.cache
def cache_keyword() -> str:
    """The keyword under which the installed transformers' ``generate`` takes a KV cache, which
    is also the field of its output that returns it: ``"cache"`` from transformers 5.25,
    ``"past_key_values"`` before. Neither is a named parameter of generate's signature (both go
    through ``**kwargs``), so the output's fields tell (they were renamed in the same release)."""
    if "cache" in inspect.signature(GenerationMixin.generate).parameters:
        return "cache"
    return "cache" if "cache" in getattr(GenerateDecoderOnlyOutput, "__dataclass_fields__", {}) else "past_key_values"


def cache_argument(cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a generate call: ``model.generate(ids, **cache_argument(cache))``.
    For a static cache also ``cache_implementation=None``: transformers refuses a cache passed
    with a cache implementation, which a model's generation config may set."""
    if isinstance(cache, StaticCache):
        return {cache_keyword(): cache, "cache_implementation": None}
    return {cache_keyword(): cache}


def with_cache(kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
    """A generate call's keyword arguments with ``cache`` added (:func:`cache_argument`). When
    the call passes its own ``generation_config``, a static cache's ``cache_implementation=None``
    goes into a copy of it rather than beside it (transformers deprecates generation
    arguments passed next to a generation config)."""
    extra = cache_argument(cache)
    config = kwargs.get("generation_config")
    if "cache_implementation" in extra and config is not None and "cache_implementation" not in kwargs:
        config = copy.deepcopy(config)
        config.cache_implementation = None
        return kwargs | {cache_keyword(): cache, "generation_config": config}
    return kwargs | extra


def returned_cache(output: Any) -> Any:
    """The cache a generate call returned (``return_dict_in_generate=True``), or None."""
    return getattr(output, cache_keyword(), None) if not isinstance(output, torch.Tensor) else None


def renamed_cache_argument(kwargs: dict, model: Any = None) -> dict:
    """``kwargs`` of a caller's generate call, its cache passed under the keyword that the
    installed transformers takes. A cache passed under a name it deprecates is renamed here,
    with transformers' FutureWarning pointed at the caller's line: passed on as it is, the
    warning would name the aqua_alloc line that passed it on."""
    keyword = cache_keyword()
    old = [name for name in _CACHE_NAMES if name != keyword and name in kwargs]
    if not old or keyword in kwargs or keyword != "cache":
        return kwargs  # nothing to rename, or a mix transformers itself refuses
    renamed = dict(kwargs)
    renamed[keyword] = renamed.pop(old[0])
    where = f"{type(model).__name__}.generate" if model is not None else "generate"
    warnings.warn(f"`{old[0]}` is deprecated and will be removed in version 6.0.0 for `{where}`. Use `{keyword}` "
                  "instead.", FutureWarning, stacklevel=_caller_stacklevel())
    return renamed


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from its caller, of the nearest frame outside aqua_alloc."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("aqua_alloc."):
        frame, level = frame.f_back, level + 1
    return level


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
    kwargs = renamed_cache_argument(kwargs, model)
    device = model_device(model)
    if memory_for(device) is None:
        return original(model, *args, **kwargs)
    cache = make_context_cache(model, args, kwargs, f"generate-{next(_call_numbers)}", device)
    if cache is None:
        return original(model, *args, **kwargs)
    try:
        output = original(model, *args, **with_cache(kwargs, cache))
    except BaseException:
        cache.release()
        raise
    if returned_cache(output) is cache:
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


def with_step_hooks(model: Any, args: tuple, kwargs: dict, first: StoppingCriteria, last: StoppingCriteria,
                    wrap_streamer: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """The call's arguments with ``first`` before and ``last`` after the caller's stopping
    criteria, and the caller's streamer (if any) replaced by ``wrap_streamer(streamer)``.

    transformers calls the criteria in list order once per decode step, so ``first`` counts a
    step even when a caller's criterion raises in it, and ``last`` runs after every criterion
    of the caller has seen the step's token. A streamer gets each token once per step too,
    before the criteria or after them depending on the decoding method and the release; the
    wrapper lets the scheduler act after both, whatever the order."""
    try:
        bound = inspect.signature(unscheduled_generate(model)).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        bound = None
    readable = bound is not None and "stopping_criteria" in bound.signature.parameters
    arguments = bound.arguments if readable else dict(kwargs)  # unreadable: pass both by keyword
    arguments["stopping_criteria"] = StoppingCriteriaList([first, *(arguments.get("stopping_criteria") or []), last])
    if arguments.get("streamer") is not None:
        arguments["streamer"] = wrap_streamer(arguments["streamer"])
    return (bound.args, bound.kwargs) if readable else (args, arguments)


def describe_call(model: Any, args: tuple, kwargs: dict) -> tuple[int, int | None, int]:
    """(batch size, max new tokens or None if unknown, prompt tokens per sequence; 0 if
    unknown) of a generate call."""
    named = bind_arguments(model, args, kwargs)
    inputs = next((named[k] for k in ("inputs", "input_ids", "inputs_embeds") if named.get(k) is not None), None)
    batch_size = int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) and inputs.dim() > 0 else 1
    prompt_tokens = int(inputs.shape[1]) if isinstance(inputs, torch.Tensor) and inputs.dim() > 1 else 0
    max_new_tokens = named.get("max_new_tokens")
    if max_new_tokens is None and "max_length" not in named:
        config = named.get("generation_config") or getattr(model, "generation_config", None)
        max_new_tokens = getattr(config, "max_new_tokens", None)
    return batch_size, max_new_tokens, prompt_tokens


def _call_length(named: dict[str, Any], configs: list[Any]) -> int | None:
    """Tokens a generate call may end with (prompt plus new tokens), or None if not known
    here: the most that any of the call's limits allows. transformers fills a passed
    generation config's unset fields from the model's and ``max_new_tokens`` wins over
    ``max_length``; taking the largest candidate never sizes a cache too small."""
    inputs = next((named[k] for k in ("inputs", "input_ids") if named.get(k) is not None), None)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        return None
    new_tokens = [named.get("max_new_tokens")] + [getattr(c, "max_new_tokens", None) for c in configs]
    lengths = [named.get("max_length")] + [getattr(c, "max_length", None) for c in configs]
    candidates = [int(inputs.shape[-1]) + int(n) for n in new_tokens if n is not None]
    candidates += [int(n) for n in lengths if n is not None]
    return max(candidates) if candidates else None


def make_context_cache(
    model: Any, args: tuple, kwargs: dict, tag: str, device: torch.device | None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> ContextKVCache | ContextStaticCache | None:
    """The cache for this generate call in the context ``tag``: a :class:`ContextKVCache` where
    generate would have made a ``DynamicCache``, a :class:`ContextStaticCache` (its length
    bucketed) where it asks for ``cache_implementation="static"``; None otherwise (the caller
    passed a cache, asked for another implementation or none, the model is encoder-decoder or
    brings its own cache, or a static call's length cannot be told before it runs)."""
    named = bind_arguments(model, args, kwargs)
    if any(named.get(name) is not None for name in _CACHE_NAMES) or named.get("use_cache") is False:
        return None
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    generation_config = named.get("generation_config") or getattr(model, "generation_config", None)
    cache_implementation = named.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
    if getattr(generation_config, "use_cache", True) is False:
        return None
    if cache_implementation == "static":
        # Beam search reorders a cache by replacing its tensors (index_select): they would
        # leave the context at the first step. transformers' own static cache serves it.
        num_beams = named.get("num_beams", getattr(generation_config, "num_beams", 1)) or 1
        length = _call_length(named, [c for c in (named.get("generation_config"), getattr(model, "generation_config",
                                                                                          None)) if c is not None])
        if length is None or num_beams > 1:
            return None
        return ContextStaticCache(config, max_cache_len=static_cache_length(length), tag=tag, device=device)
    if cache_implementation not in (None, "dynamic"):
        return None
    supports_dynamic = getattr(model, "_supports_default_dynamic_cache", None)
    if callable(supports_dynamic) and not supports_dynamic():
        return None
    return ContextKVCache(config.get_text_config(decoder=True), tag=tag, device=device, chunk_tokens=chunk_tokens)
