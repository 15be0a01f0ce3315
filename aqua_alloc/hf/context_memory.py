"""What the HuggingFace layer asks of the memory layer, as one typed interface.

The KV cache, the generate hook and the scheduler never reach into the allocator module:
they hold a :class:`ContextMemory`, which :func:`memory_for` gives them when contexts apply
to a device (a CUDA device, with aqua_alloc enabled) and None otherwise (on CPU, or with
aqua_alloc off, callers only schedule). :class:`AllocatorMemory` is the running aqua_alloc;
tests pass fakes that implement the same methods.

Thread-safety: the allocator's own (every method may be called from any thread).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, ContextManager, Protocol

import torch

__all__ = ["ContextMemory", "AllocatorMemory", "home_tier", "is_enabled", "is_off_gpu", "memory_for",
           "off_gpu_bytes"]


class ContextMemory(Protocol):
    """Contexts of KV memory on one GPU, by tag (see :mod:`aqua_alloc.memory.allocator`)."""

    def context(self, tag: str, device: Any = None) -> ContextManager[str]:
        """Route this thread's CUDA allocations to context ``tag`` (made on first use)."""

    def release(self, tag: str) -> None:
        """Free the context once its tensors are gone."""

    def park(self, tag: str) -> None:
        """Mark the context not running: a candidate for eviction."""

    def resume(self, tag: str, wait: bool = True) -> Any:
        """Bring its bytes back: a MoveResult, or with ``wait=False`` a Future of one."""

    def prefetch(self, tag: str) -> concurrent.futures.Future:
        """Start bringing it back; nothing waits for it (a Future of a MoveResult)."""

    def wait_on_stream(self, future: concurrent.futures.Future, stream: Any = None) -> bool:
        """Make later work on ``stream`` wait for ``future``'s move on the GPU; False where
        the driver cannot (then the caller waits on the host)."""

    def where(self, tag: str, *, wait: bool = True) -> dict[str, int] | None:
        """Bytes of the context per tier; with ``wait=False`` None while a move runs."""

    def placement(self, tensor: torch.Tensor) -> dict[str, int]:
        """Bytes of one tensor's storage per tier."""

    def reclaim_pending(self) -> bool:
        """Whether a lender waits for running contexts to move off it."""


class AllocatorMemory:
    """The running aqua_alloc of this process, as a :class:`ContextMemory`."""

    def __init__(self) -> None:
        from aqua_alloc.memory import allocator  # noqa: PLC0415 - the core is optional here

        self._allocator = allocator

    def context(self, tag: str, device: Any = None) -> ContextManager[str]:
        return self._allocator.context(tag, device=device)

    def release(self, tag: str) -> None:
        self._allocator.release(tag)

    def park(self, tag: str) -> None:
        self._allocator.park(tag)

    def resume(self, tag: str, wait: bool = True) -> Any:
        return self._allocator.resume(tag, wait=wait)

    def prefetch(self, tag: str) -> concurrent.futures.Future:
        return self._allocator.prefetch(tag)

    def wait_on_stream(self, future: concurrent.futures.Future, stream: Any = None) -> bool:
        return self._allocator.wait_on_stream(future, stream)

    def where(self, tag: str, *, wait: bool = True) -> dict[str, int] | None:
        return self._allocator.where(tag, wait=wait)

    def placement(self, tensor: torch.Tensor) -> dict[str, int]:
        return self._allocator.placement(tensor)

    def reclaim_pending(self) -> bool:
        return self._allocator.reclaim_pending()

    def is_enabled(self) -> bool:
        return self._allocator.is_enabled()


_memory: AllocatorMemory | None = None


def _enabled_memory() -> AllocatorMemory | None:
    """The running aqua_alloc, or None when it is not enabled (or its core is not built)."""
    global _memory
    if _memory is None:
        try:
            _memory = AllocatorMemory()
        except ImportError:  # the allocator core is not built / not present: memory side off
            return None
    return _memory if _memory.is_enabled() else None


def is_enabled() -> bool:
    """Whether aqua_alloc is enabled in this process, on any device."""
    return _enabled_memory() is not None


def memory_for(device: torch.device | str | None) -> ContextMemory | None:
    """aqua_alloc's contexts when they apply to ``device``, else None.

    They apply when ``device`` is a CUDA device, the memory layer loads (its C++ core is
    built) and aqua_alloc is enabled."""
    if device is None or torch.device(device).type != "cuda":
        return None
    return _enabled_memory()


def home_tier(device: torch.device | str) -> str:
    """aqua_alloc's name of a CUDA device's own tier (``where()`` keys): ``gpu<index>``."""
    return f"gpu{torch.device(device).index or 0}"


def off_gpu_bytes(placement: dict[str, int], home: str, peers: bool = True) -> int:
    """Bytes of ``placement`` (``where()`` / ``placement()``) in host memory, and on peer GPUs
    (every tier but ``home``) if ``peers``."""
    return sum(n for tier, n in placement.items() if tier == "host" or (peers and tier != home))


def is_off_gpu(memory: ContextMemory, tensor: torch.Tensor, peers: bool = True) -> bool:
    """Whether any byte of ``tensor`` (a context's) lives off its own GPU: in host memory, or
    on a peer GPU if ``peers``. Unknown (aqua_alloc disabled meanwhile, not a context's
    tensor): False, for callers that only speed reads up by copying."""
    try:
        placement = memory.placement(tensor)
    except Exception:  # noqa: BLE001 - see the docstring
        return False
    return off_gpu_bytes(placement, home_tier(tensor.device), peers) > 0
