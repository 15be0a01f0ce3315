"""A transformers static KV cache whose tensors live in one aqua_alloc context.

transformers' ``StaticCache`` preallocates each layer's keys and values, ``[B, H, L, D]``
(batch, KV heads, ``max_cache_len`` tokens, head dim), at its first update and writes them in
place; ``generate`` compiles the decode step on it (CUDA graphs included) because those
tensors never move. :class:`ContextStaticCache` is that cache with those tensors allocated
inside the context ``tag``: the context can be parked, evicted to a peer GPU or host and
resumed between steps, and since aqua_alloc keeps every pointer, the compiled step and any
CUDA graph captured on the cache stay valid wherever its bytes are (read in place while away).
A prefill (eager) attends over one GPU copy of each layer that is off the GPU; decode steps
read in place. transformers' ``sdpa`` attention reads a grouped-query cache several times
per step when compiled; :mod:`aqua_alloc.hf.grouped_attention` reads it once.

What is allocated inside the context: each attention layer's keys, values and its small
per-layer counters, at the layer's first update (transformers' ``lazy_initialization``, run
inside ``allocator.context``). Activations stay outside. Layers stay transformers' own classes
(sliding-window layers included: they are static too). Not in the context: the states of
linear-attention layers and of indexer layers in hybrid models (made by their own update
calls), and any cache of a beam search (it replaces the tensors at every step;
``generate``'s hook and the scheduler leave such calls to transformers' own cache).

Compiled graphs are specialised on ``max_cache_len``. :func:`static_cache_length` rounds a
request's length up to a few buckets (powers of two from ``MIN_BUCKET_TOKENS``), so requests
of different lengths share compiled graphs: a server pays the first-call compile once per
bucket, not per request, for at most twice the KV bytes of the request.

Thread-safety: like every transformers cache, one cache serves one ``generate`` call in one
thread at a time. :meth:`ContextStaticCache.release` may be called from any thread once that
call has returned (or failed).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import StaticCache

from aqua_alloc.hf.cache_context import ContextOwner
from aqua_alloc.hf.context_memory import is_off_gpu, memory_for

MIN_BUCKET_TOKENS = 256  # the smallest max_cache_len a bucket rounds to (tokens)


def static_cache_length(num_tokens: int) -> int:
    """The ``max_cache_len`` for a request of ``num_tokens`` (prompt plus new tokens): the
    next power of two, at least ``MIN_BUCKET_TOKENS``."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens!r}: expected a whole number of tokens, at least 1")
    return max(MIN_BUCKET_TOKENS, 1 << (num_tokens - 1).bit_length())


class ContextStaticCache(ContextOwner, StaticCache):
    """``StaticCache`` with its tensors in the context ``tag`` (see the module docstring).

    Args:
        config: the model config (``model.config``), as for ``StaticCache``.
        max_cache_len: tokens each layer holds (:func:`static_cache_length` buckets it).
        tag: the context tag. None: ordinary memory (a plain ``StaticCache``).
        device: the device the context is for (default: the device of the KV states).

    The context is created by the first layer initialised inside it (``context_created``).
    :meth:`release` drops the tensors and releases the context; it is idempotent.
    """

    def __init__(self, config: Any, max_cache_len: int, *, tag: str | None = None,
                 device: torch.device | str | None = None, **kwargs: Any) -> None:
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.init_context(tag, device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``StaticCache.update``; a layer's first update allocates its tensors in the context."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if layer is not None and not getattr(layer, "is_initialized", True):
            self._initialize_in_context(layer, key_states, value_states)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if key_states.shape[-2] > 1 and self._allocator is not None and not torch.compiler.is_compiling():
            # A prefill (several query tokens; never compiled): SDPA reads the keys and values
            # once per block of queries, so a layer off this GPU would cross the link hundreds of
            # times (8B shape, 32k tokens, half on host: 23.5 s against 1.8 s). Attention reads
            # one copy on the GPU instead, a transient activation; the cache keeps its bytes where
            # they are. Decode steps (one query) read each element once: in place.
            keys = _gpu_copy(keys) if is_off_gpu(self._allocator, keys) else keys
            values = _gpu_copy(values) if is_off_gpu(self._allocator, values) else values
        return keys, values

    def _initialize_in_context(self, layer: Any, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self._released:
            raise RuntimeError(f"ContextStaticCache {self.tag!r} was released; make a new cache for a new call")
        device = self.context_device or key_states.device
        allocator = memory_for(device) if self.tag is not None else None
        with self.in_context(allocator, device):
            layer.lazy_initialization(key_states, value_states)

    @property
    def nbytes(self) -> int:
        """Bytes of the layers' keys and values (what the context holds, before pool rounding)."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)

    def live_bytes(self, tokens: int | None = None) -> int:
        """Bytes of valid KV tokens (keys and values, every layer; a sliding-window layer holds
        at most its window). ``tokens``: the cache's token count where the caller knows it on
        the host (the scheduler does: the sequence so far less its newest token), so nothing
        waits for the GPU; None reads the count from the cache (a device sync for CUDA tensors)."""
        layers = [(layer.keys, layer.values) for layer in self.layers
                  if getattr(layer, "keys", None) is not None and getattr(layer, "values", None) is not None
                  and layer.keys.dim() >= 3]
        if not layers:
            return 0
        if tokens is None:
            tokens = int(self.get_seq_length())
        elif isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens={tokens!r}: expected a whole number of cached tokens, at least 0, or None")
        total = 0
        for keys, values in layers:
            per_token = (keys.numel() // keys.shape[-2]) * keys.element_size() \
                + (values.numel() // values.shape[-2]) * values.element_size()
            total += per_token * min(tokens, keys.shape[-2])
        return total

    def release(self) -> None:
        """Drop every layer's tensors and release the context (if one was made). Never
        raises; idempotent. The cache cannot be used afterwards."""
        if not self.release_once():
            return
        for layer in self.layers:
            _drop_tensors(layer)
        self.release_context()


def _gpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` on its GPU for a prefill's attention, or ``tensor`` itself (read in
    place, slower) when the GPU has no room for it: it spilled because memory was short."""
    try:
        return tensor.clone()
    except torch.OutOfMemoryError:
        return tensor


def _drop_tensors(layer: Any) -> None:
    """Forget every tensor a layer holds (keys, values and the counters its initialisation
    put in the context), leaving it uninitialised."""
    for name, value in list(vars(layer).items()):
        if isinstance(value, torch.Tensor):
            setattr(layer, name, None)
    if hasattr(layer, "is_initialized"):
        layer.is_initialized = False
