"""Shared fixtures: a clean aqua_alloc for each test, on simulated devices or the GPU."""

from __future__ import annotations

import os
import shutil
import tempfile

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
    from aqua_alloc import lifecycle
    from aqua_alloc.memory import native

    if aqua_alloc.is_enabled():
        try:
            aqua_alloc.disable()
        except Exception:
            import aqua_alloc.memory.allocator as allocator

            client = lifecycle.forget_coordinator_for_tests()  # disable() closes it first; refused before that
            if client is not None:
                try:
                    client.close(timeout=0.0)
                except Exception:  # the core may be half down: leave the coordinator all the same
                    client._sock.close()
            # Every pool that may still hold a block outlives the state: a MemPool deleted while
            # a tensor holds one of its blocks makes torch abort when that tensor is freed (a
            # failed test keeps its tensors alive in the traceback: issue 18's abort on two GPUs).
            allocator._keep_alive.extend(allocator._state.released_pools)
            allocator._keep_alive.extend(ctx.pool for ctx in allocator._state.contexts.values()
                                         if ctx.pool is not None)
            if allocator._state.lending:
                allocator._state.lending.stop()
            allocator._state = None
    native.lib().aqua_shutdown(1)


def flush_releases() -> None:
    """Release now the device backings that moves and frees gave back (the core keeps them
    a few ms for reuse), so that the next move creates its backings: exact op counts."""
    from aqua_alloc.memory import native

    native.check(native.lib().aqua_flush_releases(), "flushing deferred releases")


def freeze_host_pool(reserve: int = 0) -> None:
    """Fill the pinned host pool to `reserve` bytes now (0: make nothing), then stop the
    background thread that keeps it there, so that op counts and host usage change only
    through the calls a test makes. The backing already made stays."""
    from aqua_alloc.memory import native

    native.check(native.lib().aqua_host_pool_reserve(reserve, 0), "freezing the host pool")


@pytest.fixture(autouse=True)
def _no_soak_variables(monkeypatch):
    """AQUA_SOAK_* set the soak up (tests/test_soak_sim.py reads them when it is imported);
    they are not settings, and enable() would warn about them as unknown AQUA_* variables."""
    for var in [v for v in os.environ if v.startswith("AQUA_SOAK_")]:
        monkeypatch.delenv(var)


@pytest.fixture
def fresh_core():
    """A torn-down core before and after the test, with injected failures cleared."""
    import aqua_alloc
    import aqua_alloc.memory.sim

    reset_aqua()
    yield
    if aqua_alloc.is_enabled():
        aqua_alloc.memory.sim.fail_clear()
    reset_aqua()


@pytest.fixture
def short_dir():
    """A fresh private directory under /tmp: Unix socket paths must stay under 108 bytes,
    and pytest's tmp_path can be longer."""
    path = tempfile.mkdtemp(prefix="aqc-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(short_dir):
    """A coordinator daemon on a socket in ``short_dir``; stopped after the test, which
    also checks that it removed its socket."""
    from coordinator_daemon import Daemon  # noqa: PLC0415 - only the coordinator tests need it

    d = Daemon(os.path.join(short_dir, "c.sock"))
    yield d
    d.stop()
    assert not os.path.exists(d.path), "the socket is removed at exit"
