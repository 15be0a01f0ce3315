"""Read-ahead of spilled KV: copy later layers' off-GPU chunks to the GPU while earlier layers compute.

A context that outgrew its GPU keeps part of its KV chunks on a peer GPU or in host memory,
mapped at the same addresses (aqua_alloc spill). Attention can read them there in place, but
a decode step reads every chunk once, so reading in place puts the whole link transfer
(e.g. 2 GiB over PCIe, about 42 ms) in series with the step's compute (about 31 ms for an 8B
model). This module overlaps the two, the way transformers' offloaded cache does for a cache
held wholly on the host, but only for the chunks that are not on the GPU:

- after layer ``L`` has been updated, the chunks of layers ``L+1, L+2, ...`` that live off the
  GPU are copied, on a side stream (the copy engine), into staging buffers on the GPU, up to
  ``window_bytes`` of staging not yet consumed;
- when layer ``j`` is updated, the main stream waits for its copies (an event, not the host)
  and the cache builds the ``[B, H, S, D]`` tensors it returns from the staged copies instead
  of the off-GPU chunks.

Staging starts after the first layer's update, so that layer, if spilled, is read in place
(staging it during the previous step would leave copies in flight across the step boundary,
where the scheduler may park the context).

The chunks themselves never move and stay the only copy (a staging buffer is a read-only
snapshot consumed within the same forward). A staged layer is used only if it is still what
was copied: same token count, and no rewrite since (:attr:`_ChunkedSequence.version`);
otherwise it is dropped and the layer is read in place as before.

What is on the GPU is asked of aqua_alloc (:func:`aqua_alloc.memory.allocator.placement`) once per
chunk, and again only after the context's per-tier bytes change; a context wholly on its GPU
costs one ``where()`` per forward.

Ordering (CUDA streams): each batch of copies waits for the main stream's work queued so far
(the chunk's last writes), and the main stream waits for a layer's copies before using them.
Staging buffers are allocated on the main stream, so the caching allocator only reuses them
after the main stream is past their last use. They are ordinary activations: outside any
context, unless the caller runs ``generate`` itself inside ``aqua_alloc.context()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch

# Staging held at most at once; 0 turns read-ahead off. 1 GiB: on an H200 with half of a
# 32k-token 8B context (2 GiB) on host, 512 MiB left the copy engine idle for part of each
# step (52 ms/token) and 1 GiB did not (43 ms; the link's floor is 40 ms); see
# benchmarks/results/bench_long_prompt-windows-*.
DEFAULT_READ_AHEAD_BYTES = 1 << 30
_NO_LAYER = 1 << 62  # "no layer taken yet": the first take starts a forward
# What a placement_key returns when it cannot tell now without waiting (aqua_alloc is busy
# moving contexts): the last forward's answer stands. A running context's chunks move only
# at its own thread's request (a resume, a spill), ordered before the kernels that follow,
# so that answer is at worst stale about where chunks are, never about their bytes: staging
# a chunk that is now home, or reading in place one that is now away, is slower, not wrong.
UNCHANGED = object()


@dataclass
class StagedLayer:
    """GPU copies of one layer's off-GPU chunks, taken when the layer held ``length`` tokens."""

    length: int                                   # tokens of the layer when copied
    versions: tuple[int, int]                     # (keys, values) versions when copied
    keys: dict[int, torch.Tensor] = field(default_factory=dict)    # chunk index -> copy
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # chunk index -> copy
    nbytes: int = 0
    device: torch.device | None = None
    ready: Any = None                             # CUDA event recorded after the copies (None: CPU)

    def wait(self) -> None:
        """Make the current stream wait (on the GPU) until the copies are done."""
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)


class ReadAhead:
    """Stages off-GPU chunks of the layers ahead of the one being updated (see the module doc).

    Args:
        window_bytes: staging bytes held at most at once (copied, not yet consumed). A layer
            larger than the window is still staged alone.
        is_remote: ``chunk -> bool``: whether a chunk has bytes off its GPU.
        placement_key: ``() -> key``: called once per forward; None when the whole context is
            on its GPU (nothing to stage), else a value that changes when chunks may have
            moved (e.g. the context's bytes per tier); ``is_remote`` is then asked again.
            :data:`UNCHANGED`: cannot tell without waiting; the last forward's answer stands.

    Counters for tests and benchmarks: ``layers_staged``, ``layers_used``, ``layers_dropped``,
    ``bytes_staged``, ``peak_bytes`` (staging held at once), ``out_of_memory`` (times the GPU
    had no memory for staging: those layers were read in place, nothing failed).
    """

    def __init__(self, window_bytes: int, is_remote: Callable[[torch.Tensor], bool],
                 placement_key: Callable[[], Hashable]) -> None:
        if window_bytes < 0:
            raise ValueError(f"read_ahead_bytes must be >= 0, got {window_bytes}")
        self.window_bytes = window_bytes
        self._is_remote = is_remote
        self._placement_key = placement_key
        self._key: Hashable = None               # placement_key() at the last forward
        self._remote: dict[int, bool] = {}       # chunk data_ptr -> has bytes off the GPU
        self._any_remote = False                 # this forward: something may be off the GPU
        self._staged: dict[int, StagedLayer] = {}  # layer index -> staged copies
        self._next = 0                           # next layer to consider in this forward
        self._prev_layer = _NO_LAYER             # the layer last taken; lower or equal: new forward
        self._stream: Any = None                 # side stream (CUDA), made on first use
        self.layers_staged = self.layers_used = self.layers_dropped = 0
        self.out_of_memory = 0                   # staging skipped: no GPU memory for the copies
        self.bytes_staged = self.peak_bytes = 0

    def take(self, layer_idx: int, layer: Any) -> StagedLayer | None:
        """Called before layer ``layer_idx`` is updated: its staged copies if still valid (the
        current stream then waits for them), else None."""
        if layer_idx <= self._prev_layer:  # a new forward
            self._new_forward()
        self._prev_layer = layer_idx
        for stale in [j for j in self._staged if j < layer_idx]:
            self._drop(stale)
        staged = self._staged.pop(layer_idx, None)
        if staged is None:
            return None
        # Used or stale, the main stream waits for its copies: before reading them, or (stale)
        # before the staging memory is reused or the chunks are rewritten or moved.
        staged.wait()
        if (staged.length != layer._key_store.length
                or staged.versions != (layer._key_store.version, layer._value_store.version)):
            self.layers_dropped += 1
            return None
        self.layers_used += 1
        return staged

    def advance(self, layers: Sequence[Any], layer_idx: int) -> None:
        """Called after layer ``layer_idx`` was updated: stage later layers up to the window."""
        if not self._any_remote:
            return
        j = max(self._next, layer_idx + 1)
        while j < len(layers):
            layer = layers[j]
            if j in self._staged:
                j += 1
                continue
            wanted = self._remote_chunks(layer)
            if wanted is not None:
                nbytes = sum(c.numel() * c.element_size() for _, _, c in wanted)
                held = self._held
                if held and held + nbytes > self.window_bytes:
                    break
                if not self._stage(j, layer, wanted, nbytes):
                    j = len(layers)  # no GPU memory for staging: read in place for the rest of this forward
                    break
            j += 1
        self._next = j

    def release(self) -> None:
        """Drop every staged copy, once its copies are done (waited on the host: the caller
        may be another thread than the one whose stream would otherwise be ordered)."""
        for j in list(self._staged):
            self._drop(j, host_wait=True)

    # --- internals ---------------------------------------------------------------------------

    @property
    def _held(self) -> int:
        """Staging bytes copied and not yet taken."""
        return sum(staged.nbytes for staged in self._staged.values())

    def _new_forward(self) -> None:
        for j in list(self._staged):  # left by a forward that did not finish
            self._drop(j)
        self._next = 0
        key = self._placement_key()
        if key is UNCHANGED:
            return
        if key != self._key:
            self._remote.clear()
            self._key = key
        self._any_remote = key is not None

    def _remote_chunks(self, layer: Any) -> list[tuple[str, int, torch.Tensor]] | None:
        """The (store, chunk index, chunk) of ``layer`` holding valid tokens off the GPU, or None."""
        if not getattr(layer, "_key_store", None) or layer._key_store.length == 0:
            return None
        out = []
        for name, store in (("keys", layer._key_store), ("values", layer._value_store)):
            for i, (start, chunk) in enumerate(store._chunk_spans()):
                if start >= store.length:
                    break
                ptr = chunk.data_ptr()
                remote = self._remote.get(ptr)
                if remote is None:
                    remote = self._remote[ptr] = bool(self._is_remote(chunk))
                if remote:
                    out.append((name, i, chunk))
        return out or None

    def _stage(self, layer_idx: int, layer: Any, wanted: list[tuple[str, int, torch.Tensor]], nbytes: int) -> bool:
        """Stage one layer; False (nothing staged) when the GPU has no memory for the copies."""
        device = wanted[0][2].device
        staged = StagedLayer(length=layer._key_store.length,
                             versions=(layer._key_store.version, layer._value_store.version), nbytes=nbytes,
                             device=device)
        # Staging buffers on the main stream (see the module doc), then the copies on the side stream.
        try:
            copies = [(name, i, chunk, torch.empty_like(chunk)) for name, i, chunk in wanted]
        except torch.OutOfMemoryError:
            self.out_of_memory += 1
            return False
        if device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            self._stream.wait_stream(torch.cuda.current_stream(device))
            try:
                with torch.cuda.stream(self._stream):
                    for _, _, chunk, copy in copies:
                        copy.copy_(chunk, non_blocking=True)
                    staged.ready = torch.cuda.Event()
                    staged.ready.record(self._stream)
            except BaseException:
                # Some copies may be in flight: the staging memory is freed on the main stream.
                torch.cuda.current_stream(device).wait_stream(self._stream)
                raise
        else:  # CPU (tests): the same bookkeeping, copies in line
            for _, _, chunk, copy in copies:
                copy.copy_(chunk)
        for name, i, _, copy in copies:
            getattr(staged, name)[i] = copy
        self._staged[layer_idx] = staged
        self.layers_staged += 1
        self.bytes_staged += nbytes
        self.peak_bytes = max(self.peak_bytes, self._held)
        return True

    def _drop(self, layer_idx: int, host_wait: bool = False) -> None:
        staged = self._staged.pop(layer_idx)
        self.layers_dropped += 1
        # The copies may still be reading the chunks: the main stream must not run ahead of
        # them (a park, a rewrite or a free of the chunks follows main-stream order).
        if host_wait and staged.ready is not None:
            staged.ready.synchronize()
        else:
            staged.wait()
