"""A scheduled workload that tests/test_interrupts.py interrupts: worker threads and the main
thread call :meth:`aqua_alloc.Scheduler.generate` on a tiny model (CPU), the way a program
serving several prompts from threads would. Prints a line at each phase (stdout, flushed):

    workers started          the workers' prompts are in flight; the main thread's arrives next
    main step N              the main thread's prompt at its decode step N (1, 10, 20, ...)
    main done                its generate returned (a third as long); it waits for the workers
    all done                 every prompt finished
    {"running": ...}         after a Ctrl-C: the scheduler's state, every prompt's, threads left

Ctrl-C: a KeyboardInterrupt from the main thread's ``generate`` (the scheduler raises it at a
step boundary, its prompt gone), or one seen while it waits for the workers, stops the
workers (``Scheduler.shutdown``: each fails at its next step) and joins every one; then
"interrupted: every worker stopped" on stderr and exit status 130. While the workers run, the
main thread never waits in a bare ``Thread.join``: a KeyboardInterrupt landing there in
CPython 3.11 marks the running thread stopped, so it is never joined and the interpreter
exits under it ("terminate called without an active exception").
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from aqua_alloc.hf.scheduler import Scheduler, SchedulerShutdown
from tiny_models import GREEDY, build, llama_config, prompt_ids

NUM_WORKERS = 3
NEW_TOKENS = 300   # per prompt: long enough for a signal to land while they run


class _PrintSteps(StoppingCriteria):
    """Prints "main step N" at steps 1, 10, 20, ...; never stops generation."""

    def __init__(self) -> None:
        self.num_steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.num_steps += 1
        if self.num_steps == 1 or self.num_steps % 10 == 0:
            print(f"main step {self.num_steps}", flush=True)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _join(workers: list[threading.Thread], sched: Scheduler, stop_now: bool) -> bool:
    """Join every worker, SIGINT only setting a flag meanwhile; with ``stop_now`` or once one
    comes, stop them first. Returns whether a SIGINT came."""
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1))
    try:
        for w in workers:
            while w.is_alive() and not interrupted and not stop_now:
                w.join(timeout=0.05)   # s: how soon a Ctrl-C is seen
        if interrupted or stop_now:
            sched.shutdown(wait=False)   # every worker's prompt fails at its next step
        for w in workers:
            w.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    return bool(interrupted)


def main() -> int:
    torch.set_num_threads(1)
    model = build(llama_config())
    sched = Scheduler(slice_steps=2, use_context_cache=True, chunk_tokens=16)
    errors: list[str] = []

    def serve(i: int) -> None:
        try:
            sched.generate(model, prompt_ids(8 + i, seed=i), tag=f"w{i}", max_new_tokens=NEW_TOKENS, **GREEDY)
        except SchedulerShutdown:
            pass   # stopped on Ctrl-C
        except Exception as e:  # noqa: BLE001 - reported below, and the status says so
            errors.append(f"w{i}: {type(e).__name__}: {e}")

    workers = [threading.Thread(target=serve, args=(i,), name=f"w{i}") for i in range(NUM_WORKERS)]
    for w in workers:
        w.start()
    try:
        print("workers started", flush=True)
        sched.generate(model, prompt_ids(12, seed=9), tag="main", max_new_tokens=NEW_TOKENS // 3,
                       stopping_criteria=StoppingCriteriaList([_PrintSteps()]), **GREEDY)
        print("main done", flush=True)
        interrupted = _join(workers, sched, stop_now=False)
    except KeyboardInterrupt:   # from generate, or between two of these lines
        interrupted = True
        _join(workers, sched, stop_now=True)
    if interrupted:
        stats = sched.stats()
        print(json.dumps({"running": stats.running, "waiting": stats.waiting,
                          "states": {p.tag: p.state.value for p in stats.prompts},
                          "threads": [t.name for t in threading.enumerate() if t is not threading.main_thread()]}),
              flush=True)
        print("interrupted: every worker stopped", file=sys.stderr, flush=True)
        return 130
    for error in errors:
        print(error, file=sys.stderr)
    print("all done", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # a Ctrl-C during exit ends the process at once
    sys.exit(status)
