"""Fair time-sharing of one device between HuggingFace ``generate`` calls.

Each ``generate`` call is one scheduled *prompt* (a batched call is one prompt). It runs in its
caller's thread; only one prompt runs at a time on the scheduler's device. A prompt yields at
step boundaries: transformers calls the stopping criteria and the streamer once per decode step
(public API). Ours come last: once the caller's criteria and streamer have seen the step's token,
the prompt's thread blocks there when its slice (``slice_steps`` decode steps) is over and the
policy picks another prompt. So a caller sees each token in the step that produced it, never
after a wait for other prompts. Because every decode step of every prompt runs whole and alone,
greedy output is bit-identical to the same call run alone, whatever the interleaving.

Policies (vLLM v1 style: an enum and a lookup table; the smallest key runs next):

- ``fair``: least attained service first. Service is the number of tokens generated per
  sequence. A newcomer starts at the least service among the live prompts, so it runs at the
  next slice boundary (its first token comes after at most one slice of the running prompt),
  yet it cannot jump a prompt that has waited longer at the same service: between two slices
  of any prompt, every other prompt runs at most once, newcomers included (no starvation).
- ``rr``: round robin by slices, in order of (re)queueing.
- ``fcfs``: run to completion in arrival order (the baseline batching engines approximate).

First-token priority (``first_token_priority=True``, the default; fair and rr only): a prompt
still waiting for its first token runs before every prompt that has had one (in arrival order),
and the running prompt yields to it at its next step instead of at the end of its slice. Time
to first token is then one decode step plus the prefills of the prompts that arrived just
before; the price is one extra switch per prompt. Prompts that have their first token keep the
policy's order and its no-starvation bound; newcomers delay them by one step each.

Memory side (only when aqua_alloc is enabled and the model is on CUDA): each prompt's KV cache
is a :class:`~aqua_alloc.hf.kv_cache.ContextKVCache` in its own context (tag = the prompt's tag).
At a switch the outgoing context is parked (``park``: moved only if the incoming
prompt needs the room), the incoming one resumed; while a prompt runs, the context of the
prompt predicted to run next is prefetched (``prefetch``). On CPU, or
with aqua_alloc off, the scheduler only schedules; ``AQUA_TRACE`` then still traces its events
(written at exit; a bad path raises ConfigError when the scheduler is made).

Faults: an exception in one prompt is raised in its caller's thread, its context is released
and the others go on. :meth:`Scheduler.cancel` (and cancelling an :meth:`Scheduler.agenerate`
task) makes the prompt raise :class:`PromptCancelled` at its next step boundary (or at once if it
waits) and frees its context. :meth:`Scheduler.shutdown` fails every prompt in flight with
:class:`SchedulerShutdown`.

Ctrl-C (a KeyboardInterrupt in the caller's thread): the prompt leaves like a cancelled one
(state ``cancelled``, context released, the others go on) and the caller gets the
KeyboardInterrupt. In the main thread :meth:`Scheduler.generate` holds SIGINT for the call and
raises it, by calling the handler it found, at the prompt's next step boundary (at once while
the prompt waits, or when the call ends): never in the middle of the scheduler's bookkeeping,
where it could leave a prompt neither waiting nor running and the device never handed on.
Other threads are not interrupted by Python: stop them with :meth:`Scheduler.shutdown` or
:meth:`Scheduler.cancel`.

Thread-safety: every public method may be called from any thread at any time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import functools
import itertools
import logging
import math
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from aqua_alloc.hf.attention import warn_if_cudnn_attention
from aqua_alloc.memory.config import expect_bool, trace_settings_from_env
from aqua_alloc.obs import trace
from aqua_alloc.obs.events import EventKind, emit
from aqua_alloc.hf.generate_hook import (
    describe_call,
    make_context_cache,
    model_device,
    renamed_cache_argument,
    returned_cache,
    unscheduled_generate,
    with_cache,
    with_step_hooks,
)
from aqua_alloc.hf import context_memory
from aqua_alloc.hf.context_memory import ContextMemory, memory_for
from aqua_alloc.hf.kv_cache import ContextKVCache
from aqua_alloc.hf.static_cache import ContextStaticCache

log = logging.getLogger(__name__)

_HISTORY = 10_000  # finished prompts and slices kept for stats()
_POLL_S = 0.05     # s: how soon a prompt waiting in the main thread sees a held Ctrl-C
MAX_SLICE_FACTOR = 8  # switch_overhead lengthens a slice to at most this many times slice_steps
_prompt_numbers = itertools.count()  # process-wide, so tags stay unique across schedulers


def _wait_move(handle: Any) -> Any:
    """Wait for a ``prefetch`` or ``resume(tag, wait=False)``'s handle (a Future, or anything with wait())."""
    return handle.result() if hasattr(handle, "result") else handle.wait()


def _choice(kind: type[enum.Enum], value: Any, name: str) -> Any:
    """``kind(value)``, or ValueError naming ``name`` and the values accepted."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(repr(k.value) for k in kind)}") from None


def _expect_model(model: Any, what: str) -> None:
    """TypeError naming what was passed where a HuggingFace model belongs."""
    if not callable(getattr(model, "generate", None)) or not hasattr(model, "__dict__"):
        kind = type(model)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(f"{what}: expected a HuggingFace model (an object with a .generate method, such as "
                        f"AutoModelForCausalLM.from_pretrained(...)), got {name}")


def _trace_without_enable() -> None:
    """``AQUA_TRACE`` with aqua_alloc not enabled (on CPU, say): the scheduler's events are
    traced all the same, written at exit like enable()'s trace. A bad path raises ConfigError
    now. When aqua_alloc is enabled, its settings decide (an ``enable(trace=...)`` wins)."""
    if context_memory.is_enabled() or trace.exit_hook_path() is not None:
        return
    path, snapshot = trace_settings_from_env()
    if path is not None:
        trace.install_exit_hook(path, snapshot=snapshot)


class SchedulerShutdown(RuntimeError):
    """The scheduler was shut down while this prompt was in flight (or before it arrived)."""


class PromptCancelled(RuntimeError):
    """The prompt was cancelled (``Scheduler.cancel`` or its asyncio task was cancelled)."""


class _HeldInterrupt:
    """The SIGINT handler while the main thread runs a scheduled generate: keeps the signal
    until :meth:`deliver` calls the handler it replaced (see the module docstring)."""

    def __init__(self, previous: Callable[[int, Any], Any]) -> None:
        self.previous = previous
        self.pending: tuple[int, Any] | None = None   # (signum, frame) of a held SIGINT

    def __call__(self, signum: int, frame: Any) -> None:
        self.pending = (signum, frame)

    def deliver(self) -> None:
        """Call the replaced handler for a held SIGINT (the default one raises KeyboardInterrupt)."""
        if self.pending is not None:
            signum, frame = self.pending
            self.pending = None
            self.previous(signum, frame)


def _hold_interrupts() -> _HeldInterrupt | None:
    """In the main thread, with a Python SIGINT handler set: install a :class:`_HeldInterrupt`."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # ignored or the default action: nothing is raised in Python
        return None
    held = _HeldInterrupt(previous)
    signal.signal(signal.SIGINT, held)
    return held


def _release_interrupts(held: _HeldInterrupt | None, interrupted: bool) -> None:
    """Put the replaced handler back (unless it was replaced since), then deliver a SIGINT still
    held, unless the call already ends in a KeyboardInterrupt."""
    if held is None:
        return
    if signal.getsignal(signal.SIGINT) is held:
        signal.signal(signal.SIGINT, held.previous)
    if not interrupted:
        held.deliver()


def run_threads(threads: Sequence[threading.Thread], on_interrupt: Callable[[], None],
                on_start: Callable[[], None] | None = None) -> bool:
    """Start ``threads`` (callers of a scheduler) and wait for every one. In the main thread,
    Ctrl-C meanwhile raises nothing: a KeyboardInterrupt inside ``Thread.join`` marks the
    running thread stopped (CPython 3.11, ``threading._wait_for_tstate_lock``), so it is never
    joined and the interpreter exits under it while it runs torch ("terminate called without
    an active exception"). Instead ``on_interrupt`` is called (stop the work, e.g.
    ``Scheduler.shutdown(wait=False)``) and every thread is still joined. ``on_start`` is
    called once the threads are started, with Ctrl-C already held (say "serving" there: a
    Ctrl-C prompted by that line is then never raised outside). Returns whether Ctrl-C
    came: the caller then raises KeyboardInterrupt or exits 130."""
    interrupted: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1)) if main else None
    try:
        for thread in threads:
            thread.start()
        if on_start is not None:
            on_start()
        for thread in threads:
            while thread.is_alive() and not interrupted:
                thread.join(timeout=0.05)   # s: how soon a Ctrl-C is seen
        if interrupted:
            on_interrupt()
        for thread in threads:
            thread.join()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    return bool(interrupted)


class NewcomerOrder(str, enum.Enum):
    """Which waiting newcomer gets its prefill first (first-token priority)."""

    ARRIVAL = "arrival"    # in arrival order
    SHORTEST = "shortest"  # least prefill work first (prompt tokens x batch), but none passed more
                           # than NEWCOMER_BYPASS_LIMIT times by later arrivals


NEWCOMER_BYPASS_LIMIT = 4  # "shortest": a newcomer passed over by this many later arrivals goes next


class Policy(str, enum.Enum):
    FAIR = "fair"   # least attained service (tokens) runs next
    RR = "rr"       # round robin by slices
    FCFS = "fcfs"   # run to completion in arrival order


class PromptState(str, enum.Enum):
    WAITING = "waiting"      # queued: not started, or parked between slices
    RUNNING = "running"      # holds the device
    FINISHED = "finished"    # generate returned
    FAILED = "failed"        # generate raised (or the scheduler shut down)
    CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True)
class _Rule:
    key: Callable[["_Prompt"], tuple]  # the waiting prompt with the smallest key runs next
    preemptive: bool                   # whether a running prompt yields when its slice ends


_RULES: dict[Policy, _Rule] = {
    Policy.FAIR: _Rule(key=lambda p: (p.service, p.queued_seq), preemptive=True),
    Policy.RR: _Rule(key=lambda p: (p.queued_seq,), preemptive=True),
    Policy.FCFS: _Rule(key=lambda p: (p.arrival_seq,), preemptive=False),
}


def pick_next(policy: Policy, waiting: list["_Prompt"], first_token_priority: bool = False,
              newcomer_order: NewcomerOrder = NewcomerOrder.ARRIVAL) -> "_Prompt | None":
    """The prompt that runs next, or None when nobody waits. With ``first_token_priority`` (a
    preemptive policy only), prompts still waiting for their first token go first, in
    ``newcomer_order``: arrival order, or the least prefill work first (a burst's mean time to
    first token is least when short prefills go before long ones) unless one has been passed
    over ``NEWCOMER_BYPASS_LIMIT`` times (then the earliest such goes: no newcomer starves)."""
    if first_token_priority and _RULES[policy].preemptive:
        newcomers = [p for p in waiting if p.first_token_ns is None]
        if newcomers and newcomer_order == NewcomerOrder.SHORTEST:
            starved = [p for p in newcomers if p.bypassed >= NEWCOMER_BYPASS_LIMIT]
            if starved:
                return min(starved, key=lambda p: p.arrival_seq)
            return min(newcomers, key=lambda p: (p.prompt_tokens * p.batch_size, p.arrival_seq))
        if newcomers:
            return min(newcomers, key=lambda p: p.arrival_seq)
    return min(waiting, key=_RULES[policy].key) if waiting else None


@dataclasses.dataclass(frozen=True)
class PromptStats:
    """Metrics of one prompt. Times are CLOCK_MONOTONIC ns (``time.monotonic_ns``, as in events);
    ``*_step`` fields read the scheduler's step clock (decode steps run on it so far, all prompts)."""

    tag: str
    state: PromptState
    batch_size: int                 # sequences in the call
    arrival_ns: int
    first_token_ns: int | None
    finish_ns: int | None
    arrival_step: int
    arrival_slice: int              # slices begun before it arrived (SliceRecord.index of the next one)
    first_token_step: int | None    # step clock at the prompt's first token
    finish_step: int | None
    num_tokens: int                 # tokens generated per sequence
    num_steps: int                  # decode steps run (prefill + first token counts as one)
    num_slices: int
    service: int                    # fair policy's attained service (tokens, from its start value)
    parked_ns: int                  # time parked between slices
    bytes_moved: int                # bytes of its context moved: found off the GPU at resumes + brought back
    parked_context_bytes: int       # at its last park: bytes its context held (all tiers; 0 if no context)
    parked_kv_bytes: int            # at its last park: bytes of valid KV tokens in it
    step_s: float | None            # its usual decode step (s; moving average), None before its second step
    last_switch_s: float            # its last switch in (s): first two steps of a slice less two usual steps
    hook_cpu_ns: int                # CPU time of the scheduler's per-step hooks (park and resume included)
    error: str | None


@dataclasses.dataclass(frozen=True)
class SliceRecord:
    """One slice: ``num_steps`` steps of prompt ``tag`` from step clock ``start_step``.
    ``index`` numbers the slices run by the scheduler (0, 1, ...)."""

    index: int
    tag: str
    start_step: int
    num_steps: int


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    policy: Policy
    slice_steps: int
    num_steps: int                  # step clock
    running: str | None             # tag holding the device
    waiting: list[str]              # tags in the order they would run (policy order)
    prompts: list[PromptStats]      # live, then the last finished ones, by arrival
    slices: list[SliceRecord]       # the last slices, oldest first


class _Prompt:
    """Mutable state of one prompt; every field is guarded by the scheduler's lock."""

    def __init__(self, tag: str, arrival_seq: int, batch_size: int, max_new_tokens: int | None) -> None:
        self.tag = tag
        self.arrival_seq = arrival_seq
        self.queued_seq = arrival_seq       # when it last joined the waiting list
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.state = PromptState.WAITING
        self.error: BaseException | None = None  # set to fail it (cancel, shutdown)
        self.arrival_ns = time.monotonic_ns()
        self.arrival_step = 0
        self.arrival_slice = 0
        self.first_token_ns: int | None = None
        self.first_token_step: int | None = None
        self.finish_ns: int | None = None
        self.finish_step: int | None = None
        self.base_len: int | None = None    # input_ids length before the first new token
        self.prompt_tokens = 0              # prompt tokens per sequence (0: unknown)
        self.bypassed = 0                   # newcomers that arrived later but got their prefill first
        self.num_tokens = 0
        self.num_steps = 0
        self.num_slices = 0
        self.service = 0
        self.in_slice = False               # between _begin_slice and _end_slice_locked
        self.slice_index = 0
        self.slice_start_step = 0
        self.slice_num_steps = 0
        self.slice_target = 0               # steps this slice may run (slice_steps, or more: switch_overhead)
        self.slice_began_ns = 0             # when it got the device for this slice (before its resume)
        self.switched_in = False            # this slice began by resuming its parked context
        self.last_step_ns = 0               # when its last step ended
        self.step_s: float | None = None    # its usual decode step (s): moving average of in-slice steps
        self.switch_s = 0.0                 # its last measured switch in (s)
        self.hook_cpu_ns = 0                # CPU time of the scheduler's per-step hooks in its thread (ns;
                                            # written by that thread only; waiting for its turn costs none,
                                            # a CUDA sync that spins, e.g. in a park, counts)
        self.parked_ns = 0
        self.parked_since: int | None = None
        self.bytes_moved = 0
        self.parked_context_bytes = 0
        self.parked_kv_bytes = 0
        self.memory: ContextMemory | None = None  # set when the memory side applies
        self.cache: ContextKVCache | None = None
        self.local_tier = "gpu0"
        self.prefetch: Any = None           # handle of a resume(wait=False) in flight
        self.prefetch_away = 0              # bytes off the GPU when that prefetch began
        self.resume_needed = False          # a prefetch left bytes elsewhere: resume at the next step
        self.held_interrupt: _HeldInterrupt | None = None  # main thread: Ctrl-C held until a safe point

    @property
    def has_context(self) -> bool:
        return self.memory is not None and self.cache is not None and self.cache.context_created

    def snapshot(self) -> PromptStats:
        return PromptStats(
            tag=self.tag, state=self.state, batch_size=self.batch_size,
            arrival_ns=self.arrival_ns, first_token_ns=self.first_token_ns, finish_ns=self.finish_ns,
            arrival_step=self.arrival_step, arrival_slice=self.arrival_slice, first_token_step=self.first_token_step,
            finish_step=self.finish_step, num_tokens=self.num_tokens, num_steps=self.num_steps,
            num_slices=self.num_slices, service=self.service, parked_ns=self.parked_ns,
            bytes_moved=self.bytes_moved, parked_context_bytes=self.parked_context_bytes,
            parked_kv_bytes=self.parked_kv_bytes, step_s=self.step_s, last_switch_s=self.switch_s,
            hook_cpu_ns=self.hook_cpu_ns,
            error=None if self.error is None else repr(self.error),
        )


class _StepHook(StoppingCriteria):
    """First of the caller's stopping criteria (transformers' own, such as max length, run
    before), once per decode step: counts the step. Never stops generation and never yields
    (the caller's hooks have not seen the step's token yet)."""

    def __init__(self, scheduler: "Scheduler", prompt: _Prompt) -> None:
        self._scheduler = scheduler
        self._prompt = prompt
        self._not_done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        with _hook_cpu(self._prompt):
            self._scheduler._on_step(self._prompt, input_ids)
        return _never_done(self, input_ids)


@contextlib.contextmanager
def _hook_cpu(prompt: _Prompt) -> Iterator[None]:
    """Adds the CPU time of the block (this thread's; waiting for its turn costs none) to the
    prompt's ``hook_cpu_ns``."""
    cpu_ns = time.thread_time_ns()
    try:
        yield
    finally:
        prompt.hook_cpu_ns += time.thread_time_ns() - cpu_ns


def _never_done(owner: Any, input_ids: torch.Tensor) -> torch.BoolTensor:
    """A stopping criterion's "not done" answer for every sequence, kept on ``owner`` (one per batch size)."""
    not_done = getattr(owner, "_not_done", None)
    if not_done is None or not_done.shape[0] != input_ids.shape[0]:
        not_done = owner._not_done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    return not_done


class _StepBoundary(StoppingCriteria):
    """Last of a call's stopping criteria, and the wrapper of its streamer: the point of each
    decode step where the prompt may yield, reached once the caller's criteria *and* its
    streamer have seen the step's token. So a token the GPU produced reaches its caller
    before its prompt gives up the device: the caller's first token comes within its own
    step of the scheduler's (which logs it when the step is launched). transformers calls a
    streamer's ``put`` before the criteria or after them, by decoding method and release;
    counting both finds the later one."""

    def __init__(self, scheduler: "Scheduler", prompt: _Prompt) -> None:
        self._scheduler = scheduler
        self._prompt = prompt
        self._not_done: torch.Tensor | None = None
        self._streams = False       # the call has a streamer (wrapped by wrap_streamer)
        self._criteria_steps = 0    # steps whose stopping criteria have all run
        self._token_puts = 0        # steps whose token the streamer has been given
        self._boundaries = 0        # steps whose boundary has been handled

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self._criteria_steps += 1
        self._reached()
        return _never_done(self, input_ids)

    def wrap_streamer(self, streamer: Any) -> "_StreamerThenBoundary":
        self._streams = True
        return _StreamerThenBoundary(streamer, self)

    def token_put(self) -> None:
        self._token_puts += 1
        self._reached()

    def _reached(self) -> None:
        if self._streams and self._criteria_steps - self._token_puts >= 2:
            # A decoding loop that does not put every step's token (a custom one, say): the
            # boundary must not wait for puts that never come, or the prompt never yields.
            self._streams = False
        done = min(self._criteria_steps, self._token_puts) if self._streams else self._criteria_steps
        if done > self._boundaries:
            self._boundaries = done
            with _hook_cpu(self._prompt):
                self._scheduler._at_step_boundary(self._prompt)


class _StreamerThenBoundary(BaseStreamer):
    """The caller's streamer, and after each token it is given, :meth:`_StepBoundary.token_put`.
    The first ``put`` of a generate call is the prompt itself, not a step's token."""

    def __init__(self, streamer: Any, boundary: _StepBoundary) -> None:
        self._streamer = streamer
        self._boundary = boundary
        self._prompt_put = False

    def put(self, value: Any) -> None:
        self._streamer.put(value)
        if self._prompt_put:
            self._boundary.token_put()
        self._prompt_put = True

    def end(self) -> None:
        self._streamer.end()

    def __getattr__(self, name: str) -> Any:  # anything else the caller's streamer offers
        if name.startswith("_"):  # ours, not set yet (copy, pickle): never the caller's
            raise AttributeError(name)
        return getattr(self._streamer, name)


class Scheduler:
    """Time-shares one device between ``generate`` calls (see the module docstring).

    Args:
        device: the device whose time is shared (default: each model's device). Contexts are
            made for it.
        policy: ``"fair"``, ``"rr"`` or ``"fcfs"`` (or a :class:`Policy`).
        slice_steps: decode steps per slice (the prefill and its first token count as one).
        use_context_cache: pass a :class:`ContextKVCache` to ``generate``. None (default): only
            when the memory side applies (aqua_alloc enabled, CUDA). True also on CPU.
        chunk_tokens: tokens per KV chunk of that cache.
        prefetch: resume the context of the prompt predicted to run next while one runs.
        first_token_priority: prompts waiting for their first token run next, and the running
            prompt yields to them at its next step (fair and rr; see the module docstring).
        newcomer_order: among those, ``"shortest"`` prefill first (default; no newcomer passed
            more than ``NEWCOMER_BYPASS_LIMIT`` times; :func:`pick_next`) or ``"arrival"``. On an
            H200, a burst of ten long prompts got its first tokens 11.9 and 10.9 times sooner
            than one at a time, against 7.9 times in arrival order (docs/benchmarks.md).
        switch_overhead: None (default): every slice is ``slice_steps`` steps. A share such as
            0.1: a prompt whose switch in costs more than that share of its slice gets longer
            slices, up to ``MAX_SLICE_FACTOR`` times ``slice_steps``. The switch's cost is
            measured, not guessed: the first two steps of a slice, from the moment the prompt
            got the device (its context's resume included), less two of its usual steps. Long
            contexts parked to host then pay their move once per longer slice; newcomers still
            get the device at the next step (first-token priority).
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        policy: Policy | str = Policy.FAIR,
        slice_steps: int = 5,
        *,
        use_context_cache: bool | None = None,
        chunk_tokens: int = 256,
        prefetch: bool = True,
        first_token_priority: bool = True,
        newcomer_order: NewcomerOrder | str = NewcomerOrder.SHORTEST,
        switch_overhead: float | None = None,
    ) -> None:
        if isinstance(slice_steps, bool) or not isinstance(slice_steps, int) or slice_steps < 1:
            raise ValueError(f"slice_steps={slice_steps!r}: expected a whole number of decode steps, at least 1")
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens!r}: expected a whole number of tokens, at least 1")
        expect_bool(use_context_cache, "Scheduler(): use_context_cache", allow_none=True)
        expect_bool(prefetch, "Scheduler(): prefetch")
        expect_bool(first_token_priority, "Scheduler(): first_token_priority")
        if switch_overhead is not None and (isinstance(switch_overhead, bool) or not isinstance(switch_overhead, (int, float))
                                            or not 0 < switch_overhead < 1):
            raise ValueError(f"switch_overhead={switch_overhead!r}: expected None (fixed slices) or a share of a slice "
                             "between 0 and 1, such as 0.1")
        self.policy = _choice(Policy, policy, "policy")
        self.newcomer_order = _choice(NewcomerOrder, newcomer_order, "newcomer_order")
        self.device = torch.device(device) if device is not None else None
        self.slice_steps = slice_steps
        self.use_context_cache = use_context_cache
        self.chunk_tokens = chunk_tokens
        self.prefetch = prefetch
        self.first_token_priority = first_token_priority
        self.switch_overhead = switch_overhead
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._live: dict[str, _Prompt] = {}
        self._waiting: list[_Prompt] = []
        self._running: _Prompt | None = None
        self._prefetched: _Prompt | None = None
        self._seq = itertools.count()
        self._num_steps = 0
        self._num_slices = 0
        self._closed = False
        self._finished: collections.deque[_Prompt] = collections.deque(maxlen=_HISTORY)
        self._slices: collections.deque[SliceRecord] = collections.deque(maxlen=_HISTORY)
        _trace_without_enable()

    # ------------------------------------------------------------------ public API

    def generate(self, model: Any, *args: Any, tag: str | None = None, **kwargs: Any) -> Any:
        """Run ``model.generate(*args, **kwargs)`` as one scheduled prompt; return what it returns.

        Blocks the calling thread until the prompt has run to the end (interleaved with other
        prompts). ``tag`` names the prompt (and its context); default ``"prompt-<n>"``.
        Raises what ``generate`` raises, or :class:`PromptCancelled` / :class:`SchedulerShutdown`.
        """
        _expect_model(model, "Scheduler.generate()")
        kwargs = renamed_cache_argument(kwargs, model)
        held = _hold_interrupts()
        interrupted = False
        try:
            prompt = self._admit(model, args, kwargs, tag)
            prompt.held_interrupt = held
            return self._run(prompt, model, args, kwargs)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            _release_interrupts(held, interrupted)

    async def agenerate(self, model: Any, *args: Any, tag: str | None = None, **kwargs: Any) -> Any:
        """Async form of :meth:`generate`: runs the call in a thread of its own.

        Cancelling the awaiting task cancels the prompt; the task's ``CancelledError`` is raised
        once the prompt has left the scheduler and its context is freed.
        """
        _expect_model(model, "Scheduler.agenerate()")
        kwargs = renamed_cache_argument(kwargs, model)
        prompt = self._admit(model, args, kwargs, tag)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(result: Any, exc: BaseException | None) -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        def work() -> None:
            result, error = None, None
            try:
                result = self._run(prompt, model, args, kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                error = exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        threading.Thread(target=work, name=f"aqua-{prompt.tag}", daemon=True).start()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.cancel(prompt.tag)
            try:
                await asyncio.shield(future)
            except BaseException:  # noqa: BLE001 - the prompt's own PromptCancelled (or other end)
                pass
            raise

    def wrap(self, model: Any) -> Any:
        """Schedule ``model.generate`` through this scheduler; returns the same model object.

        Existing code then changes by one line: ``model = sched.wrap(model)``.
        """
        _expect_model(model, "Scheduler.wrap()")
        original = unscheduled_generate(model)

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            return self.generate(model, *args, **kwargs)

        model._aqua_unscheduled_generate = original
        model.generate = generate
        return model

    @staticmethod
    def unwrap(model: Any) -> Any:
        """Undo :meth:`wrap`; returns the model."""
        _expect_model(model, "Scheduler.unwrap()")
        if "_aqua_unscheduled_generate" in model.__dict__:
            del model.__dict__["generate"]
            del model.__dict__["_aqua_unscheduled_generate"]
        return model

    def cancel(self, tag: str) -> bool:
        """Cancel a live prompt: it raises :class:`PromptCancelled` at its next step boundary
        (at once if it waits). False if no live prompt has this tag."""
        with self._cond:
            prompt = self._live.get(tag)
            if prompt is None:
                return False
            if prompt.error is None:
                prompt.error = PromptCancelled(f"prompt {tag!r} was cancelled")
            self._cond.notify_all()
            return True

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Refuse new prompts and fail every prompt in flight with :class:`SchedulerShutdown`.

        With ``wait``, block until they have left (a running prompt leaves at the end of its
        current step) or ``timeout`` seconds pass. Returns whether none is left.
        """
        expect_bool(wait, "Scheduler.shutdown(): wait")
        with self._cond:
            self._closed = True
            for prompt in self._live.values():
                if prompt.error is None:
                    prompt.error = SchedulerShutdown(
                        f"aqua_alloc scheduler was shut down while prompt {prompt.tag!r} was in flight"
                    )
            self._cond.notify_all()
            if wait:
                self._cond.wait_for(lambda: not self._live, timeout)
            return not self._live

    def stats(self) -> SchedulerStats:
        """A consistent snapshot of the scheduler and of every live and recently finished prompt."""
        with self._lock:
            rule = _RULES[self.policy]
            live = sorted(self._live.values(), key=lambda p: p.arrival_seq)
            return SchedulerStats(
                policy=self.policy,
                slice_steps=self.slice_steps,
                num_steps=self._num_steps,
                running=self._running.tag if self._running is not None else None,
                waiting=[p.tag for p in sorted(self._waiting, key=rule.key)],
                prompts=[p.snapshot() for p in sorted([*self._finished, *live], key=lambda p: p.arrival_seq)],
                slices=list(self._slices),
            )

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ prompt life cycle

    def _admit(self, model: Any, args: tuple, kwargs: dict, tag: str | None) -> _Prompt:
        """Register a new prompt (not queued yet). Raises on a closed scheduler or a duplicate tag."""
        tag = tag if tag is not None else f"prompt-{next(_prompt_numbers)}"
        batch_size, max_new_tokens, prompt_tokens = describe_call(model, args, kwargs)
        with self._lock:
            if self._closed:
                raise SchedulerShutdown("aqua_alloc scheduler is shut down; it takes no new prompts")
            if tag in self._live:
                raise ValueError(f"a prompt tagged {tag!r} is already in flight")
            prompt = _Prompt(tag, next(self._seq), batch_size, max_new_tokens)
            prompt.prompt_tokens = prompt_tokens
            prompt.arrival_step = self._num_steps
            prompt.arrival_slice = self._num_slices
            # Fair policy: start at the least service among the live prompts (see module docstring).
            live_services = [p.service for p in self._waiting]
            if self._running is not None:
                live_services.append(self._running.service)
            prompt.service = min(live_services, default=0)
            self._live[tag] = prompt
        emit(EventKind.PROMPT_ARRIVED, context=tag, batch_size=batch_size, step=prompt.arrival_step)
        return prompt

    def _run(self, prompt: _Prompt, model: Any, args: tuple, kwargs: dict) -> Any:
        """Queue ``prompt``, wait for its turn, run generate, leave. In the caller's thread."""
        try:
            call_args, call_kwargs = self._prepare_call(prompt, model, args, kwargs)
            with self._cond:
                self._queue_locked(prompt)
                self._dispatch_locked()
                self._wait_turn_locked(prompt)
            self._begin_slice(prompt)
            output = unscheduled_generate(model)(*call_args, **call_kwargs)
        except BaseException as exc:
            self._leave(prompt, exc, None)
            streamer = kwargs.get("streamer")
            if streamer is not None:  # let a consumer thread of the stream finish instead of hanging
                try:
                    streamer.end()
                except Exception:  # noqa: BLE001 - best effort; the caller gets the real error
                    pass
            raise
        self._leave(prompt, None, output)
        return output

    def _prepare_call(self, prompt: _Prompt, model: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments of the real generate call: our step hook added, maybe our KV cache
        (``prompt.cache``)."""
        device = self.device if self.device is not None else model_device(model)
        warn_if_cudnn_attention(device)
        prompt.memory = memory_for(device)
        if device is not None and device.type == "cuda":
            prompt.local_tier = f"gpu{device.index if device.index is not None else torch.cuda.current_device()}"
        use_cache = self.use_context_cache if self.use_context_cache is not None else prompt.memory is not None
        cache = make_context_cache(model, args, kwargs, prompt.tag if use_cache else None, device, self.chunk_tokens)
        if not use_cache and not isinstance(cache, ContextStaticCache):
            cache = None  # a static call gets a cache of its own even so: its length bucketed, so that
            # interleaved prompts share compiled steps, and no state shared between calls
        prompt.cache = cache  # from here on, released by _leave whatever happens
        boundary = _StepBoundary(self, prompt)
        call_args, call_kwargs = with_step_hooks(model, args, kwargs, _StepHook(self, prompt), boundary,
                                                 boundary.wrap_streamer)
        if cache is not None:
            call_kwargs = with_cache(call_kwargs, cache)
        return call_args, call_kwargs

    def _leave(self, prompt: _Prompt, exc: BaseException | None, output: Any) -> None:
        """The prompt's generate returned or raised: free its context, hand the device on."""
        cache = prompt.cache
        with self._lock:
            handle, prompt.prefetch = prompt.prefetch, None
        if handle is not None:  # a prefetch of this context may still be in flight
            try:
                _wait_move(handle)
            except Exception:  # noqa: BLE001 - the context is released anyway
                log.exception("aqua_alloc: prefetch of context %r failed", prompt.tag)
        if cache is not None:
            if exc is None and returned_cache(output) is cache:
                cache.release_when_collected()  # the caller holds the cache now
            else:
                cache.release()
            prompt.cache = None  # the stats history must not keep the cache (or its context) alive
        with self._cond:
            self._end_slice_locked(prompt)
            if prompt in self._waiting:
                self._waiting.remove(prompt)
            if self._running is prompt:
                self._running = None
            if self._prefetched is prompt:
                self._prefetched = None
            if exc is None:
                prompt.state = PromptState.FINISHED
            elif isinstance(exc, (PromptCancelled, asyncio.CancelledError, KeyboardInterrupt)):
                prompt.state = PromptState.CANCELLED
            else:
                prompt.state = PromptState.FAILED
            if exc is not None and prompt.error is None:
                prompt.error = exc
            prompt.finish_ns = time.monotonic_ns()
            prompt.finish_step = self._num_steps
            self._live.pop(prompt.tag, None)
            self._finished.append(prompt)
            self._dispatch_locked()
            self._cond.notify_all()
        emit(EventKind.FINISHED, context=prompt.tag, state=prompt.state.value,
             num_tokens=prompt.num_tokens, error=None if exc is None else repr(exc))

    # ------------------------------------------------------------------ steps and slices

    def _on_step(self, prompt: _Prompt, input_ids: torch.Tensor) -> None:
        """One decode step of ``prompt`` finished (its thread holds the device): count it. The
        prompt yields later in the step, at :meth:`_at_step_boundary`."""
        if prompt.held_interrupt is not None:
            prompt.held_interrupt.deliver()  # a step boundary: a held Ctrl-C is raised here
        now = time.monotonic_ns()
        first_token = False
        with self._cond:
            self._num_steps += 1
            if prompt.base_len is None:
                prompt.base_len = input_ids.shape[-1] - 1
            num_tokens = input_ids.shape[-1] - prompt.base_len
            prompt.service += num_tokens - prompt.num_tokens
            prompt.num_tokens = num_tokens
            prompt.num_steps += 1
            prompt.slice_num_steps += 1
            self._time_step_locked(prompt, now)
            if prompt.first_token_ns is None:
                prompt.first_token_ns, prompt.first_token_step = now, self._num_steps
                first_token = True
        if first_token:
            emit(EventKind.FIRST_TOKEN, context=prompt.tag, step=prompt.first_token_step)
        if prompt.error is not None:
            raise prompt.error
        if prompt.has_context and (prompt.resume_needed
                                   or prompt.memory.reclaim_pending()):
            # Between two steps is a safe point to move this running context (the move waits
            # for this step's kernels): to finish a prefetch that could not bring everything
            # back, or because a lender wants memory that holds part of it.
            prompt.resume_needed = False
            prompt.memory.resume(prompt.tag, wait=True)

    def _at_step_boundary(self, prompt: _Prompt) -> None:
        """Every hook of the caller has seen this step's token: the prompt may yield here."""
        if prompt.held_interrupt is not None:
            prompt.held_interrupt.deliver()
        if prompt.error is not None:
            raise prompt.error
        if not self._slice_over(prompt):
            return
        with self._cond:
            self._end_slice_locked(prompt)
            self._queue_locked(prompt)
            successor = self._pick_next_locked()
            if successor is not prompt:
                self._park(prompt)
                self._dispatch_locked()
            else:
                self._waiting.remove(prompt)
                self._running = prompt
                prompt.state = PromptState.RUNNING
            self._wait_turn_locked(prompt)
        self._begin_slice(prompt)

    def _time_step_locked(self, prompt: _Prompt, now: int) -> None:
        """Time the step that just ended (host clock at the step's criteria). transformers reads
        each step's token back after the criteria, so the host runs up to one step ahead of
        the GPU, and a switch's cost (the resume's copies, waited for on the host or on the
        GPU) shows within the first two steps of a slice. So: the usual step is timed from
        the third step of a slice on; at the second step of a slice that began with a resume,
        the switch is what the two steps took beyond two usual steps, and with
        ``switch_overhead`` it sets the slice's length."""
        k = prompt.slice_num_steps
        if k >= 3:
            step_s = (now - prompt.last_step_ns) / 1e9
            prompt.step_s = step_s if prompt.step_s is None else 0.8 * prompt.step_s + 0.2 * step_s
        elif k == 2 and prompt.switched_in and prompt.step_s is not None:
            prompt.switch_s = max((now - prompt.slice_began_ns) / 1e9 - 2 * prompt.step_s, 0.0)
            if self.switch_overhead is not None:
                needed = math.ceil(prompt.switch_s / (self.switch_overhead * prompt.step_s))
                prompt.slice_target = min(max(self.slice_steps, needed), MAX_SLICE_FACTOR * self.slice_steps)
        prompt.last_step_ns = now

    def _slice_over(self, prompt: _Prompt) -> bool:
        if not _RULES[self.policy].preemptive:
            return False
        # No point yielding after the last token: generate is about to return.
        if prompt.max_new_tokens is not None and prompt.num_tokens >= prompt.max_new_tokens:
            return False
        with self._lock:
            if prompt.slice_num_steps >= prompt.slice_target:
                return True
            # A newcomer waits for its first token: yield now (first-token priority).
            return self.first_token_priority and any(p.first_token_ns is None for p in self._waiting)

    def _pick_next_locked(self) -> _Prompt | None:
        return pick_next(self.policy, self._waiting, self.first_token_priority, self.newcomer_order)

    def _begin_slice(self, prompt: _Prompt) -> None:
        """``prompt`` got the device: bring its context back, then prefetch the next one's."""
        with self._lock:
            prompt.slice_began_ns = time.monotonic_ns()
            prompt.switched_in = prompt.parked_since is not None  # a re-pick of the running prompt is no switch
            if prompt.num_slices == 0:  # its prefill: earlier newcomers still waiting were passed over
                for other in self._waiting:
                    if other.first_token_ns is None and other.arrival_seq < prompt.arrival_seq:
                        other.bypassed += 1
        if prompt.parked_since is not None:
            self._resume(prompt)
        with self._lock:
            prompt.in_slice = True
            prompt.slice_index = self._num_slices
            self._num_slices += 1
            prompt.num_slices += 1
            prompt.slice_start_step = self._num_steps
            prompt.slice_num_steps = 0
            prompt.slice_target = self.slice_steps
            step = self._num_steps
        emit(EventKind.SLICE_START, context=prompt.tag, step=step)
        if self.prefetch:
            self._prefetch_next()

    def _end_slice_locked(self, prompt: _Prompt) -> None:
        if not prompt.in_slice:
            return
        prompt.in_slice = False
        self._slices.append(SliceRecord(prompt.slice_index, prompt.tag, prompt.slice_start_step, prompt.slice_num_steps))
        emit(EventKind.SLICE_END, context=prompt.tag, step=self._num_steps, num_steps=prompt.slice_num_steps)

    # ------------------------------------------------------------------ waiting and handing over

    def _queue_locked(self, prompt: _Prompt) -> None:
        prompt.queued_seq = next(self._seq)
        prompt.state = PromptState.WAITING
        self._waiting.append(prompt)
        if self._running is prompt:
            self._running = None

    def _dispatch_locked(self) -> None:
        """If the device is free, give it to the policy's pick and wake it."""
        if self._running is not None:
            return
        successor = self._pick_next_locked()
        if successor is None:
            return
        if self._prefetched is not None and self._prefetched is not successor:
            self._unprefetch_locked()
        self._waiting.remove(successor)
        self._running = successor
        successor.state = PromptState.RUNNING
        self._cond.notify_all()

    def _wait_turn_locked(self, prompt: _Prompt) -> None:
        """Block until ``prompt`` holds the device; raise its error if it is failed meanwhile."""
        held = prompt.held_interrupt
        while self._running is not prompt and prompt.error is None:
            if held is None:
                self._cond.wait()
            else:  # the main thread: a Ctrl-C is held (it cannot wake us); look for it
                held.deliver()
                self._cond.wait(_POLL_S)
        if prompt.error is not None:
            raise prompt.error

    # ------------------------------------------------------------------ memory side

    def _park(self, prompt: _Prompt) -> None:
        """Mark the outgoing prompt's context not running (the allocator moves it only if needed)."""
        if prompt.has_context:
            prompt.memory.park(prompt.tag)
            prompt.parked_since = time.monotonic_ns()
            prompt.parked_context_bytes = sum(prompt.memory.where(prompt.tag).values())
            prompt.parked_kv_bytes = self._live_kv_bytes(prompt)
            emit(EventKind.PARKED, context=prompt.tag, step=self._num_steps,
                 bytes=prompt.parked_context_bytes, kv_bytes=prompt.parked_kv_bytes)

    @staticmethod
    def _live_kv_bytes(prompt: _Prompt) -> int:
        """Bytes of valid KV in the prompt's cache, read without waiting for the GPU: a static
        cache's token count lives on the device (reading it would stall the switch until the
        step in flight ends), so it is told the count the host knows: the sequence so far
        (``base_len`` + ``num_tokens``) less the newest token, whose keys the next step writes."""
        cache = prompt.cache
        if isinstance(cache, ContextStaticCache) and prompt.base_len is not None:
            return cache.live_bytes(tokens=prompt.base_len + prompt.num_tokens - 1)
        return cache.live_bytes()

    def _resume(self, prompt: _Prompt) -> None:
        """Bring the context back (in the prompt's own thread, before its next step)."""
        with self._lock:
            handle, away = prompt.prefetch, prompt.prefetch_away
            prompt.prefetch = None
            if self._prefetched is prompt:
                self._prefetched = None
        if handle is not None and not handle.done() and prompt.memory.wait_on_stream(handle):
            # Still moving: this prompt's kernels wait for the move on the GPU while its thread
            # goes on, so the host-side work of its next step overlaps the move's tail. The
            # outcome is counted when it lands; bytes it left elsewhere come back at the next step.
            handle.add_done_callback(functools.partial(self._prefetch_landed, prompt, away))
            with self._lock:
                prompt.parked_ns += time.monotonic_ns() - prompt.parked_since
                prompt.parked_since = None
            emit(EventKind.RESUMED, context=prompt.tag, bytes=None, bytes_away=away, bytes_elsewhere=None,
                 prefetched=True)
            return
        if handle is not None:
            result = _wait_move(handle)
            moved_in = getattr(result, "bytes_moved", 0)
            if getattr(result, "bytes_elsewhere", 0):
                # The prefetch ran while the previous prompt still held the GPU (running, so
                # not evictable) and brought back only what fitted; it is parked now.
                result = prompt.memory.resume(prompt.tag, wait=True)
                moved_in += getattr(result, "bytes_moved", 0)
        else:
            away = self._bytes_away(prompt)
            result = prompt.memory.resume(prompt.tag, wait=True)
            moved_in = getattr(result, "bytes_moved", 0)
        now = time.monotonic_ns()
        with self._lock:
            prompt.parked_ns += now - prompt.parked_since
            prompt.parked_since = None
            prompt.bytes_moved += away + moved_in
        emit(EventKind.RESUMED, context=prompt.tag, bytes=moved_in, bytes_away=away,
             bytes_elsewhere=getattr(result, "bytes_elsewhere", 0), prefetched=handle is not None)

    def _prefetch_landed(self, prompt: _Prompt, away: int, future: Any) -> None:
        """A prefetch that the prompt's stream waited for on the GPU has finished."""
        try:
            result = future.result()
        except Exception:  # noqa: BLE001 - rolled back: its bytes are usable where they are
            log.exception("aqua_alloc: prefetch of %r failed; resuming it at its next step", prompt.tag)
            prompt.resume_needed = True
            return
        with self._lock:
            prompt.bytes_moved += away + getattr(result, "bytes_moved", 0)
            if getattr(result, "bytes_elsewhere", 0):
                prompt.resume_needed = True

    def _prefetch_next(self) -> None:
        """Start bringing back the context of the prompt that would run next."""
        with self._lock:
            successor = self._pick_next_locked()
            if (successor is None or successor.prefetch is not None or successor.parked_since is None
                    or not successor.has_context):
                return
            if self._prefetched is not None:
                self._unprefetch_locked()
            successor.prefetch_away = self._bytes_away(successor)
            successor.prefetch = successor.memory.prefetch(successor.tag)  # no wait on this thread's stream
            self._prefetched = successor

    @staticmethod
    def _bytes_away(prompt: _Prompt) -> int:
        """Bytes of the prompt's context that are not on its GPU now."""
        return sum(n for tier, n in prompt.memory.where(prompt.tag).items() if tier != prompt.local_tier)

    def _unprefetch_locked(self) -> None:
        """The predicted successor is not next after all: park its context again."""
        prompt, self._prefetched = self._prefetched, None
        if prompt is None or prompt.prefetch is None:
            return
        handle, prompt.prefetch = prompt.prefetch, None
        try:
            _wait_move(handle)
            prompt.memory.park(prompt.tag)
        except Exception:  # noqa: BLE001 - a failed prefetch only costs its resume later
            log.exception("aqua_alloc: re-parking prefetched context %r failed", prompt.tag)
