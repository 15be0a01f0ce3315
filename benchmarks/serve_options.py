"""What the serving benchmark is asked to do, and every check of it that needs no torch.

bench_serve.py checks its arguments with :func:`check_arguments` before it imports the
harness (benchmarks/serve_harness.py), which imports torch and transformers: seconds, so a
bad argument would otherwise be refused seconds late. The harness resolves the same options
with :func:`check_options` once the device is known.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Sequence

from aqua_alloc.memory.config import parse_size
from serve_trace import BenchInputError, load_trace, select_window, window_rate

__all__ = ["System", "EXACT_SYSTEMS", "ModelDefaults", "MODEL_DEFAULTS", "DEFAULT_MODEL", "BenchOptions",
           "CheckedOptions", "check_options", "check_arguments"]


class System(str, enum.Enum):
    FCFS = "fcfs"
    THREADS = "threads"
    AQUA_HOST = "aqua-host"
    AQUA_PEER = "aqua-peer"
    HF_CB = "hf-cb"


# Systems whose outputs must equal the same request run alone, token for token.
EXACT_SYSTEMS = frozenset({System.FCFS, System.THREADS, System.AQUA_HOST, System.AQUA_PEER})


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """A model's defaults for the arguments that depend on it (its shape is in the harness's MODELS)."""

    kv_budget: str               # default --kv-budget: room for about six contexts of a mean clipped conv
                                 #   request (~660 tokens) and for the largest (2,176 tokens) alone
    max_prompt: int              # default --max-prompt (tokens)
    max_output: int              # default --max-output (tokens)


MODEL_DEFAULTS: dict[str, ModelDefaults] = {
    "llama-8b": ModelDefaults(kv_budget="512MiB", max_prompt=2048, max_output=128),
    "llama-1b": ModelDefaults(kv_budget="128MiB", max_prompt=2048, max_output=128),
    "tiny": ModelDefaults(kv_budget="4MiB", max_prompt=64, max_output=16),
}
# --model when none is given: a real shape on a GPU; on CPU the tiny model (llama-1b's 1.24 B
# parameters in fp32 take seconds per short request there).
DEFAULT_MODEL = {"cuda": "llama-1b", "cpu": "tiny"}


@dataclasses.dataclass
class BenchOptions:
    """What to replay and how. Sizes in bytes unless a string like '256MiB'."""

    trace: str = "conv"                      # conv, code, mooncake, conv-excerpt or a .csv / .jsonl path
    traces_dir: str | None = None            # where conv/code are (default: shared/traces near the repo)
    window_start_s: float = 0.0              # window start, seconds of trace time
    window_s: float = 60.0                   # window duration, seconds of trace time
    max_requests: int | None = 40            # first requests of the window kept (before the budget trims)
    max_prompt: int | None = None            # clip prompts to this many tokens (default: per model)
    max_output: int | None = None            # clip outputs to this many tokens (default: per model)
    model: str | None = None                 # key of MODEL_DEFAULTS (default: DEFAULT_MODEL of the device)
    device: str | None = None                # "cuda" / "cpu"; default cuda when available
    kv_budget: str | int | None = None       # GPU bytes for contexts (default: per model)
    systems: Sequence[str] = tuple(s.value for s in System)
    loads: Sequence[float] = (0.5, 0.8, 0.95)  # offered loads, shares of what fcfs sustains
    seed: int = 0                            # prompt token ids, weights, correctness sample
    check: int = 3                           # requests run alone first: calibration and references
    slice_steps: int = 5                     # aqua scheduler: decode steps per slice
    switch_overhead: float | None = None     # aqua scheduler: longer slices where a switch costs more than this share
    newcomer_order: str = "shortest"         # aqua scheduler: which waiting prefill first: shortest or arrival
    chunk_tokens: int = 256                  # aqua scheduler: tokens per KV chunk of a context
    budget_s: float | None = 300.0           # replay phase target (s): fewer requests if the estimate is over
    min_requests: int = 8                    # the budget never trims below this
    rounds: int = 1                          # each load: every system in turn, this many times (paired rounds)
    cache: str = "dynamic"                   # KV cache of generate calls: "dynamic" or "static" (compiled step)
    attn: str = "aqua_sdpa"                  # every system's attention: "aqua_sdpa" or transformers' "sdpa"
    deterministic: bool = False              # torch.use_deterministic_algorithms: for output checks, not timing
    out_dir: str | Path = "benchmarks/results"
    name: str | None = None                  # file name stem (default bench_serve-<trace>-<device name>)
    plots: bool = True
    verbose: bool = False                    # one log line per request


@dataclasses.dataclass(frozen=True)
class CheckedOptions:
    """Options checked, with the defaults that depend on the model and the device filled in."""

    model: str
    model_is_default: bool       # chosen by the device, not by --model
    systems: list[System]
    loads: list[float]
    kv_budget: int               # bytes
    max_prompt: int | None
    max_output: int | None


def check_options(options: BenchOptions, device_type: str) -> CheckedOptions:
    """Check ``options`` for a run on ``device_type`` ("cuda" or "cpu"); raise BenchInputError
    naming the bad one. Needs no torch."""
    if options.device not in (None, "cuda", "cpu"):
        raise BenchInputError(f"--device={options.device!r}: expected cuda or cpu")
    model = options.model if options.model is not None else DEFAULT_MODEL[device_type]
    defaults = MODEL_DEFAULTS.get(model)
    if defaults is None:
        raise BenchInputError(f"--model={model!r}: choose from {', '.join(MODEL_DEFAULTS)}")
    try:
        systems = [System(s) for s in options.systems]
    except ValueError as e:
        raise BenchInputError(f"--systems: {e} (choose from {', '.join(s.value for s in System)})") from None
    if not systems:
        raise BenchInputError("--systems: empty")
    if not options.loads:
        raise BenchInputError("--loads: empty")
    kv_budget_text = options.kv_budget if options.kv_budget is not None else defaults.kv_budget
    try:
        kv_budget = int(parse_size(kv_budget_text, "--kv-budget", allow_percent=False))
    except ValueError as e:
        raise BenchInputError(str(e)) from None
    if kv_budget <= 0:
        raise BenchInputError(f"--kv-budget={kv_budget_text!r}: must be more than 0 bytes")
    if options.check < 1:
        raise BenchInputError(f"--check={options.check}: at least one request must run alone (calibration)")
    if options.slice_steps < 1:
        raise BenchInputError(f"--slice-steps={options.slice_steps}: must be at least 1")
    if options.switch_overhead is not None and not 0 < options.switch_overhead < 1:
        raise BenchInputError(f"--switch-overhead={options.switch_overhead}: a share of a slice between 0 and 1, "
                              "such as 0.1 (leave it out for fixed slices)")
    if options.budget_s is not None and options.budget_s <= 0:
        raise BenchInputError(f"--budget-s={options.budget_s}: must be positive")
    if options.newcomer_order not in ("arrival", "shortest"):
        raise BenchInputError(f"--newcomer-order={options.newcomer_order!r}: expected arrival or shortest")
    if options.cache not in ("dynamic", "static"):
        raise BenchInputError(f"--cache={options.cache!r}: expected dynamic or static")
    if options.attn not in ("aqua_sdpa", "sdpa"):
        raise BenchInputError(f"--attn={options.attn!r}: expected aqua_sdpa or sdpa")
    if not isinstance(options.deterministic, bool):
        raise BenchInputError(f"--deterministic={options.deterministic!r}: expected True or False")
    if isinstance(options.rounds, bool) or not isinstance(options.rounds, int) or options.rounds < 1:
        raise BenchInputError(f"--rounds={options.rounds!r}: must be a whole number, at least 1")
    return CheckedOptions(model=model, model_is_default=options.model is None, systems=systems,
                          loads=list(options.loads), kv_budget=kv_budget,
                          max_prompt=options.max_prompt if options.max_prompt is not None else defaults.max_prompt,
                          max_output=options.max_output if options.max_output is not None else defaults.max_output)


def check_arguments(options: BenchOptions) -> None:
    """Everything about ``options`` that can be checked before torch is imported: the options
    themselves, the trace and its window. Whether CUDA is there is left to the harness."""
    check_options(options, options.device or "cpu")
    trace = load_trace(options.trace, options.traces_dir)
    window_rate(select_window(trace, options.window_start_s, options.window_s, options.max_requests))
