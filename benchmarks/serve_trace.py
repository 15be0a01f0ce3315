"""Request traces for the serving benchmark: loading, windows, time scaling, metrics.

Pure Python (no torch): what ``benchmarks/bench_serve.py`` replays, and the numbers it reports, so that all of it is testable without a model.

- A trace is one of two formats, read as they are published, one row per request, rebased by
  :func:`load_trace` to the first row (seconds):
  - Azure LLM inference trace (Patel et al., "Splitwise", ISCA 2024; CC-BY-4.0): CSV rows
    ``TIMESTAMP,ContextTokens,GeneratedTokens`` with absolute timestamps (``conv``, ``code``);
  - Mooncake (Qin et al., "Mooncake", FAST 2025; Apache-2.0): JSON lines with ``timestamp``
    (ms from the start), ``input_length``, ``output_length`` and ``hash_ids`` (shared-prefix
    block ids, not used here) (``mooncake``: long prompts, arrivals in 3-second buckets).
- A *window* is the requests arriving in ``[start, start + duration)`` seconds of the trace,
  at most ``max_requests`` of them, arrival times rebased to the window's first request.
- The *time scale* stretches (or squeezes) the window's inter-arrival times so that the
  offered load (arrival rate times mean service time) is the one asked for:
  ``replay time = trace time * scale``.
- Metrics per run: time to first token (TTFT, from arrival), time per output token after
  the first (TPOT), end to end latency, output tokens per second. Percentiles interpolate
  linearly between the two nearest ranks (numpy's default; :func:`trace_summary.percentile`).

Errors in the inputs raise :class:`BenchInputError`, whose message names the argument.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import aqua_alloc
from aqua_alloc.obs.summary import percentile

__all__ = [
    "BenchInputError",
    "TRACE_FILES",
    "EXCERPT_NAME",
    "EXCERPT_PATH",
    "TraceRow",
    "LoadedTrace",
    "Request",
    "read_azure_csv",
    "read_mooncake_jsonl",
    "trace_search_dirs",
    "load_trace",
    "select_window",
    "clip_requests",
    "parse_loads",
    "parse_names",
    "ServiceModel",
    "fit_service_model",
    "window_rate",
    "time_scale",
    "replay_arrivals",
    "RequestRecord",
    "summarize_run",
]

# Named traces: files of /work/shared/traces (see its README for provenance and licences).
TRACE_FILES = {
    "conv": "AzureLLMInferenceTrace_conv.csv",
    "code": "AzureLLMInferenceTrace_code.csv",
    "mooncake": "conversation_trace.jsonl",
}
# Whom each format comes from: kept in the results' metadata wherever the data is reported.
ATTRIBUTION = {
    ".csv": "Azure LLM inference trace 2023 (Azure/AzurePublicDataset, CC-BY-4.0); Patel et al., Splitwise, ISCA 2024",
    ".jsonl": "Mooncake conversation trace (kvcache-ai/Mooncake, Apache-2.0); Qin et al., Mooncake, FAST 2025",
}
# The first rows of the conv trace, shipped in the package (aqua_alloc/data/README.md).
EXCERPT_NAME = "conv-excerpt"
EXCERPT_PATH = Path(aqua_alloc.__file__).resolve().parent / "data" / "azure_conv_excerpt.csv"  # shipped for the demo
_HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class BenchInputError(ValueError):
    """A bad input to the serving benchmark; the message names the argument and the value."""


# --------------------------------------------------------------------------------------
# Traces


@dataclasses.dataclass(frozen=True)
class TraceRow:
    """One request of a trace."""

    arrival_s: float        # seconds since the trace's first request
    prompt_tokens: int      # ContextTokens
    output_tokens: int      # GeneratedTokens


@dataclasses.dataclass(frozen=True)
class LoadedTrace:
    name: str               # "conv", "code", "conv-excerpt" or the file's stem
    path: Path
    rows: list[TraceRow]    # in arrival order
    is_excerpt: bool        # the packaged excerpt, standing in for the full conv trace
    note: str | None        # why the excerpt was used, if it was

    @property
    def span_s(self) -> float:
        return self.rows[-1].arrival_s if self.rows else 0.0


def _parse_timestamp(text: str) -> float:
    """``2023-11-16 18:15:46.6805900`` -> POSIX seconds (naive time read as UTC; only
    differences matter). The fraction may have any number of digits."""
    base, _, fraction = text.strip().partition(".")
    seconds = datetime.datetime.fromisoformat(base).replace(tzinfo=datetime.timezone.utc).timestamp()
    if fraction:
        if not fraction.isdigit():
            raise ValueError(f"bad fraction of a second {fraction!r}")
        seconds += int(fraction) / 10 ** len(fraction)
    return seconds


def read_azure_csv(path: str | os.PathLike[str]) -> list[TraceRow]:
    """Rows of an Azure LLM inference trace CSV, rebased to its first row.

    Raises BenchInputError naming the file and line for a missing header, a bad timestamp
    or token count, or timestamps out of order.
    """
    path = Path(path)
    rows: list[TraceRow] = []
    t0: float | None = None
    previous = -math.inf
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != _HEADER:
            raise BenchInputError(f"{path}: expected the header {','.join(_HEADER)}, got {header!r}")
        for line, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != 3:
                raise BenchInputError(f"{path}:{line}: expected 3 fields, got {len(fields)}")
            try:
                t = _parse_timestamp(fields[0])
            except ValueError as e:
                raise BenchInputError(f"{path}:{line}: bad TIMESTAMP {fields[0]!r}: {e}") from None
            try:
                prompt, output = int(fields[1]), int(fields[2])
            except ValueError:
                raise BenchInputError(f"{path}:{line}: token counts must be integers, got {fields[1:]!r}") from None
            if prompt < 1 or output < 1:
                raise BenchInputError(f"{path}:{line}: token counts must be at least 1, got {prompt}, {output}")
            if t < previous:
                raise BenchInputError(f"{path}:{line}: TIMESTAMP {fields[0]} is earlier than the row before")
            previous = t
            t0 = t if t0 is None else t0
            rows.append(TraceRow(arrival_s=t - t0, prompt_tokens=prompt, output_tokens=output))
    if not rows:
        raise BenchInputError(f"{path}: the trace has no requests")
    return rows


def read_mooncake_jsonl(path: str | os.PathLike[str]) -> list[TraceRow]:
    """Rows of a Mooncake trace (JSON lines: ``timestamp`` in ms from the start,
    ``input_length``, ``output_length``; other keys ignored), rebased to its first row.

    Raises BenchInputError naming the file and line for a line that is not a JSON object, a
    missing or bad field, or timestamps out of order.
    """
    path = Path(path)
    rows: list[TraceRow] = []
    t0: float | None = None
    previous = -math.inf
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as e:
                raise BenchInputError(f"{path}:{line}: not a JSON line: {e}") from None
            if not isinstance(entry, dict):
                raise BenchInputError(f"{path}:{line}: expected a JSON object, got {type(entry).__name__}")
            timestamp_ms = entry.get("timestamp")
            if (isinstance(timestamp_ms, bool) or not isinstance(timestamp_ms, (int, float))
                    or not math.isfinite(timestamp_ms) or timestamp_ms < 0):
                raise BenchInputError(f"{path}:{line}: timestamp must be a number of ms >= 0, got {timestamp_ms!r}")
            lengths = [entry.get(key) for key in ("input_length", "output_length")]
            for key, value in zip(("input_length", "output_length"), lengths):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise BenchInputError(f"{path}:{line}: {key} must be a whole number of tokens >= 1, got {value!r}")
            t = timestamp_ms / 1000.0
            if t < previous:
                raise BenchInputError(f"{path}:{line}: timestamp {timestamp_ms} is earlier than the line before")
            previous = t
            t0 = t if t0 is None else t0
            rows.append(TraceRow(arrival_s=t - t0, prompt_tokens=lengths[0], output_tokens=lengths[1]))
    if not rows:
        raise BenchInputError(f"{path}: the trace has no requests")
    return rows


def read_trace_file(path: Path) -> list[TraceRow]:
    """Rows of a trace file, by its suffix: ``.csv`` (Azure) or ``.jsonl`` (Mooncake)."""
    return read_mooncake_jsonl(path) if path.suffix.lower() == ".jsonl" else read_azure_csv(path)


def trace_search_dirs(traces_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where named traces are looked for: ``traces_dir`` if given; else ``$AQUA_TRACES_DIR``,
    then ``shared/traces`` inside and next to the repository."""
    if traces_dir is not None:
        return [Path(traces_dir)]
    dirs = []
    if os.environ.get("AQUA_TRACES_DIR"):
        dirs.append(Path(os.environ["AQUA_TRACES_DIR"]))
    repo = Path(__file__).resolve().parents[1]
    dirs += [repo / "shared" / "traces", repo.parent / "shared" / "traces"]
    return dirs


def load_trace(spec: str, traces_dir: str | os.PathLike[str] | None = None) -> LoadedTrace:
    """Load ``spec``: ``conv``, ``code``, ``mooncake``, ``conv-excerpt`` (packaged), or the path
    of a ``.csv`` (Azure format) or ``.jsonl`` (Mooncake format) file.

    When the full conv trace is not found, the packaged excerpt (its first rows) stands in
    and ``note`` says so; :func:`select_window` then refuses windows the excerpt does not
    cover. Raises BenchInputError naming ``--trace`` for an unknown name or missing file.
    """
    if spec == EXCERPT_NAME:
        return LoadedTrace(EXCERPT_NAME, EXCERPT_PATH, read_azure_csv(EXCERPT_PATH), True, None)
    if spec in TRACE_FILES:
        dirs = trace_search_dirs(traces_dir)
        for d in dirs:
            path = d / TRACE_FILES[spec]
            if path.is_file():
                return LoadedTrace(spec, path, read_trace_file(path), False, None)
        looked = ", ".join(str(d) for d in dirs)
        if spec == "conv" and EXCERPT_PATH.is_file():
            rows = read_azure_csv(EXCERPT_PATH)
            note = (f"{TRACE_FILES[spec]} not found (looked in {looked}); using the packaged excerpt "
                    f"(its first {len(rows)} rows, {rows[-1].arrival_s:.0f} s)")
            return LoadedTrace(EXCERPT_NAME, EXCERPT_PATH, rows, True, note)
        raise BenchInputError(f"--trace={spec!r}: {TRACE_FILES[spec]} not found (looked in {looked}); "
                              "pass --traces-dir DIR or the file's path")
    path = Path(spec)
    if path.suffix.lower() in ATTRIBUTION and path.is_file():
        return LoadedTrace(path.stem, path, read_trace_file(path), False, None)
    known = ", ".join([*TRACE_FILES, EXCERPT_NAME])
    raise BenchInputError(f"--trace={spec!r}: not a known trace ({known}) nor an existing .csv (Azure) or "
                          ".jsonl (Mooncake) file")


@dataclasses.dataclass(frozen=True)
class Request:
    """One request to replay."""

    id: int                   # row number in the trace (0-based), stable across clipping
    arrival_s: float          # seconds since the window's first request (trace time, unscaled)
    prompt_tokens: int        # after clipping
    output_tokens: int        # after clipping
    trace_prompt_tokens: int  # as in the trace
    trace_output_tokens: int


def select_window(trace: LoadedTrace, start_s: float, duration_s: float, max_requests: int | None) -> list[Request]:
    """The requests arriving in ``[start_s, start_s + duration_s)``, at most ``max_requests``
    (the first ones), with arrivals rebased to the first selected request."""
    if not (math.isfinite(start_s) and start_s >= 0):
        raise BenchInputError(f"--window-start={start_s}: must be a finite number of seconds >= 0")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise BenchInputError(f"--window-s={duration_s}: must be a positive number of seconds")
    if max_requests is not None and max_requests < 1:
        raise BenchInputError(f"--max-requests={max_requests}: must be at least 1")
    end_s = start_s + duration_s
    chosen = [(i, row) for i, row in enumerate(trace.rows) if start_s <= row.arrival_s < end_s]
    if max_requests is not None:
        chosen = chosen[:max_requests]
    if not chosen:
        raise BenchInputError(
            f"--window-start={start_s:g} --window-s={duration_s:g}: no request of trace {trace.name!r} arrives "
            f"in [{start_s:g}, {end_s:g}) s (the trace spans 0 to {trace.span_s:.1f} s)")
    truncated = end_s > trace.span_s and (max_requests is None or len(chosen) < max_requests)
    if trace.is_excerpt and truncated and trace.note is not None:
        raise BenchInputError(
            f"--window-start={start_s:g} --window-s={duration_s:g}: the window runs past the end of the packaged "
            f"excerpt ({trace.span_s:.1f} s) that stands in for the full trace; {trace.note}")
    t0 = chosen[0][1].arrival_s
    return [Request(id=i, arrival_s=row.arrival_s - t0, prompt_tokens=row.prompt_tokens,
                    output_tokens=row.output_tokens, trace_prompt_tokens=row.prompt_tokens,
                    trace_output_tokens=row.output_tokens) for i, row in chosen]


def clip_requests(requests: Sequence[Request], max_prompt: int | None, max_output: int | None
                  ) -> tuple[list[Request], int, int]:
    """Requests with prompt and output lengths clipped; also how many prompts and outputs were clipped."""
    for name, value in (("--max-prompt", max_prompt), ("--max-output", max_output)):
        if value is not None and value < 1:
            raise BenchInputError(f"{name}={value}: must be at least 1 token")
    out, num_prompts, num_outputs = [], 0, 0
    for r in requests:
        prompt = r.prompt_tokens if max_prompt is None else min(r.prompt_tokens, max_prompt)
        output = r.output_tokens if max_output is None else min(r.output_tokens, max_output)
        num_prompts += prompt < r.prompt_tokens
        num_outputs += output < r.output_tokens
        out.append(dataclasses.replace(r, prompt_tokens=prompt, output_tokens=output))
    return out, num_prompts, num_outputs


# --------------------------------------------------------------------------------------
# Arguments


def parse_loads(text: str) -> list[float]:
    """``"0.5,0.8,0.95"`` -> [0.5, 0.8, 0.95]: offered loads, each in (0, 2]."""
    loads = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            load = float(part)
        except ValueError:
            raise BenchInputError(f"--loads={text!r}: {part!r} is not a number (example: 0.5,0.8,0.95)") from None
        if not (math.isfinite(load) and 0 < load <= 2):
            raise BenchInputError(f"--loads={text!r}: each load must be in (0, 2] (a share of what fcfs sustains), "
                                  f"got {part}")
        loads.append(load)
    if len(set(loads)) != len(loads):
        raise BenchInputError(f"--loads={text!r}: a load is given twice")
    return loads


def parse_names(text: str, known: Iterable[str], argument: str) -> list[str]:
    """A comma-separated list of names, each one of ``known``, in the order given."""
    known = list(known)
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise BenchInputError(f"{argument}={text!r}: empty (choose from {', '.join(known)})")
    for name in names:
        if name not in known:
            raise BenchInputError(f"{argument}={text!r}: unknown {name!r} (choose from {', '.join(known)})")
    if len(set(names)) != len(names):
        raise BenchInputError(f"{argument}={text!r}: a name is given twice")
    return names


# --------------------------------------------------------------------------------------
# Service time and time scaling


@dataclasses.dataclass(frozen=True)
class ServiceModel:
    """Seconds one request takes alone: ``first_token_s + prefill_s_per_token * prompt`` to its
    first token, then ``decode_s_per_token`` per further token. Fitted on solo runs."""

    first_token_s: float        # fixed part of the time to first token (s)
    prefill_s_per_token: float  # time to first token per prompt token (s)
    decode_s_per_token: float   # time per output token after the first (s)

    def ttft_s(self, prompt_tokens: int) -> float:
        return self.first_token_s + self.prefill_s_per_token * prompt_tokens

    def service_s(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.ttft_s(prompt_tokens) + self.decode_s_per_token * max(output_tokens - 1, 0)

    def mean_service_s(self, requests: Sequence[Request]) -> float:
        return sum(self.service_s(r.prompt_tokens, r.output_tokens) for r in requests) / len(requests)


def fit_service_model(samples: Sequence[tuple[int, int, float, float]]) -> ServiceModel:
    """Fit from solo runs ``(prompt_tokens, output_tokens, ttft_s, total_s)``.

    Decode: total decode time over total decode tokens. Time to first token: a least-squares
    line in the prompt length when the prompts differ (slope and intercept kept >= 0), else
    their mean.
    """
    if not samples:
        raise ValueError("fit_service_model: no solo runs to fit")
    decode_tokens = sum(max(o - 1, 0) for _, o, _, _ in samples)
    decode_s = sum(total - ttft for _, o, ttft, total in samples if o > 1)
    decode = decode_s / decode_tokens if decode_tokens else 0.0
    xs = [float(p) for p, _, _, _ in samples]
    ys = [ttft for _, _, ttft, _ in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var_x = sum((x - mean_x) ** 2 for x in xs)
    if var_x == 0:
        return ServiceModel(first_token_s=mean_y, prefill_s_per_token=0.0, decode_s_per_token=decode)
    slope = max(sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var_x, 0.0)
    intercept = mean_y - slope * mean_x
    if intercept < 0:  # the line through the origin that fits best
        intercept, slope = 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return ServiceModel(first_token_s=intercept, prefill_s_per_token=slope, decode_s_per_token=decode)


def window_rate(requests: Sequence[Request]) -> float:
    """Arrival rate of the window (requests per trace second): (n - 1) over the first-to-last span."""
    if len(requests) < 2:
        raise BenchInputError(f"the window holds {len(requests)} request; at least 2 are needed for an arrival "
                              "rate (widen --window-s or raise --max-requests)")
    span = requests[-1].arrival_s - requests[0].arrival_s
    if span <= 0:
        raise BenchInputError("every request of the window arrives at the same instant; widen --window-s")
    return (len(requests) - 1) / span


def time_scale(requests: Sequence[Request], mean_service_s: float, load: float) -> float:
    """Factor on trace time that makes the offered load ``load``: the replayed arrival rate is
    ``load / mean_service_s`` (``1 / mean_service_s`` is the rate one-at-a-time service sustains)."""
    if not (mean_service_s > 0 and math.isfinite(mean_service_s)):
        raise ValueError(f"mean service time must be positive, got {mean_service_s}")
    if not load > 0:
        raise ValueError(f"load must be positive, got {load}")
    return window_rate(requests) * mean_service_s / load


def replay_arrivals(requests: Sequence[Request], scale: float) -> list[float]:
    """Arrival of each request in replay seconds after the run starts."""
    return [r.arrival_s * scale for r in requests]


# --------------------------------------------------------------------------------------
# Metrics


@dataclasses.dataclass
class RequestRecord:
    """What happened to one request in one run. Times are seconds since the run started."""

    request_id: int
    arrival_s: float                   # when it was due (its replayed arrival time)
    expected_tokens: int
    submitted_s: float | None = None   # when the driver actually handed it over
    first_token_s: float | None = None  # when the caller had the first token (a streamer's first put)
    system_first_token_s: float | None = None  # when the system itself logged it (aqua: the
                                       # scheduler's first_token; hf-cb: transformers' timestamp)
    finish_s: float | None = None
    num_tokens: int = 0
    error: str | None = None           # None: no error
    oom: bool = False                  # the error was running out of memory
    output_ids: list[int] | None = None  # generated ids (kept for the correctness sample)

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_s is not None and self.num_tokens == self.expected_tokens


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pct(values: Sequence[float], p: float) -> float | None:
    return percentile(sorted(values), p) if values else None


def summarize_run(records: Sequence[RequestRecord],
                  first_step_s: Sequence[float] | None = None) -> dict[str, float | int | None]:
    """Row fields of one run. Latencies cover completed requests only; ``output_tok_s`` is the
    tokens of completed requests over the time from the first arrival to the last finish.
    Where the system logs first tokens itself, ``first_token_gap_max_s`` is the most the
    caller's first token came after it, and ``first_token_gaps_over_step`` how many came more
    than one step after it: ``first_step_s[i]``, the first step of ``records[i]`` alone (its
    prefill). A scheduler logs a token when the step's kernels are launched; the caller has
    it once the GPU has run them, up to that step later."""
    done = [(i, r) for i, r in enumerate(records) if r.completed]
    gaps = [(i, r.first_token_s - r.system_first_token_s) for i, r in done
            if r.first_token_s is not None and r.system_first_token_s is not None]
    done = [r for _, r in done]
    ttft = [r.first_token_s - r.arrival_s for r in done if r.first_token_s is not None]
    tpot = [(r.finish_s - r.first_token_s) / (r.num_tokens - 1)
            for r in done if r.first_token_s is not None and r.num_tokens > 1]
    e2e = [r.finish_s - r.arrival_s for r in done]
    span = (max(r.finish_s for r in done) - min(r.arrival_s for r in records)) if done else 0.0
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "oom": sum(r.oom for r in records),
        "ttft_mean_s": _mean(ttft),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p90_s": _pct(ttft, 90),
        "ttft_p99_s": _pct(ttft, 99),
        "tpot_mean_s": _mean(tpot),
        "e2e_mean_s": _mean(e2e),
        "output_tok_s": sum(r.num_tokens for r in done) / span if span > 0 else None,
        "max_submit_lag_s": max((r.submitted_s - r.arrival_s for r in records if r.submitted_s is not None),
                                default=None),
        "first_token_gap_max_s": max((g for _, g in gaps), default=None),
        "first_token_gaps_over_step": (sum(g > first_step_s[i] for i, g in gaps)
                                       if gaps and first_step_s is not None else None),
    }
