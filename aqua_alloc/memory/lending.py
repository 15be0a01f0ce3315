"""Lending: how much of each GPU other GPUs' contexts may use, and taking it back.

Each GPU has a lend budget: the bytes of other GPUs' contexts the core may place on it
(their parked or spilled pieces). A budget is either

- elastic (the default with two or more GPUs): the GPU's free memory less a margin, re-read
  every ``lend_poll_ms`` by a watcher thread, so that it shrinks as the GPU's own users
  (this process's contexts, other processes, other models) take memory; or
- fixed: ``AQUA_LEND`` / ``enable(lend=...)`` at start, or :func:`aqua_alloc.lend` and
  :func:`aqua_alloc.reclaim` later.

When a budget falls under what the GPU holds for others, the excess moves on (to another
lender with room, else host) before the memory counts as free: pieces of parked contexts at
once, pieces of running contexts at their next park or resume (the scheduler resumes its
running prompt between decode steps while a reclaim waits, see scheduler.py). Nothing is
assumed done: :func:`reclaim` reports the bytes still pending when its timeout ends.

The core does the moves (``aqua_reclaim``); this module is the policy around them.

Words: a *reclaim* is always a lender taking lent memory back (its lend budget lowered, the
pieces beyond it moved on); :meth:`Lending.move_excess` is one pass of it, and the
coordinator's ``reclaim`` messages are the same act between processes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
import time
import warnings

from aqua_alloc.memory import config
from aqua_alloc.memory import native as _native
from aqua_alloc.memory.native import check


@dataclasses.dataclass(frozen=True)
class ReclaimResult:
    moved_bytes: int     # bytes of other GPUs' contexts moved off the lender by this call
    pending_bytes: int   # bytes still over the lend budget when the call returned (0: done)
    seconds: float       # wall time of the call


def elastic_budget(free_bytes: int, lent_bytes: int, margin_bytes: int) -> int:
    """What a lender may lend so that `margin_bytes` of it stay free: what it lends now plus
    its free memory, less the margin (memory already lent counts as used in `free_bytes`,
    hence the sum). Under the margin, the budget falls below what is lent: a reclaim."""
    return max(0, lent_bytes + free_bytes - margin_bytes)


class Lending:
    """Lend budgets of one enabled session: elastic re-reads and reclaims."""

    def __init__(self, num_devices: int, plan: config.Plan, poll_ms: int) -> None:
        self._num_devices = num_devices
        self._elastic = set(plan.elastic_lend)
        self._margin = dict(plan.lend_margin)
        self._poll_s = poll_ms / 1000.0
        self._lock = threading.Lock()        # serializes budget changes against the watcher
        self._pending: set[int] = set()      # lenders still over budget (running borrowers)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- queries ------------------------------------------------------------------------

    def _tier(self, device: int) -> _native.TierStats:
        s = _native.TierStats()
        check(_native.lib().aqua_tier_stats_get(device, ctypes.byref(s)), f"lend stats of GPU {device}")
        return s

    def is_elastic(self, device: int) -> bool:
        return device in self._elastic

    @property
    def pending(self) -> bool:
        """Whether a lender waits for running contexts to move off it (cheap; no lock)."""
        return bool(self._pending)

    # --- changes ------------------------------------------------------------------------

    def set_fixed(self, device: int, max_bytes: int) -> None:
        with self._lock:
            self._elastic.discard(device)
            check(_native.lib().aqua_set_lend_budget(device, max_bytes), f"lend(GPU {device})")

    def set_elastic(self, device: int) -> None:
        with self._lock:
            self._elastic.add(device)
            self._refresh_locked(device)

    def _refresh_locked(self, device: int) -> None:
        free, _ = _native.mem_info(device)
        budget = elastic_budget(free, self._tier(device).lent, self._margin.get(device, 0))
        check(_native.lib().aqua_set_lend_budget(device, budget), f"elastic lend budget of GPU {device}")

    def move_excess(self, device: int) -> tuple[int, int]:
        """One pass of a reclaim: move parked borrowers' pieces off `device` down to its lend
        budget (the core's aqua_reclaim). Returns (bytes moved, bytes still over the budget)."""
        moved, pending = ctypes.c_uint64(), ctypes.c_uint64()
        check(_native.lib().aqua_reclaim(device, ctypes.byref(moved), ctypes.byref(pending)),
              f"reclaim(GPU {device})")
        if pending.value:
            self._pending.add(device)
        else:
            self._pending.discard(device)
        return moved.value, pending.value

    def reclaim(self, device: int, nbytes: int | None, timeout: float) -> ReclaimResult:
        start = time.monotonic()
        with self._lock:
            self._elastic.discard(device)  # the owner wants it: the watcher must not lend it again
            budget = self._tier(device).lend_budget
            new_budget = 0 if nbytes is None else max(0, budget - nbytes)
            check(_native.lib().aqua_set_lend_budget(device, new_budget), f"reclaim(GPU {device})")
        moved_total = 0
        while True:
            moved, pending = self.move_excess(device)
            moved_total += moved
            if pending == 0 or time.monotonic() - start >= timeout:
                break
            time.sleep(0.002)  # running borrowers move at their next park or resume
        seconds = time.monotonic() - start
        if pending:
            warnings.warn(f"aqua_alloc.reclaim(GPU {device}): {config.format_size(pending)} still pending "
                          f"after {timeout:g} s "
                          "(contexts running there move at their next park or resume, or no tier has room)",
                          RuntimeWarning, stacklevel=3)
        return ReclaimResult(moved_bytes=moved_total, pending_bytes=pending, seconds=seconds)

    # --- the watcher --------------------------------------------------------------------

    def start(self) -> None:
        if self._num_devices < 2 or self._poll_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="aqua-lend-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def poll_once(self) -> None:
        """Re-read elastic budgets; move borrowers off lenders now over budget."""
        with self._lock:
            for device in sorted(self._elastic):
                self._refresh_locked(device)
        for device in range(self._num_devices):
            s = self._tier(device)
            if s.lent > s.lend_budget:
                self.move_excess(device)
            else:
                self._pending.discard(device)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            if _native.lib().aqua_backend() == _native.Backend.NONE:
                return  # the core was shut down under us (a forced teardown)
            try:
                self.poll_once()
            except Exception as exc:  # a failed re-read must not kill the watcher; say it and go on
                warnings.warn(f"aqua_alloc lend watcher: {exc}", RuntimeWarning, stacklevel=1)
