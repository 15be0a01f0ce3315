"""``python -m aqua_alloc demo``: a minute of a real trace, served one request at a time
(``fcfs``) and time-shared by aqua_alloc's fair scheduler (``aqua``).

Requests: the first ``Setup.max_requests`` requests of the first minute of the packaged
Azure conv trace excerpt (aqua_alloc/data/azure_conv_excerpt.csv: Azure LLM inference trace
2023, CC-BY-4.0; Patel et al., Splitwise, ISCA 2024). Prompt and output lengths come from
the trace, clipped to the setup's caps. Prompt token ids are random (seeded). The model is a
Llama with random weights built from its config (no download), with no end-of-sequence
token, so every request generates exactly its output length.

Load 0.8: one request of the mean size (mean clipped prompt and output) is generated alone,
once to warm up and three times timed. The best of the three is the service time S. One-at-
a-time serving then sustains 1/S requests per second, so arrival times are scaled to make
the window's arrival rate 0.8/S.

Systems (the same arrivals for both; greedy decoding):
- fcfs: plain ``model.generate``, one call at a time in arrival order (in the main thread).
  Each request runs alone, so its output ids are the reference for the same request under aqua.
- aqua: a thread per request calling ``aqua_alloc.Scheduler().generate`` (policy ``fair``).
  On CUDA aqua_alloc is enabled with a small GPU budget for contexts (KV caches), so that
  parked contexts move to host memory. On CPU only the scheduling part runs.

TTFT runs from a request's arrival to its first token being on the host (the first call of
a stopping criterion). Tokens/s: tokens of completed requests over the span from the first
arrival to the last finish.

Ctrl-C: the main thread stops the workers (a stopping criterion ends each call at its next
decode step; ``Scheduler.shutdown`` fails the prompts still waiting), joins every one of
them, and :func:`run` returns 130. Workers are not daemons: none is left running torch at exit.
:func:`run` is meant for the main thread of the ``demo`` command: it sets the process's
SIGINT handler, and on CPU the number of torch threads.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, StoppingCriteria, StoppingCriteriaList

import aqua_alloc
from aqua_alloc.hf.scheduler import run_threads
from aqua_alloc.obs import trace
from aqua_alloc.obs.summary import percentile

__all__ = ["DemoError", "run"]

EXCERPT = Path(__file__).resolve().parent / "data" / "azure_conv_excerpt.csv"
WINDOW_S = 60.0   # trace seconds replayed: the first minute
LOAD = 0.8        # offered load: share of the arrival rate one-at-a-time serving sustains
PAD_ID = 0        # never drawn as a prompt token
SEED = 0          # weights and prompt token ids


class DemoError(ValueError):
    """A bad argument or an unusable output folder; the message names it (one line)."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the demo runs on one kind of device."""

    config: LlamaConfig
    dtype: torch.dtype
    max_requests: int          # first requests of the window kept
    max_prompt: int            # tokens; longer prompts are clipped
    max_output: int            # tokens; longer outputs are clipped
    local_budget: str | None   # aqua_alloc's GPU bytes for contexts; None: aqua_alloc stays off (CPU)


def _setup(cuda: bool) -> Setup:
    if cuda:
        # Llama-3.2-1B's shape: 16 layers, 2048 hidden, 8 KV heads of 64 (32 KiB of bf16 KV per token).
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                             max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                             rope_parameters=rope, bos_token_id=None, eos_token_id=None)
        # 64 MiB of contexts: about four of the mean request (~500 tokens, 16 MiB) and the
        # largest (1,024 + 64 tokens, 34 MiB) alone; the other live contexts park on host.
        return Setup(config, torch.bfloat16, max_requests=12, max_prompt=1024, max_output=64, local_budget="64MiB")
    # 2 layers, 64 hidden (512 B of fp32 KV per token); a wide init so greedy tokens vary.
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         initializer_range=0.5, bos_token_id=None, eos_token_id=None)
    return Setup(config, torch.float32, max_requests=12, max_prompt=64, max_output=32, local_budget=None)


@dataclasses.dataclass
class Request:
    id: int               # row of the excerpt (1: the first after the header)
    arrival_s: float      # seconds after the first request: trace time, then replay time once scaled
    prompt_tokens: int
    output_tokens: int


@dataclasses.dataclass
class Record:
    """One request in one run; times in seconds since the run started."""

    first_token_s: float | None = None
    finish_s: float | None = None
    output_ids: list[int] | None = None
    error: str | None = None


def _seconds(stamp: str) -> float:
    """'2023-11-16 18:15:46.6805900' -> POSIX seconds (the fraction has 7 digits: read apart)."""
    whole, _, fraction = stamp.strip().partition(".")
    start = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc)
    return start.timestamp() + float("0." + (fraction or "0"))


def read_requests(setup: Setup) -> list[Request]:
    """The first ``max_requests`` requests of the excerpt's first WINDOW_S seconds, clipped."""
    requests: list[Request] = []
    with open(EXCERPT, newline="", encoding="utf-8") as f:
        for row_id, row in enumerate(csv.DictReader(f), start=1):
            t = _seconds(row["TIMESTAMP"])
            t0 = requests[0].arrival_s if requests else t
            if len(requests) == setup.max_requests or t - t0 >= WINDOW_S:
                break
            requests.append(Request(row_id, t, min(int(row["ContextTokens"]), setup.max_prompt),
                                    min(int(row["GeneratedTokens"]), setup.max_output)))
    t0 = requests[0].arrival_s
    for r in requests:
        r.arrival_s -= t0
    return requests


class _Clock(StoppingCriteria):
    """Called by generate after every decode step: notes when the first token is on the host,
    and ends the call (at this step) once ``stop`` is set."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.first_token_t: float | None = None   # time.perf_counter() seconds

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.first_token_t is None:
            input_ids[:, -1].tolist()   # wait for the token itself, not only its launch
            self.first_token_t = time.perf_counter()
        return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate(call: Callable[..., torch.Tensor], prompt: torch.Tensor, new_tokens: int, clock: _Clock,
              **extra: Any) -> list[int]:
    """Greedy, exactly ``new_tokens`` tokens: ``call(**generate's kwargs)``; returns the new ids."""
    out = call(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
               min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID,
               stopping_criteria=StoppingCriteriaList([clock]), **extra)
    return out[0, prompt.shape[-1]:].tolist()


def _serve(call: Callable[..., torch.Tensor], prompt: torch.Tensor, request: Request, record: Record,
           stop: threading.Event, t0: float, **extra: Any) -> None:
    """Serve one request in the calling thread; a failure is recorded, not raised."""
    clock = _Clock(stop)
    try:
        record.output_ids = _generate(call, prompt, request.output_tokens, clock, **extra)
        if len(record.output_ids) < request.output_tokens:
            record.error = "stopped"
    except Exception as e:  # noqa: BLE001 - one request's failure is a result (SchedulerShutdown on Ctrl-C)
        record.error = f"{type(e).__name__}: {e}"
    record.finish_s = time.perf_counter() - t0
    if clock.first_token_t is not None:
        record.first_token_s = clock.first_token_t - t0


def run_fcfs(model: Any, requests: list[Request], prompts: list[torch.Tensor]) -> list[Record]:
    """One call at a time, in arrival order, in this thread (Ctrl-C raises here)."""
    records = [Record() for _ in requests]
    t0 = time.perf_counter()
    for r, prompt, record in zip(requests, prompts, records):
        time.sleep(max(r.arrival_s - (time.perf_counter() - t0), 0.0))   # idle until it arrives
        _serve(model.generate, prompt, r, record, threading.Event(), t0)
    return records


def run_aqua(model: Any, requests: list[Request], prompts: list[torch.Tensor], scheduler: Any) -> list[Record]:
    """A thread per request through ``scheduler``. Ctrl-C (in the main thread) stops every
    worker, waits for all of them, then raises KeyboardInterrupt here."""
    records = [Record() for _ in requests]
    stop = threading.Event()
    t0 = time.perf_counter()

    def work(i: int) -> None:
        if stop.wait(max(requests[i].arrival_s - (time.perf_counter() - t0), 0.0)):
            return   # stopped before it arrived
        _serve(lambda **kw: scheduler.generate(model, **kw), prompts[i], requests[i], records[i], stop, t0,
               tag=f"demo-r{requests[i].id}")

    def stop_serving() -> None:
        stop.set()                       # running prompts end at their next step
        scheduler.shutdown(wait=False)   # waiting prompts fail at once

    workers = [threading.Thread(target=work, args=(i,), name=f"demo-aqua-r{r.id}") for i, r in enumerate(requests)]
    if run_threads(workers, stop_serving):   # Ctrl-C: every worker stopped and joined
        raise KeyboardInterrupt
    return records


def summarize(system: str, requests: list[Request], records: list[Record]) -> dict[str, Any]:
    """A row of the table: TTFT over completed requests (s), their tokens per second."""
    done = [(r, rec) for r, rec in zip(requests, records) if rec.error is None and rec.output_ids is not None]
    ttft = sorted(rec.first_token_s - r.arrival_s for r, rec in done)
    span = max((rec.finish_s for _, rec in done), default=0.0)   # from the first arrival, at 0 s
    return {"system": system, "requests": len(requests), "completed": len(done),
            "ttft_mean_s": round(sum(ttft) / len(ttft), 6) if ttft else None,
            "ttft_p99_s": round(percentile(ttft, 99), 6) if ttft else None,
            "output_tok_s": round(sum(len(rec.output_ids) for _, rec in done) / span, 3) if span > 0 else None}


def _say(text: str = "") -> None:
    print(text, flush=True)


def _out_dir(out_dir: str | None) -> Path | None:
    """``--out``: None, or the folder, created if missing (it was asked for)."""
    if out_dir is None:
        return None
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise DemoError(f"--out {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"--out {path}: cannot create it: {e.strerror or e}") from None
    return path


def run(device: str | None = None, out_dir: str | None = None) -> int:
    """Run the demo and print its table. 0 if every request's aqua output equals its fcfs
    output, 1 if not, 130 on Ctrl-C. Raises DemoError for a bad argument."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: CUDA is not available on this machine")
    out = _out_dir(out_dir)
    if aqua_alloc.is_enabled():
        raise DemoError("aqua_alloc is already enabled (AQUA_ALLOC=1?); the demo enables it for its aqua run only")
    try:
        return _run(torch.device("cuda", 0) if device == "cuda" else torch.device("cpu"), out)
    except KeyboardInterrupt:
        print("\ninterrupted: every worker stopped", file=sys.stderr, flush=True)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            # Nothing left to stop: a Ctrl-C during the interpreter's exit ends the process at
            # once (status 130 in a shell) instead of a KeyboardInterrupt in an exit handler.
            signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(device: torch.device, out: Path | None) -> int:
    """Build, calibrate, serve both ways, print; the exit status (see :func:`run`)."""
    cuda = device.type == "cuda"
    setup = _setup(cuda)
    requests = read_requests(setup)
    _say(f"aqua_alloc demo: the first {len(requests)} requests of a minute of the Azure conv trace "
         f"({EXCERPT.name}; CC-BY-4.0, Patel et al., Splitwise, ISCA 2024)")
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)   # cuDNN attention: a graph per step per thread (hf/attention.py)
        _say(f"device: {torch.cuda.get_device_name(device)}; aqua_alloc keeps {setup.local_budget} of contexts "
             "on the GPU, the rest parks on host")
    else:
        _say("No CUDA GPU here: running the scheduling part only, on a tiny model (parking contexts needs a CUDA GPU).")
        # One intra-op thread: a 64-wide model gains nothing from more, and on a busy machine
        # OpenMP threads that wait for a core made steps up to 40x slower (measured on 2 cores).
        torch.set_num_threads(1)
    torch.manual_seed(SEED)
    with torch.device(device):   # weights made (and initialised) on the device
        model = AutoModelForCausalLM.from_config(setup.config, dtype=setup.dtype).to(device).eval()
    model.generation_config.eos_token_id = None   # random weights: lengths come from the trace
    generator = torch.Generator().manual_seed(SEED)
    prompts = [torch.randint(1, setup.config.vocab_size, (1, r.prompt_tokens), generator=generator).to(device)
               for r in requests]
    _say(f"model: random-weight Llama, {setup.config.num_hidden_layers} layers, {setup.config.hidden_size} hidden, "
         f"{setup.dtype} on {device.type}; prompts <= {setup.max_prompt} tokens, outputs <= {setup.max_output}")

    service_s, probe = _service_time(model, requests, setup, generator)
    span_s = requests[-1].arrival_s                         # trace seconds from first to last arrival
    scale = (len(requests) - 1) / span_s * service_s / LOAD  # replay seconds per trace second
    for r in requests:
        r.arrival_s *= scale
    _say(f"load {LOAD}: arrivals at {scale:.3f}x trace time, {len(requests)} requests over "
         f"{requests[-1].arrival_s:.1f} s")

    _say("serving: fcfs (one generate at a time, arrival order)")
    fcfs = run_fcfs(model, requests, prompts)
    aqua, trace_file = _aqua_phase(model, requests, prompts, setup, probe, out)

    rows = [summarize("fcfs", requests, fcfs), summarize("aqua", requests, aqua)]
    _print_table(rows)
    differ = [r.id for r, x, y in zip(requests, fcfs, aqua) if x.error or y.error or x.output_ids != y.output_ids]
    _say(f"outputs identical: {'no (requests ' + ', '.join(map(str, differ)) + ')' if differ else 'yes'}")
    if out is not None:
        result = {"device": device.type, "load": LOAD, "service_s": round(service_s, 6), "time_scale": round(scale, 6),
                  "outputs_identical": not differ, "rows": rows,
                  "requests": [dataclasses.asdict(r) | {"arrival_s": round(r.arrival_s, 6)} for r in requests]}
        (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        _say(f"wrote {out / 'demo.json'} and {trace_file}")
        _say(f"read the trace with: python -m aqua_alloc trace summarize {trace_file}")
    return 1 if differ else 0


def _service_time(model: Any, requests: list[Request], setup: Setup, generator: torch.Generator
                  ) -> tuple[float, torch.Tensor]:
    """Seconds one request of the mean size takes alone: best of three after a warm-up call.
    Also returns its prompt (for later warm-ups)."""
    mean_prompt = round(sum(r.prompt_tokens for r in requests) / len(requests))
    mean_output = round(sum(r.output_tokens for r in requests) / len(requests))
    probe = torch.randint(1, setup.config.vocab_size, (1, mean_prompt), generator=generator).to(model.device)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        _generate(model.generate, probe, mean_output, _Clock(threading.Event()))
        times.append(time.perf_counter() - t)
    service_s = min(times[1:])
    _say(f"service time alone: {service_s:.3f} s (a mean request: {mean_prompt} prompt + {mean_output} output tokens)")
    return service_s, probe


def _aqua_phase(model: Any, requests: list[Request], prompts: list[torch.Tensor], setup: Setup,
                probe: torch.Tensor, out: Path | None) -> tuple[list[Record], Path | None]:
    """aqua_alloc on (CUDA), a warm-up through the scheduler, the aqua run, its trace; then off."""
    if setup.local_budget is not None:
        aqua_alloc.enable(local_budget=setup.local_budget, lend=0)   # lend 0: no peer GPU tier, host only
    scheduler = aqua_alloc.Scheduler(device=model.device, policy="fair")
    try:
        _generate(lambda **kw: scheduler.generate(model, tag="demo-warmup", **kw), probe, 4,
                  _Clock(threading.Event()))   # first context and pool: outside the measurement
        _say("serving: aqua (a thread per request, aqua_alloc's fair scheduler)")
        records = run_aqua(model, requests, prompts, scheduler)
        stats = scheduler.stats()
        moved = aqua_alloc.stats() if aqua_alloc.is_enabled() else None
        trace_file = trace.dump(out / "demo-trace.json") if out is not None else None   # before disable(): core events
    finally:
        scheduler.shutdown(wait=False)
        if aqua_alloc.is_enabled():
            try:
                aqua_alloc.disable()
            except Exception as e:  # noqa: BLE001 - say it, then let the run end
                print(f"aqua_alloc.disable() failed: {e}", file=sys.stderr, flush=True)
    parked_s = sum(p.parked_ns for p in stats.prompts) / 1e9   # contexts parked, summed over prompts
    _say(f"aqua: {len(stats.slices)} slices (turns on the device)" + (
        f"; contexts parked {parked_s:.1f} s in all, {moved['num_moves']} moves, "
        f"{moved['bytes_moved'] / 2**20:,.0f} MiB moved" if moved else ""))
    return records, trace_file


def _print_table(rows: list[dict[str, Any]]) -> None:
    _say()
    _say(f"{'system':<8}{'requests':>9}{'completed':>11}{'mean TTFT (s)':>15}{'p99 TTFT (s)':>14}{'tokens/s':>10}")
    for row in rows:
        cells = [row["ttft_mean_s"], row["ttft_p99_s"], row["output_tok_s"]]
        mean, p99, tok = (f"{c:.3f}" if c is not None else "-" for c in cells)
        _say(f"{row['system']:<8}{row['requests']:>9}{row['completed']:>11}{mean:>15}{p99:>14}{tok:>10}")
    fcfs, aqua = rows
    # Every ratio is aqua's figure over fcfs's, as in the README and bench_serve.
    if fcfs["ttft_mean_s"] and aqua["ttft_mean_s"]:
        _say(f"aqua/fcfs mean TTFT: {aqua['ttft_mean_s'] / fcfs['ttft_mean_s']:.3g} (lower is better)")
    if fcfs["output_tok_s"] and aqua["output_tok_s"]:
        _say(f"aqua/fcfs tokens/s: {aqua['output_tok_s'] / fcfs['output_tok_s']:.2f} (higher is better)")
