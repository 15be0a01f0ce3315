"""aqua_alloc: GPU memory for responsive LLM inference.

Inference contexts (KV caches) live in pools whose bytes can move between the local GPU,
a peer GPU and pinned host memory while every tensor keeps its pointer. Switch it on with
``AQUA_ALLOC=1``, ``import aqua_alloc.auto`` or :func:`enable`; tag context memory with
``with aqua_alloc.context(tag):``; time-share a GPU between prompts with
:class:`aqua_alloc.Scheduler`. See README.md.

Importing the package is cheap: it imports neither torch nor the CUDA driver.
"""

from aqua_alloc.lifecycle import disable, enable, stats
from aqua_alloc.memory import allocator  # noqa: F401 - aq.allocator.move_profile() and friends keep working
from aqua_alloc.memory.allocator import (
    ContextError,
    MoveResult,
    NoDeviceError,
    context,
    contexts,
    current_context,
    evict,
    is_enabled,
    lend,
    move_profile,
    move_spans,
    park,
    placement,
    prefetch,
    reclaim,
    release,
    resume,
    wait_on_stream,
    where,
)
from aqua_alloc.memory.config import ConfigError, Settings
from aqua_alloc.memory.lending import ReclaimResult
from aqua_alloc.memory.native import CoreError, CoreOutOfMemory

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ContextError", "CoreError", "CoreOutOfMemory", "MoveResult", "NoDeviceError", "ReclaimResult",
    "Settings", "Scheduler", "ContextKVCache", "ContextStaticCache", "context", "contexts", "current_context", "disable", "enable", "evict",
    "is_enabled", "lend", "move_profile", "move_spans", "park", "placement", "prefetch", "reclaim", "release",
    "resume", "stats", "use_grouped_attention", "wait_on_stream", "where",
]


def __getattr__(name: str):
    # The HuggingFace layer imports transformers: load it only when asked for.
    if name == "Scheduler":
        from aqua_alloc.hf.scheduler import Scheduler

        return Scheduler
    if name == "ContextKVCache":
        from aqua_alloc.hf.kv_cache import ContextKVCache

        return ContextKVCache
    if name == "ContextStaticCache":
        from aqua_alloc.hf.static_cache import ContextStaticCache

        return ContextStaticCache
    if name == "use_grouped_attention":
        from aqua_alloc.hf.grouped_attention import use_grouped_attention

        return use_grouped_attention
    raise AttributeError(f"module 'aqua_alloc' has no attribute {name!r}")
