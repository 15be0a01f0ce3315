"""PyTorch's cuDNN attention costs a graph build per decode step in every new thread.

On Hopper GPUs PyTorch (2.11 here) runs ``scaled_dot_product_attention`` through cuDNN by
preference. cuDNN attention builds an execution graph for each new shape (batch, heads, query
length, key length, ...) and caches it *per thread* (``thread_local`` caches in
aten/src/ATen/native/cudnn/MHA.cpp, because cuDNN execution plans are not thread-safe). Each
decode step attends over one more key than the step before, so each step is a new shape and
builds a graph. A second identical ``generate`` on the same thread finds its graphs cached; a
``generate`` in a thread of its own (one thread per request: how a scheduler's callers run)
never does.

Measured on the H200 machine, a decode step of a 1B-parameter model after a 1000-token
prompt: 52 to 60 ms on a thread's first generate, 16 ms on a repeat
(benchmarks/results/probe_threads-cudnn-on-1gpu-h200.log); 16 to 21 ms every time with
cuDNN attention off, flash and memory-efficient attention building nothing
(probe_threads-and-step_time-cudnn-off-1gpu-h200.log). Through the scheduler, four
prompts sharing the GPU took 62 ms per token with cuDNN attention
(probe_step_time-cudnn-on-1gpu-h200.log) and 27 ms without.

The switch is process-wide (``torch.backends.cuda.enable_cudnn_sdp``): aqua_alloc never flips
it behind a user's back. The scheduler warns once; the benchmarks turn it off for every system
they compare and say so.
"""

from __future__ import annotations

import threading
import warnings

import torch

_warned = threading.Event()

ADVICE = ("call torch.backends.cuda.enable_cudnn_sdp(False) (flash or memory-efficient attention "
          "instead) before serving")


def cudnn_attention_enabled() -> bool:
    """Whether ``scaled_dot_product_attention`` may pick cuDNN attention in this process."""
    return bool(torch.backends.cuda.cudnn_sdp_enabled())


def use_decode_friendly_attention() -> bool:
    """Turn cuDNN attention off for the process (see the module docstring). Returns True if
    it was on."""
    was_on = cudnn_attention_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    return was_on


def warn_if_cudnn_attention(device: torch.device | None) -> bool:
    """Warn once per process when prompts are scheduled on a CUDA ``device`` while cuDNN
    attention is on. Returns True if it warned now."""
    if device is None or device.type != "cuda" or not cudnn_attention_enabled() or _warned.is_set():
        return False
    _warned.set()
    warnings.warn(
        "aqua_alloc: cuDNN attention is on. It builds an execution graph for every new sequence length "
        "and caches it per thread, so every decode step of a prompt served in its own thread builds one "
        f"(about 3x slower steps measured on an H200); {ADVICE}.",
        RuntimeWarning,
        stacklevel=3,
    )
    return True
