"""The serving benchmark: replay a real request trace against one HuggingFace model on one
device, served five ways, and compare responsiveness, throughput and memory.

Systems (:class:`System`; every one serves the same requests at the same arrival times):

- ``fcfs``: plain ``model.generate``, one call at a time in arrival order (one worker
  draining a FIFO queue: a fair lock around ``generate``). The baseline.
- ``threads``: each request's ``generate`` in a thread of its own, started at its arrival,
  no aqua_alloc. Calls run concurrently and may run out of memory; failures are counted.
- ``aqua-host``: each request's ``generate`` in its own thread through
  :class:`aqua_alloc.Scheduler` (``policy="fair"``): one prompt runs at a time, for a
  slice of ``slice_steps`` decode steps; parked contexts (KV caches) go to pinned host
  memory when the GPU budget needs their room.
- ``aqua-peer``: the same, with a second GPU lending its memory as the first tier for parked
  contexts (skipped, with the reason in its row, when there is no second GPU).
- ``hf-cb``: transformers' own continuous batching (``model.init_continuous_batching``),
  requests added at their arrival.

Memory: ``kv_budget`` bytes of GPU memory for inference contexts, the same for all:

- aqua systems: ``aqua_alloc.enable(local_budget=kv_budget)``, host budget default;
  ``aqua-host`` also sets ``lend=0`` so that no peer GPU is a tier.
- ``fcfs`` and ``threads``: ``torch.cuda.set_per_process_memory_fraction`` caps PyTorch's
  caching allocator (reserved bytes) at ``(R - kv(longest) + kv_budget) / total``, where R is
  the peak reserved memory of the longest prompt of the run generated alone (weights,
  activations and its own KV, measured) and kv(longest) its KV bytes: what serving the
  longest request alone takes, with its KV replaced by the whole budget.
- ``hf-cb``: ``ContinuousBatchingConfig(num_blocks=kv_budget // bytes per block)``, the
  size of its paged KV cache (its other buffers are not capped).

Timing: the driver thread submits each request at its replayed arrival time; TTFT runs from
that time to the first generated token being on the host (a stopping criterion that waits
for the token at the first step; for ``hf-cb`` the timestamp transformers records for it);
finish is when ``generate`` returned (``hf-cb``: its last token's timestamp). All times are
``time.perf_counter`` seconds since the run's start. Under the aqua scheduler our criterion
runs after the scheduler's step hook, which may hold a prompt at the end of a slice: a token
counts when the caller's per-step hooks (and a streamer) see it, as a user would.

Offered load: :func:`run_benchmark` first runs a few requests alone (calibration), fits a
:class:`~serve_trace.ServiceModel`, and replays the window at arrival rates of
``load / mean service time`` (``1 / mean service time`` is what ``fcfs`` sustains). The
same solo runs are the references of the correctness check: every system's output ids for
those requests must equal them (``hf-cb`` batches kernels differently, so its outputs are
recorded but not required to match).

Rounds: with ``rounds`` N > 1, each load runs the whole list of systems N times in turn
(round 1: every system, then round 2: every system, ...), so that each system's run has an
``fcfs`` run of the same round minutes or less away: a machine whose speed drifts moves both.
Every row has its ``round`` (1-based; 1 when N is 1); ratios to ``fcfs`` pair rows of the
same load and round, and the per-round ratios and their median over rounds are printed after
the table and kept in the metadata (``paired_ratios``). The time budget counts N rounds.

Ctrl-C: outside the runs (model, calibration) the main thread is alone and a KeyboardInterrupt
is raised where it lands. While a run's threads work, Ctrl-C only sets a flag (a
KeyboardInterrupt raised inside ``Thread.join`` marks the still-running thread as stopped in
CPython 3.11, so it is never joined and the interpreter exits under it: "terminate called
without an active exception"). The main thread sees the flag within ``POLL_S``, stops the run
(running calls end at their next decode step, nothing more is submitted, waiting prompts fail),
joins every thread of it, tears it down, then raises KeyboardInterrupt from
:func:`run_benchmark`. A second Ctrl-C in that time ends the process at once.

Thread-safety: one benchmark at a time per process (it enables and disables aqua_alloc and
sets the process's CUDA memory fraction).
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import math
import queue
import random
import signal
import statistics
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import StaticCache
from transformers.generation.streamers import BaseStreamer

import aqua_alloc
from aqua_alloc.hf.attention import cudnn_attention_enabled, use_decode_friendly_attention
from aqua_alloc.hf.generate_hook import cache_argument
from aqua_alloc.hf.grouped_attention import use_grouped_attention
from aqua_alloc.hf.static_cache import ContextStaticCache, static_cache_length
from serve_options import EXACT_SYSTEMS, MODEL_DEFAULTS, BenchOptions, System, check_options
from serve_trace import (
    ATTRIBUTION,
    BenchInputError,
    LoadedTrace,
    Request,
    RequestRecord,
    ServiceModel,
    clip_requests,
    fit_service_model,
    load_trace,
    replay_arrivals,
    select_window,
    summarize_run,
    time_scale,
    window_rate,
)

__all__ = [
    "System",
    "EXACT_SYSTEMS",
    "MODELS",
    "BenchOptions",
    "BenchResult",
    "Log",
    "build_model",
    "run_benchmark",
    "format_table",
    "write_results",
]

MiB, GiB = 1 << 20, 1 << 30
PAD_ID = 0                 # never drawn as a prompt token
WARMUP_PROMPT_TOKENS = 128
WARMUP_NEW_TOKENS = 8
RUN_SETUP_S = 3.0          # per run: enabling aqua_alloc (pinned host reserve), warm-up call (estimate)
TAIL_REQUESTS = 3          # requests still queued at the last arrival, in the run-time estimate
OVERRUN = 1.5              # the replays stop (later runs skipped, deadlines cut) at this many times --budget-s
CB_PAGE_TOKENS = 256       # transformers' ContinuousBatchingConfig.page_size default (tokens)
POLL_S = 0.05              # s: how soon the main thread sees a Ctrl-C while a run's threads work
REFERENCE_NEW_TOKENS = 33  # decode steps timed for plain transformers' reference steps


# --------------------------------------------------------------------------------------
# Models: real architectures, random weights, built from a config (no download).


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama_8b() -> LlamaConfig:
    """Llama-3.1-8B's shape: 32 layers, 4096 hidden, 8 KV heads of 128 (128 KiB of bf16 KV per token)."""
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=_llama3_rope(8.0),
                       bos_token_id=None, eos_token_id=None)


def _llama_1b() -> LlamaConfig:
    """Llama-3.2-1B's shape: 16 layers, 2048 hidden, 8 KV heads of 64 (32 KiB of bf16 KV per token)."""
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=_llama3_rope(32.0),
                       bos_token_id=None, eos_token_id=None)


def _tiny() -> LlamaConfig:
    """A Llama of 2 layers and 64 hidden for CPU smoke tests; a large init range so greedy
    decoding varies its tokens (512 B of fp32 KV per token)."""
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       initializer_range=0.5, bos_token_id=None, eos_token_id=None)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    config: Callable[[], LlamaConfig]
    cuda_dtype: torch.dtype      # CPU runs use float32 (bf16 matmuls are slow there)


# Shapes; the defaults that depend on the model are serve_options.MODEL_DEFAULTS.
MODELS: dict[str, ModelSpec] = {
    "llama-8b": ModelSpec(_llama_8b, torch.bfloat16),
    "llama-1b": ModelSpec(_llama_1b, torch.bfloat16),
    "tiny": ModelSpec(_tiny, torch.float32),
}
assert set(MODELS) == set(MODEL_DEFAULTS)


def build_model(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Model ``name`` of :data:`MODELS` with seeded random weights, made directly on ``device``."""
    spec = MODELS[name]
    dtype = spec.cuda_dtype if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):  # parameters are created (and initialised) on the device
        model = AutoModelForCausalLM.from_config(spec.config(), dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # random weights: no end of sequence; lengths come from the trace
    model.generation_config.pad_token_id = PAD_ID
    return model


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of keys and values one token takes over all layers."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * model.dtype.itemsize


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# --------------------------------------------------------------------------------------
# Log and result (the options: serve_options.py)


class Log:
    """Prints timestamped lines (seconds since start) and keeps them for the log file."""

    def __init__(self, stream: Any = None) -> None:
        self.t0 = time.perf_counter()
        self.lines: list[str] = []
        self.stream = stream if stream is not None else sys.stdout

    def __call__(self, message: str = "") -> None:
        for text in str(message).splitlines() or [""]:
            line = f"[{time.perf_counter() - self.t0:7.1f}s] {text}"
            self.lines.append(line)
            print(line, file=self.stream, flush=True)

    def write(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")


@dataclasses.dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # per request: system, load, records
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # what -> path
    mismatches: list[str] = dataclasses.field(default_factory=list)  # "system load request" of exact systems

    @property
    def ok(self) -> bool:
        return not self.mismatches


# --------------------------------------------------------------------------------------
# Measuring one generate call


class _FirstTokenStreamer(BaseStreamer):
    """The caller's clock: a streamer, as a user's, that notes when its first token is put (the
    token is on the host then; transformers copies it there for the put). The first ``put`` of
    a generate call is the prompt."""

    def __init__(self) -> None:
        self.first_token_t: float | None = None    # time.perf_counter()
        self.first_token_ns: int | None = None     # time.monotonic_ns(), the clock of aqua_alloc's events
        self._puts = 0

    def put(self, value: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first_token_t, self.first_token_ns = time.perf_counter(), time.monotonic_ns()

    def end(self) -> None:
        pass


class _TokenClock(StoppingCriteria):
    """What a generate call is measured with: ``streamer`` (a :class:`_FirstTokenStreamer`)
    times its first token as a caller sees it, and the clock as a stopping criterion (never
    stops generation, except on abort) stops the call at the next step once one of ``stops``
    (``threading.Event``, :class:`_Flag`) is set."""

    def __init__(self, *stops: Any) -> None:
        self.stops = stops
        self.streamer = _FirstTokenStreamer()
        self._flags: dict[tuple[int, bool], torch.Tensor] = {}

    @property
    def first_token_t(self) -> float | None:
        return self.streamer.first_token_t

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = any(flag.is_set() for flag in self.stops)
        key = (input_ids.shape[0], stop)
        if key not in self._flags:
            self._flags[key] = torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
        return self._flags[key]


def _generate_kwargs(prompt: torch.Tensor, new_tokens: int, clock: _TokenClock, cache: str = "dynamic",
                     config: Any = None) -> dict[str, Any]:
    """Greedy, exactly ``new_tokens`` tokens (min = max), our clock as a stopping criterion and
    its streamer. ``cache="static"``: a static cache (a compiled step on a GPU) whose length is
    bucketed as aqua_alloc buckets it, so that every system runs the same shapes: with the
    model's ``config``, a ``ContextStaticCache`` of that length with no context made here (plain
    generate calls: transformers' ``StaticCache`` in ordinary memory, the class the aqua
    scheduler's caches have, so that every system runs the same compiled step and each length
    compiles once); without, ``cache_implementation="static"`` (the aqua scheduler then makes
    each prompt's cache, in its context)."""
    kwargs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID,
                  stopping_criteria=StoppingCriteriaList([clock]), streamer=clock.streamer)
    if cache == "static" and config is None:
        kwargs["cache_implementation"] = "static"
    elif cache == "static":
        length = static_cache_length(int(prompt.shape[-1]) + new_tokens)
        kwargs.update(cache_argument(ContextStaticCache(config, max_cache_len=length)))
    return kwargs


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


class _Flag:
    """Set once, read from any thread. No lock, unlike ``threading.Event``, so that a signal
    handler may set it: the handler runs in the main thread between two bytecodes, maybe while
    that thread holds an Event's lock."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@contextmanager
def _ctrl_c_sets(flag: _Flag) -> Iterator[None]:
    """In the main thread: while inside, SIGINT sets ``flag`` instead of raising
    KeyboardInterrupt; a second SIGINT ends the process at once (the default action). Elsewhere:
    nothing (signals reach only the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        flag.set()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


# --------------------------------------------------------------------------------------
# Runs: one system serving one replay


class _Bench:
    """What every run shares: the model, the requests and their prompts, settings."""

    def __init__(self, options: BenchOptions, log: Log, model: torch.nn.Module, device: torch.device,
                 requests: list[Request], prompts: list[torch.Tensor], kv_budget: int, out_dir: Path, stem: str):
        self.options = options
        self.log = log
        self.model = model
        self.device = device
        self.requests = requests
        self.prompts = prompts
        self.kv_budget = kv_budget
        self.out_dir = out_dir
        self.stem = stem
        self.check_ids: set[int] = set()      # indices into requests whose output ids are kept
        self.service: ServiceModel | None = None  # fitted on the solo runs (calibration)
        self.memory_fraction: float | None = None  # fcfs/threads cap (CUDA), see module docstring
        self.cap_bytes = 0                    # the cap in bytes (memory_fraction x device memory)
        self.base_reserved = 0                # bytes PyTorch held when the cap was measured
        self.interrupt = _Flag()              # Ctrl-C while a run's threads work (module docstring)
        self.warmup_prompt = torch.randint(1, model.config.vocab_size, (1, WARMUP_PROMPT_TOKENS),
                                           generator=torch.Generator().manual_seed(options.seed + 1)).to(device)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


class _Run:
    """One system serving the replay of ``bench.requests`` (base class).

    Life cycle: ``setup()``; ``start()`` sets the run's clock; ``submit(i)`` at each arrival
    (driver thread); ``wait(deadline)`` until every request has left or the deadline, then
    aborts what is left; ``teardown()`` returns the row's extra fields. Subclasses record
    into ``self.records[i]`` from any thread (one writer per record).
    """

    system: System

    def __init__(self, bench: _Bench, load: float, arrivals: list[float], round_no: int = 1) -> None:
        self.bench = bench
        self.load = load
        self.round_no = round_no
        self.records = [RequestRecord(request_id=r.id, arrival_s=a, expected_tokens=r.output_tokens)
                        for r, a in zip(bench.requests, arrivals)]
        self.abort = threading.Event()
        self.t0 = 0.0
        self.first_token_ns: dict[int, int] = {}  # request index -> its caller's first token, time.monotonic_ns()
        self.notes: list[str] = []

    @property
    def label(self) -> str:
        return _run_label(self.system, self.load, self.round_no, self.bench.options.rounds)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def interrupted(self) -> bool:
        return self.bench.interrupt.is_set()

    def sleep_until(self, t: float) -> bool:
        """Sleep until ``t`` s on the run's clock; False if interrupted first."""
        while not self.interrupted and (delay := t - self.now()) > 0:
            time.sleep(min(delay, POLL_S))
        return not self.interrupted

    def _join(self, threads: Sequence[threading.Thread], deadline_s: float) -> bool:
        """Wait for ``threads`` until the deadline (run's clock) or an interrupt; True if all ended."""
        for thread in threads:
            while thread.is_alive():
                if self.interrupted or self.now() >= deadline_s:
                    return False
                thread.join(timeout=min(POLL_S, max(deadline_s - self.now(), 0)))
        return True

    def setup(self) -> None:
        pass

    def _require_aqua_off(self) -> None:
        """Runs without aqua_alloc must not inherit it (its generate hook would give them contexts)."""
        if aqua_alloc.is_enabled():
            raise RuntimeError("aqua_alloc is still enabled (an earlier run could not disable it)")

    def start(self) -> None:
        if self.bench.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def submit(self, i: int) -> None:
        raise NotImplementedError

    def wait(self, deadline_s: float) -> None:
        """Until every request has left, the deadline or an interrupt; then stop what is left and
        join every thread of the run."""
        raise NotImplementedError

    def teardown(self) -> dict[str, Any]:
        return {}

    def _torch_peak(self) -> dict[str, Any]:
        if not self.bench.cuda:
            return {"peak_bytes": {}, "torch_peak_allocated_bytes": None}
        peak = int(torch.cuda.max_memory_allocated())
        return {"peak_bytes": {"gpu0": peak}, "torch_peak_allocated_bytes": peak}


class _GenerateRun(_Run):
    """Runs of plain ``model.generate`` calls (one per request)."""

    def _generate(self, **kwargs: Any) -> torch.Tensor:
        return self.bench.model.generate(**kwargs)

    def _serve(self, i: int) -> None:
        """Serve request ``i`` in the calling thread; record what happened."""
        bench, record = self.bench, self.records[i]
        if self.abort.is_set():
            record.error = "not started before the run's deadline"
            return
        clock = _TokenClock(self.abort, bench.interrupt)
        prompt = bench.prompts[i]
        try:
            out = self._generate(**_generate_kwargs(prompt, record.expected_tokens, clock, bench.options.cache,
                                                    self._static_config()), **self._extra(i))
            record.finish_s = self.now()  # generate synchronised on its last token (its stop check reads it)
            new_ids = out[0, prompt.shape[-1]:]
            record.num_tokens = int(new_ids.shape[-1])
            if i in bench.check_ids:
                record.output_ids = new_ids.tolist()
            if self.abort.is_set() and record.num_tokens < record.expected_tokens:
                record.error = "stopped at the run's deadline"
        except BaseException as exc:  # noqa: BLE001 - one request's failure is a result, not a crash
            record.error = _describe(exc)
            record.oom = _is_oom(exc)
            record.finish_s = self.now()
        if clock.first_token_t is not None:
            record.first_token_s = clock.first_token_t - self.t0
            self.first_token_ns[i] = clock.streamer.first_token_ns
        if bench.options.verbose:
            self._log_request(i)

    def _extra(self, i: int) -> dict[str, Any]:
        return {}

    def _static_config(self) -> Any:
        """The config plain generate calls make their static cache with (None: the callee makes it)."""
        return self.bench.model.config

    def _log_request(self, i: int) -> None:
        r = self.records[i]
        ttft = "-" if r.first_token_s is None else f"{r.first_token_s - r.arrival_s:.3f}s"
        self.bench.log(f"  {self.label} r{r.request_id}: arrival {r.arrival_s:.3f}s ttft {ttft} "
                       f"tokens {r.num_tokens}/{r.expected_tokens}" + (f" error {r.error}" if r.error else ""))

    def _set_memory_cap(self) -> None:
        self._require_aqua_off()
        if not self.bench.cuda:
            self.notes.append("CPU: no memory cap")
        elif self.bench.memory_fraction is not None:
            gc.collect()
            # cuBLAS keeps a workspace per (thread, stream) in PyTorch's allocator until told
            # otherwise: the request threads of an earlier run leave theirs behind.
            clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear_workspaces is not None:
                clear_workspaces()
            torch.cuda.empty_cache()
            # What PyTorch still holds beyond what it held when the cap was measured belongs to
            # earlier runs, not to this one: added to the cap, so that every run, first or
            # later in a round, has the same room.
            retained = max(torch.cuda.memory_reserved() - self.bench.base_reserved, 0)
            fraction = self.bench.memory_fraction
            if retained:
                total = torch.cuda.get_device_properties(self.bench.device).total_memory
                fraction = min((self.bench.cap_bytes + retained) / total, 1.0)
                self.notes.append(f"{_fmt_bytes(retained)} held from earlier runs added to the memory cap")
            torch.cuda.set_per_process_memory_fraction(fraction)

    def _clear_memory_cap(self) -> None:
        if self.bench.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
            gc.collect()
            torch.cuda.empty_cache()

    def teardown(self) -> dict[str, Any]:
        """Peak memory of the run, then the cap its setup set is lifted."""
        fields = self._torch_peak()
        self._clear_memory_cap()
        return fields


class _FcfsRun(_GenerateRun):
    """One worker serves a FIFO queue: requests run alone, to completion, in arrival order."""

    system = System.FCFS

    def setup(self) -> None:
        self._set_memory_cap()
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="fcfs-worker", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while (i := self._queue.get()) is not None:
            self._serve(i)

    def submit(self, i: int) -> None:
        self._queue.put(i)

    def wait(self, deadline_s: float) -> None:
        self._queue.put(None)
        if not self._join([self._worker], deadline_s):
            self.abort.set()  # the running call stops at its next step; the queued ones are not started
            self._worker.join()


class _ThreadsRun(_GenerateRun):
    """A thread per request, started at its arrival; calls run concurrently."""

    system = System.THREADS

    def setup(self) -> None:
        self._set_memory_cap()
        self._threads: list[threading.Thread] = []

    def submit(self, i: int) -> None:
        thread = threading.Thread(target=self._serve, args=(i,), name=f"{self.system.value}-r{i}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def wait(self, deadline_s: float) -> None:
        if not self._join(self._threads, deadline_s):
            self._stop_late()
            for thread in self._threads:
                thread.join()

    def _stop_late(self) -> None:
        self.abort.set()


class _AquaRun(_ThreadsRun):
    """A thread per request through aqua_alloc's fair scheduler; parked contexts go to host."""

    system = System.AQUA_HOST

    def _settings(self) -> dict[str, Any]:
        return {"local_budget": self.bench.kv_budget, "lend": 0}  # lend 0: no peer tier, parked contexts go to host

    def setup(self) -> None:
        from aqua_alloc.hf.scheduler import Scheduler  # noqa: PLC0415 - imports transformers-facing code

        bench = self.bench
        self._enabled = False
        if bench.cuda:
            aqua_alloc.enable(**self._settings())
            self._enabled = True
        else:
            self.notes.append("CPU: the fair scheduler only; no context is parked or moved (moves need a CUDA GPU)")
        self.scheduler = Scheduler(device=bench.device, policy="fair", slice_steps=bench.options.slice_steps,
                                   switch_overhead=bench.options.switch_overhead,
                                   newcomer_order=bench.options.newcomer_order,
                                   chunk_tokens=bench.options.chunk_tokens)
        # Warm-up through the scheduler (first context, pool creation), outside the measurement.
        self.scheduler.generate(bench.model, tag=f"{self.label}-warmup",
                                **_generate_kwargs(bench.warmup_prompt, WARMUP_NEW_TOKENS,
                                                   _TokenClock(self.abort, bench.interrupt), bench.options.cache))
        self._threads = []
        self._events_from_ns = time.monotonic_ns()

    def _generate(self, **kwargs: Any) -> torch.Tensor:
        return self.scheduler.generate(self.bench.model, **kwargs)

    def _extra(self, i: int) -> dict[str, Any]:
        return {"tag": f"{self.label}-r{self.bench.requests[i].id}"}

    def _static_config(self) -> Any:
        return None  # the scheduler makes each prompt's static cache, in its context

    def _stop_late(self) -> None:
        self.abort.set()                      # the running prompt stops at its next step
        self.scheduler.shutdown(wait=False)   # the waiting ones fail with SchedulerShutdown

    def _note_system_first_tokens(self, stats: Any) -> None:
        """Each request's first token as the scheduler logged it, on the run's clock (the
        scheduler's and the streamer's stamps share time.monotonic_ns)."""
        made_ns = {p.tag: p.first_token_ns for p in stats.prompts}
        for i, seen_ns in self.first_token_ns.items():
            ns = made_ns.get(self._extra(i)["tag"])
            record = self.records[i]
            if ns is not None and record.first_token_s is not None:
                record.system_first_token_s = record.first_token_s - (seen_ns - ns) / 1e9

    def teardown(self) -> dict[str, Any]:
        from aqua_alloc.obs import trace, trace_writer  # noqa: PLC0415

        bench = self.bench
        fields: dict[str, Any] = self._torch_peak()
        stats = self.scheduler.stats()
        self.scheduler.shutdown()
        self._note_system_first_tokens(stats)
        fields["num_slices"] = len(stats.slices)
        fields["mean_slice_steps"] = round(statistics.fmean(s.num_steps for s in stats.slices), 2) if stats.slices else None
        switches = [p.last_switch_s for p in stats.prompts if p.num_slices > 1]
        fields["mean_last_switch_s"] = round(statistics.fmean(switches), 6) if switches else None
        served = [p for p in stats.prompts if not p.tag.endswith("-warmup")]
        steps = sum(p.num_steps for p in served)
        fields["scheduler_cpu_us_per_step"] = (round(sum(p.hook_cpu_ns for p in served) / steps / 1e3, 2)
                                               if steps else None)
        fields["parked_s"] = round(sum(p.parked_ns for p in stats.prompts) / 1e9, 6)
        if self._enabled:
            aq = aqua_alloc.stats()
            fields["peak_bytes"] = {tier: int(s["peak"]) for tier, s in aq["tiers"].items()}
            fields["num_moves"] = int(aq["num_moves"])
            fields["bytes_moved"] = int(aq["bytes_moved"])
        events = [e for e in trace.collect() if e.t_ns >= self._events_from_ns]
        name = f"{bench.stem}-trace-{self.system.value}-load{self.load:g}"
        if bench.options.rounds > 1:
            name += f"-round{self.round_no}"  # one file per run: rounds must not overwrite each other
        path = bench.out_dir / f"{name}.json"
        trace_writer.write_trace(path, events, extra_metadata={"benchmark": "bench_serve", "system": self.system.value,
                                                        "load": self.load, "round": self.round_no})
        fields["trace_file"] = str(path)
        if self._enabled:
            gc.collect()
            if bench.cuda:
                torch.cuda.synchronize()
            aqua_alloc.disable()
        return fields


class _AquaPeerRun(_AquaRun):
    system = System.AQUA_PEER

    def _settings(self) -> dict[str, Any]:
        return {"local_budget": self.bench.kv_budget}  # lend default: peers lend their free memory


class _ContinuousBatchingRun(_Run):
    """transformers' continuous batching: a manager thread batches every request in flight."""

    system = System.HF_CB

    def setup(self) -> None:
        from transformers import GenerationConfig  # noqa: PLC0415
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: PLC0415

        self._require_aqua_off()
        bench = self.bench
        if bench.options.cache == "static":
            self.notes.append("--cache static does not apply: continuous batching keeps its own paged cache")
        max_output = max(r.output_tokens for r in bench.requests)
        generation = GenerationConfig(do_sample=False, max_new_tokens=max_output, eos_token_id=-1,  # -1: no EOS
                                      pad_token_id=PAD_ID)
        # The config's field names moved between transformers 5.x releases (5.17 has no
        # page_size): pass only what the installed one takes.
        params = inspect.signature(ContinuousBatchingConfig).parameters
        cb_kwargs: dict[str, Any] = {"num_blocks": cb_num_blocks(bench.model, bench.kv_budget)}
        for name in ("page_size", "block_size"):
            if name in params:
                cb_kwargs[name] = CB_PAGE_TOKENS
                break
        if "auto_switch_to_flash" in params:
            cb_kwargs["auto_switch_to_flash"] = False  # keep the attention the others use
        config = ContinuousBatchingConfig(**cb_kwargs)
        self.manager = bench.model.init_continuous_batching(generation_config=generation,
                                                            continuous_batching_config=config)
        self.manager.start()
        self._ids = {f"r{i}": i for i in range(len(bench.requests))}
        self._prompts = [p[0].tolist() for p in bench.prompts]
        self._pending = set(self._ids)
        self._done = threading.Event()
        # Streaming: each token is handed to the caller as it comes, so the caller's clock sees
        # the first one (as a streamer's put does for the other systems).
        self._streaming = "streaming" in inspect.signature(self.manager.add_request).parameters
        if not self._streaming:
            self.notes.append("this transformers' add_request cannot stream: TTFT is its own first-token timestamp")
        try:
            self._warm_up()
        except BaseException:
            self.manager.stop(block=True, timeout=60, hard_stop=True)  # no manager thread left behind
            raise
        self._collector = threading.Thread(target=self._collect, name="hf-cb-collector", daemon=True)

    def _warm_up(self) -> None:
        """One short request, outside the measurement."""
        self.manager.add_request(self.bench.warmup_prompt[0].tolist(), request_id="warmup",
                                 max_new_tokens=WARMUP_NEW_TOKENS, eos_token_id=-1)
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:
            if self.interrupted:
                return  # the replay submits nothing; wait() stops the manager's work
            result = self.manager.get_result(request_id="warmup", timeout=POLL_S)
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"continuous batching warm-up failed: {result.error}")
                return
            if not self.manager.is_running():
                raise RuntimeError("continuous batching manager stopped during its warm-up")
        raise RuntimeError("continuous batching warm-up did not finish in 120 s")

    def start(self) -> None:
        super().start()
        self._collector.start()

    def submit(self, i: int) -> None:
        record = self.records[i]
        stream = {"streaming": True} if self._streaming else {}
        request_id = self.manager.add_request(self._prompts[i], request_id=f"r{i}",
                                              max_new_tokens=record.expected_tokens, record_timestamps=True,
                                              eos_token_id=-1, **stream)
        if request_id is None:
            record.error = "refused by the continuous batching manager"
            self._finish(f"r{i}")

    def _finish(self, request_id: str) -> None:
        self._pending.discard(request_id)
        if not self._pending:
            self._done.set()

    def _collect(self) -> None:
        while not self._done.is_set():
            result = self.manager.get_result(timeout=0.1)
            if result is None or result.request_id not in self._ids:
                if result is None and not self.manager.is_running():
                    return
                continue
            i = self._ids[result.request_id]
            record = self.records[i]
            stamps = result.timestamps or []
            if record.first_token_s is None and result.generated_tokens and self._streaming:
                record.first_token_s = self.now()  # the caller has its first token
            if not result.is_finished():
                continue
            record.num_tokens = len(result.generated_tokens)
            if stamps:
                record.system_first_token_s = stamps[0] - self.t0
                if record.first_token_s is None:
                    record.first_token_s = record.system_first_token_s
            record.finish_s = (stamps[-1] if stamps else time.perf_counter()) - self.t0
            if result.error is not None:
                record.error = str(result.error).splitlines()[0][:200]
                record.oom = "out of memory" in record.error.lower()
            if i in self.bench.check_ids:
                record.output_ids = list(result.generated_tokens)
            self._finish(result.request_id)

    def wait(self, deadline_s: float) -> None:
        while self.manager.is_running() and not self._done.wait(timeout=min(max(deadline_s - self.now(), 0), POLL_S)):
            if self.now() >= deadline_s or self.interrupted:
                break
        if not self._done.is_set():
            why = ("interrupted" if self.interrupted else "not finished by the run's deadline" if self.manager.is_running()
                   else "the continuous batching manager stopped before finishing it")
            self.abort.set()
            for request_id in list(self._pending):
                self.manager.cancel_request(request_id)
                self.records[self._ids[request_id]].error = why
            self._done.set()
        self._collector.join()  # it ends within a get_result timeout once _done is set

    def teardown(self) -> dict[str, Any]:
        fields = self._torch_peak()
        fields["cb_num_blocks"] = cb_num_blocks(self.bench.model, self.bench.kv_budget)
        self.manager.stop(block=True, timeout=60, hard_stop=self.abort.is_set())
        self.manager.destroy()
        if self.bench.cuda:
            gc.collect()
            torch.cuda.empty_cache()
        return fields


RUNS: dict[System, type[_Run]] = {
    System.FCFS: _FcfsRun,
    System.THREADS: _ThreadsRun,
    System.AQUA_HOST: _AquaRun,
    System.AQUA_PEER: _AquaPeerRun,
    System.HF_CB: _ContinuousBatchingRun,
}


def cb_block_bytes(model: torch.nn.Module) -> int:
    """Bytes of one continuous-batching cache block: ``CB_PAGE_TOKENS`` tokens of KV, all layers."""
    return kv_bytes_per_token(model) * CB_PAGE_TOKENS


def cb_num_blocks(model: torch.nn.Module, kv_budget: int) -> int:
    return kv_budget // cb_block_bytes(model)


def _replay(run: _Run, arrivals: list[float], deadline_s: float) -> None:
    """Drive ``run``: submit each request at its arrival (seconds after start), then wait. On an
    interrupt nothing more is submitted; if a submit raises, what runs is stopped and joined."""
    run.start()
    try:
        for i, arrival in enumerate(arrivals):
            if not run.sleep_until(arrival):
                break
            run.records[i].submitted_s = run.now()
            run.submit(i)
    except BaseException:
        run.wait(0.0)
        raise
    run.wait(deadline_s)


# --------------------------------------------------------------------------------------
# The benchmark


def _unavailable(system: System, device: torch.device, model: torch.nn.Module, requests: list[Request],
                 kv_budget: int, cache: str = "dynamic") -> str | None:
    """Why ``system`` cannot run here, or None."""
    if system == System.AQUA_PEER:
        if device.type != "cuda":
            return "needs 2 CUDA GPUs; this machine has none"
        if torch.cuda.device_count() < 2:
            return f"needs 2 GPUs; torch.cuda.device_count() is {torch.cuda.device_count()}"
        if not torch.cuda.can_device_access_peer(0, 1):
            return "GPU 0 cannot access GPU 1's memory (no peer access)"
    if system == System.HF_CB:
        if not hasattr(model, "init_continuous_batching"):
            return "this transformers has no continuous batching (model.init_continuous_batching)"
        try:
            from transformers.generation import configuration_utils  # noqa: PLC0415
        except ImportError as e:
            return f"transformers' ContinuousBatchingConfig is not importable: {e}"
        if not hasattr(configuration_utils, "ContinuousBatchingConfig"):
            return "transformers has no ContinuousBatchingConfig (transformers.generation.configuration_utils)"
        blocks = cb_num_blocks(model, kv_budget)
        need = max(math.ceil((r.prompt_tokens + r.output_tokens) / CB_PAGE_TOKENS) for r in requests)
        if blocks < need:
            return (f"--kv-budget gives {blocks} cache blocks of {CB_PAGE_TOKENS} tokens; the longest request "
                    f"needs {need}")
    return None


def _solo(bench: _Bench, i: int) -> tuple[float, float, list[int]]:
    """Run request ``i`` alone with plain generate: (ttft s, total s, output ids)."""
    clock = _TokenClock(threading.Event())
    prompt = bench.prompts[i]
    if bench.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = bench.model.generate(**_generate_kwargs(prompt, bench.requests[i].output_tokens, clock, bench.options.cache,
                                                  bench.model.config))
    ids = out[0, prompt.shape[-1]:].tolist()
    total = time.perf_counter() - t0
    return clock.first_token_t - t0, total, ids


def _estimate_run_s(model: ServiceModel, requests: Sequence[Request], load: float) -> float:
    """Expected seconds of one run: the arrivals' span at this load, a backlog of a few
    requests left at the last arrival (``TAIL_REQUESTS`` mean service times), and the set-up."""
    mean = model.mean_service_s(requests)
    span = (len(requests) - 1) * mean / load
    return span + TAIL_REQUESTS * mean + RUN_SETUP_S


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f} MiB" if n < GiB else f"{n / GiB:,.2f} GiB"


def _round(value: Any, digits: int = 6) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")


def _run_label(system: System, load: float, round_no: int, rounds: int) -> str:
    """system@load, and #round when the benchmark runs more than one round."""
    return f"{system.value}@{load:g}" + (f"#{round_no}" if rounds > 1 else "")


def _make_row(system: str, load: float, round_no: int = 1, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "system": system, "load": load, "round": round_no, "requests": None, "completed": None, "failed": None, "oom": None,
        "ttft_mean_s": None, "ttft_p50_s": None, "ttft_p90_s": None, "ttft_p99_s": None,
        "tpot_mean_s": None, "e2e_mean_s": None, "output_tok_s": None, "peak_bytes": {},
        "ttft_mean_ratio_to_fcfs": None, "ttft_p99_ratio_to_fcfs": None, "output_tok_s_ratio_to_fcfs": None,
        "outputs_checked": 0, "outputs_identical": None, "skipped": None,
    }
    row.update(fields)
    return {k: _round(v) for k, v in row.items()}


RATIOS = (("ttft_mean_s", "ttft_mean_ratio_to_fcfs", "ttft_mean_ratio"),
          ("ttft_p99_s", "ttft_p99_ratio_to_fcfs", "ttft_p99_ratio"),
          ("output_tok_s", "output_tok_s_ratio_to_fcfs", "output_tok_s_ratio"))  # row field, row ratio, paired name


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's ttft mean, ttft p99 and tok/s over fcfs's at the same load and round."""
    fcfs = {(row["load"], row["round"]): row for row in rows
            if row["system"] == System.FCFS.value and not row["skipped"]}
    for row in rows:
        base = fcfs.get((row["load"], row["round"]))
        if base is None or row["skipped"]:
            continue
        for field, name, _ in RATIOS:
            if row[field] is not None and base[field]:
                row[name] = round(row[field] / base[field], 4)


def _paired_ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (system, load) other than fcfs, in the rows' order: each round's ratios to fcfs of the
    same load and round (as :func:`_add_ratios` set them) and their median over the rounds that
    have one. (system, load) pairs with no paired round (skipped, failed) are left out."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        if row["system"] != System.FCFS.value:
            groups.setdefault((row["system"], row["load"]), []).append(row)
    paired = []
    for (system, load), group in groups.items():
        rounds = [{"round": row["round"]} | {short: row[name] for _, name, short in RATIOS}
                  for row in sorted(group, key=lambda row: row["round"])]
        if all(r[short] is None for r in rounds for _, _, short in RATIOS):
            continue
        entry: dict[str, Any] = {"system": system, "load": load, "rounds": rounds}
        for _, _, short in RATIOS:
            values = [r[short] for r in rounds if r[short] is not None]
            entry[f"median_{short}"] = round(statistics.median(values), 4) if values else None
        paired.append(entry)
    return paired


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Options checked and resolved, before any model is built."""

    model: str                  # key of MODELS
    model_is_default: bool      # chosen by the device (serve_options.DEFAULT_MODEL), not by --model
    systems: list[System]
    loads: list[float]
    kv_budget: int              # bytes
    device: torch.device
    max_prompt: int | None
    max_output: int | None


def _resolve(options: BenchOptions) -> _Plan:
    """Check the options (serve_options.check_options) on this machine's device; raise
    BenchInputError naming the bad one."""
    if options.device not in (None, "cuda", "cpu"):
        raise BenchInputError(f"--device={options.device!r}: expected cuda or cpu")
    device_type = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("--device=cuda: CUDA is not available on this machine")
    checked = check_options(options, device_type)
    return _Plan(model=checked.model, model_is_default=checked.model_is_default, systems=checked.systems,
                 loads=checked.loads, kv_budget=checked.kv_budget,
                 device=torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu"),
                 max_prompt=checked.max_prompt, max_output=checked.max_output)


def _load_requests(options: BenchOptions, plan: _Plan, log: Log) -> tuple[LoadedTrace, list[Request], dict[str, Any]]:
    """The trace, the window's requests (clipped) and what the window is, logged."""
    trace = load_trace(options.trace, options.traces_dir)
    if trace.note:
        log(f"NOTE: {trace.note}")
    requests = select_window(trace, options.window_start_s, options.window_s, options.max_requests)
    requests, num_prompts_clipped, num_outputs_clipped = clip_requests(requests, plan.max_prompt, plan.max_output)
    window_rate(requests)  # at least two requests, not all at one instant: else an arrival rate is meaningless
    log(f"trace {trace.name}: {trace.path} ({len(trace.rows)} requests over {trace.span_s:.1f} s); "
        f"{ATTRIBUTION.get(trace.path.suffix.lower())}")
    log(f"window: start {options.window_start_s:g} s, duration {options.window_s:g} s of trace time; "
        f"{len(requests)} requests (--max-requests {options.max_requests}), trace rows "
        f"{requests[0].id}..{requests[-1].id}, arriving over {requests[-1].arrival_s:.2f} s")
    if num_prompts_clipped or num_outputs_clipped:
        log(f"clipping: {num_prompts_clipped} prompts to {plan.max_prompt} tokens (--max-prompt), "
            f"{num_outputs_clipped} outputs to {plan.max_output} tokens (--max-output)")
    log(f"seed {options.seed} (weights, prompt token ids, correctness sample)")
    window = {"start_s": options.window_start_s, "duration_s": options.window_s,
              "max_prompt": plan.max_prompt, "max_output": plan.max_output,
              "num_prompts_clipped": num_prompts_clipped, "num_outputs_clipped": num_outputs_clipped}
    return trace, requests, window


def _measure_memory_cap(bench: _Bench) -> dict[str, Any]:
    """fcfs/threads cap (see the module docstring): sets ``bench.memory_fraction``; CUDA only."""
    requests, log = bench.requests, bench.log
    longest = max(range(len(requests)), key=lambda i: requests[i].prompt_tokens)
    gc.collect()
    torch.cuda.empty_cache()
    bench.base_reserved = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    bench.model.generate(**_generate_kwargs(bench.prompts[longest], 2, _TokenClock(threading.Event()),
                                            bench.options.cache, bench.model.config))
    torch.cuda.synchronize()
    reserved = torch.cuda.max_memory_reserved()
    total = torch.cuda.get_device_properties(bench.device).total_memory
    cap_bytes = reserved - kv_bytes_per_token(bench.model) * (requests[longest].prompt_tokens + 2) + bench.kv_budget
    bench.memory_fraction = min(cap_bytes / total, 1.0)
    bench.cap_bytes = cap_bytes
    log(f"fcfs/threads memory cap: {_fmt_bytes(cap_bytes)} = peak reserved {_fmt_bytes(reserved)} of the "
        f"longest prompt ({requests[longest].prompt_tokens} tokens) alone - its KV + kv budget; "
        f"set_per_process_memory_fraction({bench.memory_fraction:.4f})")
    return {"longest_prompt_tokens": requests[longest].prompt_tokens, "solo_peak_reserved_bytes": reserved,
            "cap_bytes": cap_bytes, "fraction": bench.memory_fraction}


def _calibrate(bench: _Bench, check: list[int], mismatches: list[str]
               ) -> tuple[ServiceModel, dict[int, list[int]], list[dict[str, Any]]]:
    """Run each ``check`` request alone, twice: the service model (from the faster run of each:
    noise only ever adds time), their output ids (references), the runs. Two solo runs that
    differ go into ``mismatches``: exactness cannot be checked on a machine that is not
    deterministic."""
    samples, references, solo_runs = [], {}, []
    for i in check:
        (ttft_a, total_a, ids_a), (ttft_b, total_b, ids_b) = _solo(bench, i), _solo(bench, i)
        ttft, total = min(ttft_a, ttft_b), min(total_a, total_b)
        r = bench.requests[i]
        samples.append((r.prompt_tokens, r.output_tokens, ttft, total))
        references[i] = ids_a
        solo_runs.append({"request": r.id, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                          "ttft_s": [round(ttft_a, 6), round(ttft_b, 6)],
                          "total_s": [round(total_a, 6), round(total_b, 6)],
                          "identical": ids_a == ids_b})
        bench.log(f"solo r{r.id}: prompt {r.prompt_tokens}, output {r.output_tokens} tokens: ttft {ttft_a * 1e3:.1f} / "
                  f"{ttft_b * 1e3:.1f} ms, total {total_a:.3f} / {total_b:.3f} s (two runs)")
        if ids_a != ids_b:
            bench.log(f"solo r{r.id}: OUTPUT MISMATCH between two solo runs: generate is not deterministic here")
            mismatches.append(f"solo r{r.id} (two solo runs differ)")
    service = fit_service_model(samples)
    bench.log(f"service model: ttft {service.first_token_s * 1e3:.1f} ms + {service.prefill_s_per_token * 1e6:.1f} us "
              f"per prompt token; {service.decode_s_per_token * 1e3:.2f} ms per further token")
    return service, references, solo_runs


class _StepTimes(StoppingCriteria):
    """Host time at the end of each decode step (generate waits for each step's token)."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.t.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def median_ms(self) -> float | None:
        steps = [b - a for a, b in zip(self.t[1:], self.t[2:])]  # after the first decode step
        return round(statistics.median(steps) * 1e3, 3) if steps else None


def _reference_steps(bench: _Bench, i: int, new_tokens: int = REFERENCE_NEW_TOKENS) -> dict[str, Any]:
    """What a user of plain transformers gets for the same model and prompt (request ``i``),
    aqua_alloc off: ms per decode step with the default (dynamic) cache, and with
    transformers' own ``StaticCache`` of the length the systems' caches get (compiled on a
    GPU; the second call is timed) under its default attention (sdpa) and, if the run uses
    another (``--attn``), under that one too."""
    prompt = bench.prompts[i]
    attn = bench.options.attn
    result: dict[str, Any] = {"request": bench.requests[i].id, "prompt_tokens": int(prompt.shape[-1]),
                              "new_tokens": new_tokens, "attn": attn}
    length = static_cache_length(int(prompt.shape[-1]) + new_tokens)
    result["static_cache_tokens"] = length
    variants = [("dynamic", "eager", attn), ("static", "static", "sdpa")]
    if attn != "sdpa":
        variants.append(("static", f"static_{attn}", attn))
    for cache, name, attention in variants:
        with _model_attention(bench.model, attention):
            for _ in range(2 if cache == "static" else 1):  # static: compiled and recorded by the second call
                times = _StepTimes()
                kwargs = _generate_kwargs(prompt, new_tokens, _TokenClock(threading.Event()))
                if cache == "static":  # transformers' own class, of the systems' bucketed length
                    kwargs.update(cache_argument(StaticCache(config=bench.model.config, max_cache_len=length)))
                kwargs["stopping_criteria"].append(times)
                bench.model.generate(**kwargs)
        result[f"{name}_ms_per_step"] = times.median_ms()
    mode = "deterministic mode" if bench.options.deterministic else "no deterministic mode"
    compiled = " (compiled step)" if bench.cuda else " (not compiled on CPU)"
    bench.log(f"plain transformers, same model, r{bench.requests[i].id}'s prompt ({prompt.shape[-1]} tokens), "
              f"aqua_alloc off, {mode}: {result['eager_ms_per_step']} ms per step eager (dynamic cache), "
              f"{result['static_ms_per_step']} ms with its StaticCache of {length} tokens and sdpa attention{compiled}"
              + (f", {result[f'static_{attn}_ms_per_step']} ms with {attn}" if attn != "sdpa" else ""))
    return result


def _warm_static_buckets(bench: _Bench) -> dict[str, float]:
    """--cache static: one plain call per static cache length the requests will use, before
    anything is timed, so that compiling each length's step (on a GPU) is paid here, once:
    the first-call cost, logged per length. Returns {length: seconds}."""
    lengths = sorted({static_cache_length(r.prompt_tokens + r.output_tokens) for r in bench.requests})
    costs: dict[str, float] = {}
    generator = torch.Generator().manual_seed(bench.options.seed + 2)
    for length in lengths:
        prompt = torch.randint(1, bench.model.config.vocab_size, (1, max(length // 2 - 1, 1)),
                               generator=generator).to(bench.device)
        t0 = time.perf_counter()
        bench.model.generate(**_generate_kwargs(prompt, 2, _TokenClock(threading.Event()), "static", bench.model.config))
        costs[str(length)] = round(time.perf_counter() - t0, 3)
    bench.log("static cache: first call per cache length (tokens: s" + (", compilation included" if bench.cuda else "")
              + "): " + ", ".join(f"{k}: {v}" for k, v in costs.items()))
    return costs


def _estimate_replays_s(service: ServiceModel, requests: Sequence[Request], num_systems: int,
                        loads: Sequence[float], rounds: int) -> float:
    """Expected seconds of all replays: every system, every load, every round."""
    return rounds * num_systems * sum(_estimate_run_s(service, requests, load) for load in loads)


def _fit_budget(bench: _Bench, service: ServiceModel, num_systems: int, loads: list[float], keep: int,
                rounds: int = 1) -> None:
    """Keep the first requests whose replays (every system, every load, ``rounds`` times) fit
    ``budget_s`` by the service model's estimate; never fewer than ``keep``, nor fewer than
    reach a second arrival time (a burst alone has no arrival rate: Mooncake's come in 3-second
    buckets)."""
    options, requests = bench.options, bench.requests
    if options.budget_s is None:
        return
    n = len(requests)
    keep = max(keep, next((i + 1 for i, r in enumerate(requests) if r.arrival_s > requests[0].arrival_s), n))
    def estimate(n: int) -> float:
        return _estimate_replays_s(service, requests[:n], num_systems, loads, rounds)

    while n > keep and estimate(n) > options.budget_s:
        n -= 1
    if n < len(requests):
        bench.log(f"budget: {options.budget_s:g} s for the replays; keeping the first {n} of {len(requests)} requests "
                  "(--budget-s)")
        bench.requests, bench.prompts = requests[:n], bench.prompts[:n]


def run_benchmark(options: BenchOptions, log: Log | None = None) -> BenchResult:
    """Replay the window on every system at every load; return rows and metadata (see module
    docstring). Raises BenchInputError for bad options before any model is built. Deterministic
    mode is set for the run (``options.deterministic``) and put back as it was afterwards."""
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(options.deterministic, warn_only=True)
    try:
        return _run_benchmark(options, log or Log())
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def _run_benchmark(options: BenchOptions, log: Log) -> BenchResult:
    plan = _resolve(options)
    trace, requests, window = _load_requests(options, plan, log)
    device = plan.device
    log(f"kernels: {'deterministic (torch.use_deterministic_algorithms; slower steps, for output checks)' if options.deterministic else 'as users run them (no deterministic mode)'}; "
        f"KV cache: {options.cache}" + (" (transformers' static cache; aqua: one per prompt, in its context; the "
                                         "decode step compiled on a GPU)" if options.cache == "static" else ""))

    # The model and the prompts.
    t_build = time.perf_counter()
    model = build_model(plan.model, device, options.seed)
    if options.attn != "sdpa":
        use_grouped_attention(model)
    per_token = kv_bytes_per_token(model)
    if device.type == "cuda":
        log(f"device: {torch.cuda.get_device_name(device)} "
            f"({torch.cuda.get_device_properties(device).total_memory / GiB:.1f} GiB), "
            f"{torch.cuda.device_count()} GPU(s); torch {torch.__version__}")
        if use_decode_friendly_attention():
            log("attention: cuDNN attention off for every system (it builds a graph per new sequence length "
                "per thread, i.e. at every decode step of a request served in its own thread; see "
                "aqua_alloc/hf/attention.py)")
    else:
        log(f"device: CPU (no CUDA GPU); torch {torch.__version__}")
    log(f"model {plan.model}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
        f"{model.dtype}, weights {_fmt_bytes(weights_bytes(model))}, KV {per_token / 1024:g} KiB per token; "
        f"built in {time.perf_counter() - t_build:.1f} s; attention {options.attn} for every system"
        + (" (transformers' sdpa except a one-token step over a static cache: each KV head read once)"
           if options.attn != "sdpa" else ""))
    if plan.model_is_default and device.type == "cpu":
        log(f"model {plan.model}: the default on CPU, where llama-1b takes seconds per request (--model to choose)")
    generator = torch.Generator().manual_seed(options.seed)
    prompts = [torch.randint(1, model.config.vocab_size, (1, r.prompt_tokens), generator=generator).to(device)
               for r in requests]
    mean_context = sum(r.prompt_tokens + r.output_tokens for r in requests) / len(requests)
    log(f"kv budget {_fmt_bytes(plan.kv_budget)}: room for {plan.kv_budget / (mean_context * per_token):.1f} "
        f"contexts of the mean request ({mean_context:.0f} tokens)"
        + ("" if device.type == "cuda" else "; on CPU nothing is capped (fcfs and threads) or parked (aqua)"))
    largest = max(r.prompt_tokens + r.output_tokens for r in requests) * per_token
    if largest > plan.kv_budget and device.type == "cuda":  # the caps apply on CUDA only
        log(f"WARNING: the largest request holds {_fmt_bytes(largest)} of KV, more than --kv-budget: fcfs and "
            "threads will run out of memory on it; aqua systems spill it off the GPU")
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = options.name or f"bench_serve-{trace.name}-{_device_name(device)}"
    bench = _Bench(options, log, model, device, requests, prompts, plan.kv_budget, out_dir, stem)

    # Warm-up, memory cap, calibration and references; then the budget.
    t_cal = time.perf_counter()
    model.generate(**_generate_kwargs(bench.warmup_prompt, WARMUP_NEW_TOKENS, _TokenClock(threading.Event()),
                                      options.cache, model.config))
    static_warmup = _warm_static_buckets(bench) if options.cache == "static" else None
    cap = _measure_memory_cap(bench) if device.type == "cuda" else None
    first = min(len(requests), max(options.min_requests, options.check))  # the sample comes from the first ones
    check = sorted(random.Random(options.seed).sample(range(first), min(options.check, first)))
    bench.check_ids = set(check)
    mismatches: list[str] = []
    service, references, solo_runs = _calibrate(bench, check, mismatches)
    bench.service = service
    reference_steps = _reference_steps(bench, max(check, key=lambda i: requests[i].prompt_tokens))
    log(f"calibration took {time.perf_counter() - t_cal:.1f} s")
    skipped = {s: _unavailable(s, device, model, requests, plan.kv_budget, options.cache) for s in plan.systems}
    for s, reason in skipped.items():
        if reason:
            log(f"{s.value}: skipped: {reason}")
    num_runnable = sum(not reason for reason in skipped.values())
    rounds = options.rounds
    _fit_budget(bench, service, num_runnable, plan.loads, keep=max(options.min_requests, check[-1] + 1),
                rounds=rounds)
    requests = bench.requests
    mean_service = service.mean_service_s(requests)
    work = sum(service.service_s(r.prompt_tokens, r.output_tokens) for r in requests)
    estimate = _estimate_replays_s(service, requests, num_runnable, plan.loads, rounds)
    log(f"{len(requests)} requests, mean service time alone {mean_service:.3f} s: fcfs sustains "
        f"{1 / mean_service:.3f} req/s; {num_runnable} systems x {len(plan.loads)} loads"
        + (f" x {rounds} rounds (each load: every system in turn, {rounds} times)" if rounds > 1 else "")
        + f", about {estimate:.0f} s")

    # The replays.
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    scales = {}
    t_replays = time.perf_counter()
    replay_limit = options.budget_s * OVERRUN if options.budget_s is not None else math.inf
    for load in plan.loads:
        scales[load] = scale = time_scale(requests, mean_service, load)
        arrivals = replay_arrivals(requests, scale)
        deadline = arrivals[-1] + max(30.0, 2 * work)
        log(f"load {load:g}: time scale {scale:.4f} (replay s per trace s), {load / mean_service:.3f} req/s, "
            f"arrivals over {arrivals[-1]:.1f} s; deadline {deadline:.0f} s after start")
        for round_no in range(1, rounds + 1):
            if rounds > 1:
                log(f"load {load:g}: round {round_no}/{rounds}")
            for system in plan.systems:
                label = _run_label(system, load, round_no, rounds)
                remaining = replay_limit - (time.perf_counter() - t_replays)
                if not skipped[system] and remaining < arrivals[-1] + mean_service:
                    skipped[system] = f"out of time: too little left of {OVERRUN:g} x --budget-s for a replay"
                    log(f"{label}: skipped: {skipped[system]}")
                if skipped[system]:
                    rows.append(_make_row(system.value, load, round_no, skipped=skipped[system],
                                          requests=len(requests), time_scale=scale))
                    continue
                row, records = _run_one(bench, system, load, arrivals, min(deadline, remaining), scale, references,
                                        mismatches, round_no=round_no)
                rows.append(row)
                if records:
                    runs.append({"system": system.value, "load": load, "round": round_no,
                                 "records": [dataclasses.asdict(r) | {"output_ids": None} for r in records]})
                _write_rows(out_dir / f"{stem}.json", rows)  # after every run: a killed run keeps its results
    _add_ratios(rows)

    meta = {
        "benchmark": "bench_serve",
        "trace": {"name": trace.name, "path": str(trace.path), "note": trace.note,
                  "attribution": ATTRIBUTION.get(trace.path.suffix.lower())},
        "window": window | {"trace_rows": [requests[0].id, requests[-1].id], "num_requests": len(requests)},
        "seed": options.seed,
        "model": {"name": plan.model, "dtype": str(model.dtype), "weights_bytes": weights_bytes(model),
                  "kv_bytes_per_token": per_token},
        "device": {"type": device.type, "name": _device_name(device),
                   "count": torch.cuda.device_count() if device.type == "cuda" else 0},
        "versions": {"torch": torch.__version__, "transformers": _transformers_version(),
                     "aqua_alloc": aqua_alloc.__version__, "python": sys.version.split()[0]},
        "kv_budget_bytes": plan.kv_budget,
        "cudnn_attention": cudnn_attention_enabled(),
        "fcfs_threads_memory_cap": cap,
        "scheduler": {"policy": "fair", "slice_steps": options.slice_steps, "switch_overhead": options.switch_overhead,
                      "newcomer_order": options.newcomer_order,
                      "chunk_tokens": options.chunk_tokens},
        "calibration": {"solo_runs": solo_runs, "service_model": dataclasses.asdict(service),
                        "mean_service_s": mean_service},
        "kernels": {"deterministic": options.deterministic, "cache": options.cache},
        "static_warmup_s": static_warmup,
        "reference_steps": reference_steps,
        "time_scales": {f"{load:g}": round(s, 6) for load, s in scales.items()},
        "loads": plan.loads,
        "systems": [s.value for s in plan.systems],
        "rounds": rounds,
        "requests": [dataclasses.asdict(r) for r in requests],
        "mismatches": mismatches,
        "elapsed_s": round(time.perf_counter() - log.t0, 1),
    }
    if rounds > 1:
        meta["paired_ratios"] = _paired_ratios(rows)  # per round, paired with fcfs of that round; medians
    result = BenchResult(rows=rows, meta=meta, runs=runs, mismatches=mismatches)
    result.files["results"] = str(out_dir / f"{stem}.json")
    return result


def _transformers_version() -> str:
    import transformers  # noqa: PLC0415

    return transformers.__version__


@contextmanager
def _model_attention(model: torch.nn.Module, attention: str) -> Iterator[None]:
    """``model`` runs ``attention`` inside; its attention before, after."""
    before = model.config._attn_implementation
    if before != attention:
        model.set_attn_implementation(attention)
    try:
        yield
    finally:
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)


def _attention_of(bench: _Bench, system: System) -> ContextManager[None]:
    """The model's attention while ``system`` runs: --attn, except hf-cb's transformers' sdpa
    (continuous batching takes only its own implementations; aqua_sdpa is sdpa anyway outside
    a one-token step over a static cache, which continuous batching never runs)."""
    return _model_attention(bench.model, "sdpa" if system is System.HF_CB else bench.options.attn)


def _run_one(bench: _Bench, system: System, load: float, arrivals: list[float], deadline: float, scale: float,
             references: dict[int, list[int]], mismatches: list[str], round_no: int = 1
             ) -> tuple[dict[str, Any], list[RequestRecord] | None]:
    """One system at one load (in round ``round_no``): replay, summarize, check outputs, log one
    line. Returns the row and the per-request records (None when the run itself failed)."""
    log = bench.log
    run = RUNS[system](bench, load, arrivals, round_no)
    t_start = time.perf_counter()
    extra: dict[str, Any] = {}
    failed_row = None
    with _ctrl_c_sets(bench.interrupt), _attention_of(bench, system):  # until every thread is joined (module doc)
        try:
            run.setup()
            if bench.options.verbose:
                log(f"{run.label}: set up; replaying {len(arrivals)} requests")
            try:
                _replay(run, arrivals, deadline)
            finally:
                extra = run.teardown()
        except Exception as exc:  # noqa: BLE001 - a system that breaks is reported; the others still run
            log(f"{run.label}: FAILED: {_describe(exc)}")
            log(traceback.format_exc().rstrip())
            if bench.cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
                if aqua_alloc.is_enabled():
                    try:
                        aqua_alloc.disable()
                    except Exception as e:  # noqa: BLE001 - report and go on
                        log(f"{run.label}: aqua_alloc.disable() failed too: {_describe(e)}")
            failed_row = _make_row(system.value, load, round_no, skipped=f"run failed: {_describe(exc)}",
                                   requests=len(arrivals), time_scale=scale)
    if bench.interrupt.is_set():
        log(f"{run.label}: interrupted; its threads stopped and joined")
        raise KeyboardInterrupt
    if failed_row is not None:
        return failed_row, None
    service = bench.service  # a request's first step alone: its prefill (or a decode step, if longer)
    first_steps = (None if service is None else
                   [max(service.ttft_s(r.prompt_tokens), service.decode_s_per_token) for r in bench.requests])
    summary = summarize_run(run.records, first_step_s=first_steps)
    checked, identical = 0, True
    for i, want in references.items():
        got = run.records[i].output_ids
        if got is None:
            continue  # it failed in this run: nothing to compare
        checked += 1
        if got != want:
            identical = False
            where = f"{system.value} load {load:g} request r{bench.requests[i].id}"
            if bench.options.rounds > 1:
                where += f" round {round_no}"
            first_diff = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            log(f"{run.label}: OUTPUT MISMATCH for r{bench.requests[i].id} at token {first_diff} "
                f"({len(got)} vs {len(want)} tokens)")
            if system in EXACT_SYSTEMS:
                mismatches.append(where)
    row = _make_row(system.value, load, round_no, **summary, **extra,
                    outputs_checked=checked, outputs_identical=identical if checked else None,
                    exact_expected=system in EXACT_SYSTEMS, time_scale=scale,
                    offered_rps=(len(arrivals) - 1) / arrivals[-1] if arrivals[-1] > 0 else None,
                    duration_s=time.perf_counter() - t_start, notes=run.notes or None)
    ttft = "-" if row["ttft_mean_s"] is None else f"{row['ttft_mean_s']:.3f}/{row['ttft_p99_s']:.3f} s"
    tok_s = "-" if row["output_tok_s"] is None else f"{row['output_tok_s']:.1f}"
    peaks = ", ".join(f"{t} {_fmt_bytes(b)}" for t, b in row["peak_bytes"].items() if b or t == "gpu0") or "-"
    log(f"{run.label}: {row['completed']}/{row['requests']} done, {row['failed']} failed ({row['oom']} OOM); "
        f"ttft mean/p99 {ttft}; {tok_s} tok/s; peak {peaks}; "
        f"outputs {'identical' if identical else 'DIFFER'} on {checked} checked; {row['duration_s']:.1f} s")
    if row["first_token_gap_max_s"] is not None:
        over = row["first_token_gaps_over_step"]
        log(f"  first tokens: the caller's at most {row['first_token_gap_max_s'] * 1e3:.1f} ms after the system's own log"
            + (f"; {over} more than one step (its prefill alone) after it" if over is not None else ""))
    if "num_moves" in row:
        log(f"  aqua_alloc: {row['num_moves']} moves, {_fmt_bytes(row['bytes_moved'])} moved; "
            f"{row['num_slices']} slices of {row['mean_slice_steps']} steps on average, {row['parked_s']:.2f} s parked "
            f"in all; last switch in of each prompt {1e3 * (row['mean_last_switch_s'] or 0):.1f} ms on average")
    if row.get("scheduler_cpu_us_per_step") is not None:
        log(f"  scheduler: {row['scheduler_cpu_us_per_step']:.1f} us of CPU per decode step in its hooks (parks and "
            f"resumes included), against {1e3 * service.decode_s_per_token:.2f} ms per step of a request alone"
            if service is not None else f"  scheduler: {row['scheduler_cpu_us_per_step']:.1f} us of CPU per step")
    errors = [r for r in run.records if r.error]
    for record in errors[:3]:
        log(f"  r{record.request_id}: {record.error}")
    if len(errors) > 3:
        log(f"  ... and {len(errors) - 3} more failures")
    for note in run.notes:
        log(f"  note: {note}")
    return row, run.records


# --------------------------------------------------------------------------------------
# Output: table, files, plots


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a fixed-width table (times in s, TPOT in ms, peaks in MiB). Rows of
    more than one round get a round column, and the table is followed by each system's ratios
    to fcfs per round (same load, same round) and their median over the rounds."""

    def num(value: Any, fmt: str) -> str:  # fmt starts with the width
        width = int(fmt.split(".")[0].rstrip(","))
        return "-".rjust(width) if value is None else format(value, fmt)

    # gpu0 first, then peers, then host; tiers no row used are left out (aqua reports every GPU).
    tiers = sorted({t for row in rows for t, b in row["peak_bytes"].items() if b or t == "gpu0"},
                   key=lambda t: (t != "gpu0", t == "host", t))
    multi = any(row.get("round", 1) > 1 for row in rows)

    def where(row: dict[str, Any]) -> str:  # system, load (and round)
        return f"{row['system']:<10} {row['load']:>5g}" + (f" {row.get('round', 1):>5}" if multi else "")

    head = (f"{'system':<10} {'load':>5}" + (f" {'round':>5}" if multi else "")
            + f" {'done':>7} {'oom':>4} {'ttft mean':>9} {'p50':>7} {'p90':>7} {'p99':>7} "
            f"{'tpot ms':>7} {'e2e s':>7} {'tok/s':>7} " + "".join(f"{'peak ' + t:>11} " for t in tiers)
            + f"{'ttft x':>7} {'p99 x':>7} {'tok/s x':>7}  same")
    lines = [head, "-" * len(head)]
    for row in rows:
        if row["skipped"]:
            lines.append(f"{where(row)}  skipped: {row['skipped']}")
            continue
        same = {True: "yes", False: "NO", None: "-"}[row["outputs_identical"]]
        if row["outputs_identical"] is False and not row.get("exact_expected", True):
            same = "no*"
        lines.append(
            f"{where(row)} {str(row['completed']) + '/' + str(row['requests']):>7} "
            f"{row['oom']:>4} {num(row['ttft_mean_s'], '9.3f')} {num(row['ttft_p50_s'], '7.3f')} "
            f"{num(row['ttft_p90_s'], '7.3f')} {num(row['ttft_p99_s'], '7.3f')} "
            f"{num(row['tpot_mean_s'] and row['tpot_mean_s'] * 1e3, '7.2f')} {num(row['e2e_mean_s'], '7.3f')} "
            f"{num(row['output_tok_s'], '7.1f')} "
            + "".join(f"{num(row['peak_bytes'].get(t) and row['peak_bytes'][t] / MiB, '11,.0f')} " for t in tiers)
            + f"{num(row['ttft_mean_ratio_to_fcfs'], '7.2f')} {num(row['ttft_p99_ratio_to_fcfs'], '7.2f')} "
            f"{num(row['output_tok_s_ratio_to_fcfs'], '7.2f')}  {same}")
    lines.append("ttft/e2e in s from arrival, over completed requests; peaks in MiB (aqua: context bytes per tier "
                 "from aqua_alloc.stats(); others: torch.cuda.max_memory_allocated, weights included); "
                 "x = ratio to fcfs at the same load" + (" and round" if multi else ""))
    if any(row.get("exact_expected") is False and row["outputs_identical"] is False for row in rows):
        lines.append("no* = outputs differ from the solo runs where exactness is not expected "
                     "(hf-cb batches requests: other kernels, other rounding)")
    if multi:
        lines.extend(_format_paired(_paired_ratios(rows)))
    return "\n".join(lines)


def _format_paired(paired: Sequence[dict[str, Any]]) -> list[str]:
    """Lines of :func:`_paired_ratios`: per (system, load), each round's ratio, then the median."""
    lines = ["", "paired ratios to fcfs (same load, same round): round 1, round 2, ... -> median over rounds"]
    if not paired:
        return lines + ["  none: no system other than fcfs has a run paired with an fcfs run"]
    for entry in paired:
        parts = []
        for _, _, short in RATIOS:
            values = " ".join("-" if r[short] is None else f"{r[short]:.2f}" for r in entry["rounds"])
            median = entry[f"median_{short}"]
            title = {"ttft_mean_ratio": "ttft x", "ttft_p99_ratio": "p99 x", "output_tok_s_ratio": "tok/s x"}[short]
            parts.append(f"{title} {values} -> {'-' if median is None else f'{median:.2f}'}")
        lines.append(f"{entry['system']:<10} {entry['load']:>5g}  " + "; ".join(parts))
    return lines


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


def write_results(result: BenchResult, out_dir: str | Path, log: Log, plots: bool = True) -> dict[str, str]:
    """Write the rows (JSON list), the metadata, the log so far and the plots; return what -> path."""
    out_dir = Path(out_dir)
    results = Path(result.files["results"])
    stem = results.stem
    _write_rows(results, result.rows)
    meta_path = out_dir / f"{stem}.meta.json"
    meta_path.write_text(json.dumps(result.meta | {"runs": result.runs}, indent=1, default=str) + "\n",
                         encoding="utf-8")
    result.files["meta"] = str(meta_path)
    traces = [row["trace_file"] for row in result.rows if row.get("trace_file")]
    if traces:
        result.files["traces"] = ", ".join(traces)
    if plots:
        try:
            _plot_ttft(result.runs, out_dir / f"{stem}-ttft.png", result.files)
            _plot_traces(result.rows, result.files)
        except ImportError as e:
            log(f"plots skipped: matplotlib is not installed ({e}); pip install 'aqua_alloc[plot]'")
    result.files["log"] = str(out_dir / f"{stem}.log")
    for what, path in result.files.items():
        log(f"wrote {what}: {path}")
    log.write(Path(result.files["log"]))  # written again by callers that log more
    return result.files


def _plot_ttft(runs: Sequence[dict[str, Any]], path: Path, files: dict[str, str]) -> None:
    """CDF of TTFT (completed requests) per system, one panel per load; a system's rounds are
    pooled (one curve over the requests of all its runs at that load)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    if not runs:
        return
    loads = sorted({run["load"] for run in runs})
    fig = Figure(figsize=(4.5 * len(loads), 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(loads), squeeze=False)[0]
    multi = any(run.get("round", 1) > 1 for run in runs)
    for ax, load in zip(axes, loads):
        pooled: dict[str, list[float]] = {}  # system -> TTFTs of all its rounds, in the runs' order
        for run in (run for run in runs if run["load"] == load):
            pooled.setdefault(run["system"], []).extend(
                r["first_token_s"] - r["arrival_s"] for r in run["records"]
                if r["first_token_s"] is not None and r["error"] is None)
        for system, values in pooled.items():
            if not values:
                continue
            values.sort()
            ys = [(k + 1) / len(values) for k in range(len(values))]
            ax.step(values, ys, where="post", label=system)
        ax.set_xscale("log")
        ax.set_xlabel("time to first token (s, log)")
        ax.set_title(f"load {load:g}" + (" (rounds pooled)" if multi else ""))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("share of completed requests")
    axes[-1].legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    files["ttft_plot"] = str(path)


def _plot_traces(rows: Sequence[dict[str, Any]], files: dict[str, str]) -> None:
    """Bytes per tier over time of each aqua system's run at the highest load (its last round)."""
    from aqua_alloc.obs.trace_reader import read_trace  # noqa: PLC0415
    from aqua_alloc.obs.plot import plot_trace  # noqa: PLC0415

    top: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("trace_file") and row["load"] >= top.get(row["system"], {"load": -1})["load"]:
            top[row["system"]] = row
    for system, row in top.items():
        out = Path(row["trace_file"]).with_suffix(".png")
        plot_trace(read_trace(row["trace_file"]), out)
        files[f"trace_plot {system}"] = str(out)
