"""Tiny randomly initialised causal LMs of real architectures (no download), and test helpers.

Weights are drawn with a large init range so greedy decoding produces varied tokens (a small
range makes random models repeat one token, which would hide ordering bugs).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig, StoppingCriteria

VOCAB = 256
_COMMON = dict(initializer_range=0.5, bos_token_id=None, eos_token_id=None)


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **_COMMON)


def mistral_config(sliding_window: int | None = 16) -> MistralConfig:
    return MistralConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                         sliding_window=sliding_window, **_COMMON)


def gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=512, **_COMMON)


CONFIGS: dict[str, Callable[[], Any]] = {"llama": llama_config, "mistral": mistral_config, "gpt2": gpt2_config}


def build(config: Any, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def prompt_ids(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


GREEDY = dict(do_sample=False, pad_token_id=0)


class AtStep(StoppingCriteria):
    """Calls ``action()`` at the given step(s) of the prompt it is passed to; never stops it."""

    def __init__(self, steps: int | set[int], action: Callable[[], None]) -> None:
        self.steps = {steps} if isinstance(steps, int) else set(steps)
        self.action = action
        self.num_calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.num_calls += 1
        if self.num_calls in self.steps:
            self.action()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class Gate:
    """Holds a prompt at a step until released: ``criterion`` blocks there; ``reached`` is set."""

    def __init__(self, step: int) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()
        self.criterion = AtStep(step, self._block)

    def _block(self) -> None:
        self.reached.set()
        if not self.opened.wait(timeout=120):
            raise RuntimeError("gate never opened")

    def open(self) -> None:
        self.opened.set()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (a synchronisation helper, not a timing assertion)."""
    deadline = time.monotonic() + 120
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.001)


class Caller:
    """Runs ``fn`` in a thread; keeps its result or exception."""

    def __init__(self, fn: Callable[[], Any], name: str = "caller") -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc

    def join(self) -> "Caller":
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "generate call hung"
        return self
