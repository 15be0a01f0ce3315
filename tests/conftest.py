"""Shared fixtures: a clean aqua_alloc for each test, on simulated devices or the GPU."""

from __future__ import annotations

import pytest


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def reset_aqua() -> None:
    """Disable aqua_alloc and tear the core down even if tensors are alive (tests only)."""
    import aqua_alloc
    from aqua_alloc import _native

    if aqua_alloc.is_enabled():
        try:
            aqua_alloc.disable()
        except Exception:
            import aqua_alloc.allocator as allocator

            allocator._keep_alive.extend(allocator._state.released_pools)
            if allocator._state.lending:
                allocator._state.lending.stop()
            allocator._state = None
    _native.lib().aqua_shutdown(1)
