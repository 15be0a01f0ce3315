"""aqua_alloc: GPU memory for responsive LLM inference.

Inference contexts (KV caches) live in pools whose bytes can move between the local GPU,
a peer GPU and pinned host memory while every tensor keeps its pointer. Switch it on with
``AQUA_ALLOC=1``, ``import aqua_alloc.auto`` or :func:`enable`; tag context memory with
``with aqua_alloc.context(tag):``; time-share a GPU between prompts with
:class:`aqua_alloc.Scheduler`. See README.md.

Importing the package is cheap: it imports neither torch nor the CUDA driver.
"""

from .allocator import (
    ContextError,
    MoveResult,
    NoDeviceError,
    context,
    contexts,
    current_context,
    disable,
    enable,
    evict,
    is_enabled,
    lend,
    park,
    placement,
    prefetch,
    reclaim,
    release,
    resume,
    stats,
    wait_on_stream,
    where,
)
from .config import ConfigError, Settings
from .lending import ReclaimResult
from ._native import CoreError, CoreOutOfMemory

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ContextError", "CoreError", "CoreOutOfMemory", "MoveResult", "NoDeviceError", "ReclaimResult",
    "Settings", "Scheduler", "context", "contexts", "current_context", "disable", "enable", "evict", "is_enabled",
    "lend", "park", "placement", "prefetch", "reclaim", "release", "resume", "stats", "wait_on_stream", "where",
]


def __getattr__(name: str):
    # The scheduler imports transformers-facing code; load it only when asked for.
    if name == "Scheduler":
        from .scheduler import Scheduler

        return Scheduler
    raise AttributeError(f"module 'aqua_alloc' has no attribute {name!r}")
