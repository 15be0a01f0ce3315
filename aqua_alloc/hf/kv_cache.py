"""A transformers KV cache whose storage lives in one aqua_alloc context and grows in chunks.

transformers' ``DynamicCache`` grows every layer by ``torch.cat`` at every decode step: a new
tensor each step, the old one freed. Inside a context's memory pool that churn leaves freed
blocks cached in the pool's segments, so a parked context would hold far more than its live
KV bytes. :class:`ContextKVCache` keeps the same interface and the same results but stores
each layer's keys and values as a short list of chunks, each ``[B, H, C, D]`` (batch, KV heads,
tokens, head dim), written in place and never reallocated:

- the first chunk(s) hold the prefill (its token count rounded up to ``chunk_tokens``);
- each further chunk holds ``chunk_tokens`` decode tokens;
- sizes follow the segment classes of PyTorch's caching allocator (:func:`chunk_sizes`), so
  the context's segments hold little besides KV (parked footprint close to the live KV bytes).

Only these chunks are allocated inside the context (``allocator.context(tag)``); the tensors
``update`` returns to attention are contiguous copies made outside it (an activation that dies
with the layer's forward), exactly the ``[B, H, S, D]`` tensor ``DynamicCache`` would return,
so attention runs the same kernels on the same layout and greedy output is token-identical.
The per-step copy costs what ``DynamicCache``'s ``torch.cat`` costs.

What stays as transformers made it: layers that are not plain full attention (sliding window,
chunked attention, linear attention, KV-sharing placeholders) keep transformers' own layer
class and live outside the context; they are bounded by their window.

Without a tag, or with aqua_alloc off, or on CPU, the chunks are ordinary tensors: the cache
is then just a lower-churn ``DynamicCache``.

Thread-safety: like every transformers cache, one cache serves one ``generate`` call in one
thread at a time. :meth:`ContextKVCache.release` may be called from any thread once that call
has returned (or failed).

Compatible with transformers 5.x (checked against 5.17 and 5.23): it subclasses
``DynamicCache`` / ``DynamicLayer`` and overrides ``update`` and the length queries; the rarely
used whole-tensor operations (beam reorder, crop, batch select) go through the ``keys`` /
``values`` properties, so the base class's own versions keep working.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterator

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from aqua_alloc.hf.cache_context import ContextOwner
from aqua_alloc.hf.context_memory import ContextMemory, home_tier, is_off_gpu, memory_for, off_gpu_bytes
from aqua_alloc.hf.read_ahead import DEFAULT_READ_AHEAD_BYTES, UNCHANGED, ReadAhead, StagedLayer

log = logging.getLogger(__name__)

DEFAULT_CHUNK_TOKENS = 256  # tokens per decode chunk; the prefill chunk is rounded up to it

# PyTorch's caching allocator in front of a context's pool (c10/cuda/CUDACachingAllocator.cpp:
# kSmallSize, kSmallBuffer, kMinLargeAlloc, kLargeBuffer, kRoundLarge; seen on torch 2.11):
# blocks <= 1 MiB share 2 MiB segments, blocks < 10 MiB share 20 MiB segments, larger blocks
# get a segment of their own rounded up to 2 MiB. Chunk sizes follow it so that a context's
# segments hold little but KV: small chunks pack 2 MiB segments, large ones fill their own.
_SMALL_BLOCK = 1 << 20        # bytes
_OWN_SEGMENT = 10 << 20       # bytes
_SEGMENT_ROUND = 2 << 20      # bytes


def chunk_sizes(num_tokens: int, token_bytes: int, chunk_tokens: int) -> list[int]:
    """Token capacities of the new chunks that hold ``num_tokens`` more tokens of ``token_bytes``.

    At least ``num_tokens`` rounded up to ``chunk_tokens``. A chunk of 10 MiB or more is one
    allocation, grown to fill its 2 MiB-rounded segment (the slack holds later tokens). One of
    1 to 10 MiB (it would share a 20 MiB segment) is split into pieces of at most 1 MiB.
    """
    tokens = -(-num_tokens // chunk_tokens) * chunk_tokens
    if tokens * token_bytes >= _OWN_SEGMENT:
        return [-(-tokens * token_bytes // _SEGMENT_ROUND) * _SEGMENT_ROUND // token_bytes]
    piece = max(_SMALL_BLOCK // token_bytes, 1)
    sizes = [piece] * (tokens // piece)
    if tokens % piece:
        sizes.append(tokens % piece)
    return sizes


class _ChunkedSequence:
    """The keys (or the values) of one layer: logically ``[B, H, S, D]``, stored along S in chunks.

    ``chunks[i]`` is ``[B, H, C_i, D]``; the first ``length`` tokens across them are valid. New
    tokens are copied into the free tail of the last chunk; a new chunk is allocated (through
    ``allocate``) only when it is full. Not thread-safe (one generate call owns it).
    """

    def __init__(self, allocate: Any, chunk_tokens: int) -> None:
        self._allocate = allocate          # (shape, dtype, device) -> tensor, in the context
        self._chunk_tokens = chunk_tokens
        self.chunks: list[torch.Tensor] = []
        self.length = 0                    # valid tokens (S)
        self._empty: torch.Tensor | None = None  # [B, H, 0, D] of the last states appended
        # Decode-step fast paths (a step writes one token and reads all): where the last chunk
        # starts and how many tokens the chunks hold, kept in step with ``chunks``.
        self._last_start = 0               # tokens before the last chunk
        self._capacity = 0                 # tokens the chunks can hold
        self.version = 0                   # bumped whenever valid tokens are rewritten or dropped
        self._signature: tuple | None = None  # see _fits; reset with the chunks

    @property
    def capacity(self) -> int:
        """Tokens the chunks can hold."""
        return self._capacity

    @property
    def nbytes(self) -> int:
        """Bytes held by the chunks (allocated, not only valid)."""
        return sum(chunk.numel() * chunk.element_size() for chunk in self.chunks)

    def clear(self) -> None:
        self.version += 1
        self.chunks = []
        self._signature = None
        self.length = 0
        self._empty = None
        self._last_start = self._capacity = 0

    def append(self, states: torch.Tensor) -> None:
        """Copy ``states`` ``[B, H, n, D]`` in place after the valid tokens."""
        num_new = states.shape[-2]
        if (self.chunks and self._last_start <= self.length and self.length + num_new <= self._capacity
                and self._fits(states)):
            # A decode step: the new tokens go into the free tail of the last chunk.
            self.chunks[-1].narrow(-2, self.length - self._last_start, num_new).copy_(states)
            self.length += num_new
            return
        if self._empty is None or self._empty.shape[:-2] != states.shape[:-2]:
            self._empty = states.new_empty((*states.shape[:-2], 0, states.shape[-1]))
        if self.chunks and not self._fits(states):
            raise ValueError(
                f"KV states {tuple(states.shape)} {states.dtype} on {states.device} do not match the cached "
                f"{tuple(self.chunks[0].shape)} {self.chunks[0].dtype} on {self.chunks[0].device} (except along dim -2)"
            )
        written = 0
        for chunk_start, chunk in self._chunk_spans():
            position = self.length + written  # next token's index along S
            if chunk_start + chunk.shape[-2] <= position or written == num_new:
                continue
            offset = position - chunk_start
            count = min(chunk.shape[-2] - offset, num_new - written)
            chunk[:, :, offset:offset + count].copy_(states[:, :, written:written + count])
            written += count
        per_token = states[:, :, :1].numel() * states.element_size()
        for size in chunk_sizes(num_new - written, per_token, self._chunk_tokens) if written < num_new else []:
            chunk = self._allocate((*states.shape[:-2], size, states.shape[-1]), states.dtype, states.device)
            count = min(size, num_new - written)
            chunk[:, :, :count].copy_(states[:, :, written:written + count])
            written += count
            self.chunks.append(chunk)
            self._last_start = self._capacity
            self._capacity += size
        self.length += num_new

    def materialize(self) -> torch.Tensor | None:
        """A contiguous ``[B, H, length, D]`` tensor of the valid tokens, made outside the context
        (None if nothing was ever appended)."""
        if self.length > self._last_start:
            # The valid tokens reach into the last chunk, so every earlier chunk is full.
            if len(self.chunks) == 1:  # a contiguous copy (see below), in one call
                return torch.narrow_copy(self.chunks[0], -2, 0, self.length)
            last = self.chunks[-1].narrow(-2, 0, self.length - self._last_start)
            return torch.cat([*self.chunks[:-1], last], dim=-2)
        pieces = self._valid_pieces(self.length)
        if not pieces:
            return self._empty
        if len(pieces) == 1:
            # A copy even when the chunk is already contiguous: attention must not read the
            # context's memory in place (it may live on host, and prefill attention reads
            # each key many times).
            return pieces[0].clone(memory_format=torch.contiguous_format)
        return torch.cat(pieces, dim=-2)

    def append_and_gather(self, states: torch.Tensor, copies: dict[int, torch.Tensor]) -> torch.Tensor:
        """:meth:`append`, then the contiguous ``[B, H, length, D]`` tensor of the valid tokens
        built from ``copies`` (chunk index -> a same-shape copy of that chunk, e.g. staged on
        the GPU by read-ahead) where given, the chunks elsewhere, and ``states`` for the new
        tokens. The copies must hold the chunks' tokens as they were before this append."""
        before = self.length
        self.append(states)
        return torch.cat([*self._valid_pieces(before, copies), states], dim=-2)

    def assign(self, states: torch.Tensor | None) -> None:
        """Replace the content by ``states`` ``[B, H, S, D]`` (None or empty: clear)."""
        if states is None or states.dim() != 4:
            self.clear()
            return
        chunk_ptrs = {chunk.untyped_storage().data_ptr() for chunk in self.chunks}
        if states.untyped_storage().data_ptr() in chunk_ptrs:
            states = states.clone()  # a view of our own chunks (e.g. a crop): copy before rewriting them
        if not (self.chunks and self._fits(states) and states.shape[-2] <= self.capacity):
            self.clear()
        self.version += 1
        self.length = 0
        self.append(states)

    def _fits(self, states: torch.Tensor) -> bool:
        """Whether ``states`` match the chunks in all but dim -2 (shape, dtype, device)."""
        if self._signature is None:  # the chunks' (leading dims, head dim, dtype, device), once
            first = self.chunks[0]
            self._signature = (first.shape[:-2], first.shape[-1], first.dtype, first.device)
        lead, head_dim, dtype, device = self._signature
        shape = states.shape
        return shape[:-2] == lead and shape[-1] == head_dim and states.dtype == dtype and states.device == device

    def _valid_pieces(self, length: int, copies: dict[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Views of the first ``length`` tokens, one per chunk holding some, read from
        ``copies[i]`` instead of chunk ``i`` where given."""
        pieces = []
        for i, (chunk_start, chunk) in enumerate(self._chunk_spans()):
            if chunk_start >= length:
                break
            source = copies.get(i, chunk) if copies else chunk
            pieces.append(source[:, :, : min(chunk.shape[-2], length - chunk_start)])
        return pieces

    def _chunk_spans(self) -> Iterator[tuple[int, torch.Tensor]]:
        start = 0
        for chunk in self.chunks:
            yield start, chunk
            start += chunk.shape[-2]


class ChunkedLayer(DynamicLayer):
    """One full-attention layer of a :class:`ContextKVCache` (a ``DynamicLayer`` that does not churn).

    ``keys`` / ``values`` read as the contiguous ``[B, H, S, D]`` tensors (a copy) and can be
    assigned (the base class's reorder/crop/batch methods do so), which rewrites the chunks.
    """

    def __init__(self, owner: "ContextKVCache | None" = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, **kwargs: Any):
        allocate = owner._allocate if owner is not None else _allocate_plain
        self._key_store = _ChunkedSequence(allocate, chunk_tokens)
        self._value_store = _ChunkedSequence(allocate, chunk_tokens)
        super().__init__(**kwargs)

    # The base classes read and assign whole tensors through these two attributes.
    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._key_store.materialize()

    @keys.setter
    def keys(self, states: torch.Tensor | None) -> None:
        self._key_store.assign(states)

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._value_store.materialize()

    @values.setter
    def values(self, states: torch.Tensor | None) -> None:
        self._value_store.assign(states)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._key_store.clear()
        self._value_store.clear()
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``[B, H, n, D]`` states in place; return all cached states (contiguous copies)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._key_store.append(key_states)
        self._value_store.append(value_states)
        return self._key_store.materialize(), self._value_store.materialize()

    def update_from_staged(self, key_states: torch.Tensor, value_states: torch.Tensor,
                           staged: StagedLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`update` reading the earlier tokens of off-GPU chunks from read-ahead copies."""
        return (self._key_store.append_and_gather(key_states, staged.keys),
                self._value_store.append_and_gather(value_states, staged.values))

    def get_seq_length(self) -> int:
        return self._key_store.length if self.is_initialized else 0

    def reset(self) -> None:
        self._key_store.clear()
        self._value_store.clear()
        self.is_initialized = False

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's chunks (keys and values)."""
        return self._key_store.nbytes + self._value_store.nbytes


def _allocate_plain(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


class ContextKVCache(ContextOwner, DynamicCache):
    """A ``DynamicCache`` whose full-attention KV lives in the aqua_alloc context ``tag``.

    Args:
        config: the model config (``model.config``); used, like ``DynamicCache(config=...)``,
            to give sliding-window and other special layers transformers' own layer classes.
            Without it every layer is a :class:`ChunkedLayer`, made on first use.
        tag: the context tag. None: ordinary memory (no context).
        device: the device the context is for (default: the device of the KV states).
        chunk_tokens: tokens per decode chunk (the prefill chunk is rounded up to a multiple).
        read_ahead_bytes: GPU staging for read-ahead of spilled chunks (:mod:`.read_ahead`):
            while a layer computes, later layers' chunks that live off the GPU are copied
            in, up to this many bytes at once. 0: attention reads them in place.
        read_ahead_peers: also stage chunks held by a peer GPU. False (default): only those
            in host memory are staged and a peer's are read in place over NVLink, which was
            faster there (issue 18's run on two H200s, 8B shape, 32k tokens, half the KV
            off the GPU: from the peer 20.7 tokens/s in place against 16.6 staged; from
            host 12.1 in place against 17.8 staged; its logs are not in this repository).
            True stages both.

    The context is created by the first chunk allocated inside it (``context_created``).
    :meth:`release` drops the chunks and releases the context; it is idempotent.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        tag: str | None = None,
        device: torch.device | str | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES,
        read_ahead_peers: bool = False,
    ) -> None:
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        if read_ahead_bytes < 0:
            raise ValueError(f"read_ahead_bytes must be >= 0, got {read_ahead_bytes}")
        super().__init__(config=config)
        self.init_context(tag, device)
        self.chunk_tokens = chunk_tokens
        self.read_ahead_bytes = read_ahead_bytes
        self.read_ahead_peers = read_ahead_peers
        self.read_ahead: ReadAhead | None = None  # made with the context (nothing to stage before)
        make_layer = functools.partial(ChunkedLayer, owner=self, chunk_tokens=chunk_tokens)
        if self.layer_class_to_replicate is not None:
            self.layer_class_to_replicate = make_layer
        # Plain full-attention layers (exactly DynamicLayer) become chunked; special layers stay.
        self.layers = [make_layer() if type(layer) is DynamicLayer else layer for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes held by the chunked layers (what the context holds, before pool rounding)."""
        return sum(layer.nbytes for layer in self.layers if isinstance(layer, ChunkedLayer))

    def live_bytes(self) -> int:
        """Bytes of valid KV tokens in the chunked layers (keys and values)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, ChunkedLayer) and layer._key_store.chunks:
                for store in (layer._key_store, layer._value_store):
                    first = store.chunks[0]
                    per_token = first.numel() // first.shape[-2] * first.element_size()
                    total += per_token * store.length
        return total

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``DynamicCache.update``, with read-ahead of spilled chunks when the context has some."""
        read_ahead = self.read_ahead
        if read_ahead is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        staged = read_ahead.take(layer_idx, self.layers[layer_idx] if layer_idx < len(self.layers) else None)
        if staged is not None:
            out = self.layers[layer_idx].update_from_staged(key_states, value_states, staged)
        else:
            out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        read_ahead.advance(self.layers, layer_idx)
        return out

    def release(self) -> None:
        """Drop every chunk and release the context (if one was made). Never raises; idempotent."""
        if not self.release_once():
            return
        if self.read_ahead is not None:
            self.read_ahead.release()
        for layer in self.layers:
            if isinstance(layer, ChunkedLayer):
                layer.reset()
        self.release_context()

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        context_device = self.context_device or device
        allocator = memory_for(context_device) if self.tag is not None else None
        with self.in_context(allocator, context_device):
            return torch.empty(shape, dtype=dtype, device=device)

    def context_entered(self, allocator: ContextMemory, device: torch.device) -> None:
        """The context exists: read-ahead can ask it where chunks are (nothing to stage before)."""
        if self.read_ahead is None and self.read_ahead_bytes > 0:
            self.read_ahead = ReadAhead(
                self.read_ahead_bytes, functools.partial(is_off_gpu, allocator, peers=self.read_ahead_peers),
                functools.partial(_placement_key, allocator, self.tag, device, self.read_ahead_peers))


def _placement_key(allocator: ContextMemory, tag: str, device: torch.device, peers: bool) -> Any:
    """The context's bytes per tier when some are on a tier read-ahead stages, else None
    (nothing to read ahead); UNCHANGED while aqua_alloc is busy (a move of other contexts:
    not worth a stall at every forward)."""
    try:
        where = allocator.where(tag, wait=False)
    except Exception:  # noqa: BLE001 - released or disabled: nothing to read ahead
        return None
    if where is None:
        return UNCHANGED
    if not off_gpu_bytes(where, home_tier(device), peers):
        return None
    return tuple(sorted(where.items()))
