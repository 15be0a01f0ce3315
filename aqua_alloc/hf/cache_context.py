"""The part of a KV cache that owns one aqua_alloc context: made by the cache's first
allocation inside it, released once (or when the cache is garbage collected, if its caller
kept it). Shared by :class:`~aqua_alloc.hf.kv_cache.ContextKVCache` (chunks grown in place)
and :class:`~aqua_alloc.hf.static_cache.ContextStaticCache` (tensors made at a layer's
first update).

The caches look the allocator up themselves (``memory_for`` of their own module) and pass it
in, so that each keeps one place where its memory comes from.

Thread-safety: :meth:`ContextOwner.release_once` and :meth:`release_when_collected` may be
called from any thread; the rest runs in the thread of the cache's ``generate`` call.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from typing import Iterator

import torch

from aqua_alloc.hf.context_memory import ContextMemory

log = logging.getLogger(__name__)


class ContextOwner:
    """Mixin: the context ``tag`` (None: ordinary memory, no context) of a cache for
    ``context_device`` (None: the device of the first allocation). ``context_created`` tells
    whether the context exists."""

    def init_context(self, tag: str | None, device: torch.device | str | None) -> None:
        self.tag = tag
        self.context_device = torch.device(device) if device is not None else None
        self.context_created = False
        self._allocator: ContextMemory | None = None  # the allocator that made the context
        self._context_made_on: torch.device | None = None
        self._release_lock = threading.Lock()
        self._released = False

    @contextlib.contextmanager
    def in_context(self, allocator: ContextMemory | None, device: torch.device) -> Iterator[None]:
        """Allocations of this thread go to the context while inside (nowhere special when
        ``allocator`` is None); the first entry creates it and calls :meth:`context_entered`."""
        if allocator is None:
            yield
            return
        with allocator.context(self.tag, device=device):
            self.context_created = True
            self._allocator = allocator
            self._context_made_on = device
            self.context_entered(allocator, device)
            yield

    def context_entered(self, allocator: ContextMemory, device: torch.device) -> None:
        """Called inside the context at each entry (for what needs the allocator, once made)."""

    def release_once(self) -> bool:
        """Mark the cache released; False if it already was (the caller then does nothing)."""
        with self._release_lock:
            if self._released:
                return False
            self._released = True
            return True

    def release_context(self) -> None:
        """Release the context, if one was made (the cache's tensors must be dropped first)."""
        if self.context_created:
            release_context(self._allocator, self.tag, self._context_made_on)

    def release_when_collected(self) -> None:
        """Release the context when this cache is garbage collected (it was handed to the caller)."""
        if self.context_created:
            weakref.finalize(self, release_context, self._allocator, self.tag, self._context_made_on)
            with self._release_lock:
                self._released = True


def release_context(allocator: ContextMemory | None, tag: str | None, device: torch.device | None) -> None:
    """Release a context once the kernels that used it are done; the free path never raises
    (logs and goes on). The cache's tensors must already be dropped."""
    try:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # the last step's kernels may still read the tensors
        allocator.release(tag)
    except Exception:  # noqa: BLE001 - free path: log and keep going
        log.exception("aqua_alloc: releasing context %r failed", tag)
