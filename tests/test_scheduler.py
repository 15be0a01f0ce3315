"""The fair time-sharing scheduler on CPU: scheduling only, tiny random models of real shapes.

What can fail here: exact token ids (every scheduled output equals the same call run alone),
exact slice orders (the schedule is made deterministic by holding the first prompt at a gate
while the others queue), exact counts. No test measures time.
"""

from __future__ import annotations

import asyncio
import contextlib
import concurrent.futures
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from transformers import DynamicCache, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from aqua_alloc.hf import kv_cache, scheduler as scheduler_module
from aqua_alloc.obs.events import EventKind, drain_python_events
from aqua_alloc.obs.trace_reader import read_trace
from aqua_alloc.hf.scheduler import (
    Policy,
    PromptCancelled,
    PromptState,
    Scheduler,
    SchedulerShutdown,
)
from aqua_alloc.hf.generate_hook import cache_keyword, returned_cache
from tiny_models import CONFIGS, GREEDY, AtStep, Caller, Gate, build, prompt_ids, wait_until

POLICIES = ["fair", "rr", "fcfs"]


@pytest.fixture(scope="module")
def models():
    return {name: build(make()) for name, make in CONFIGS.items()}


@pytest.fixture
def llama(models):
    return models["llama"]


def solo(model, ids, **kwargs):
    return model.generate(ids, **GREEDY, **kwargs)


def queue(sched: Scheduler, tag: str, fn) -> Caller:
    """Start a caller and wait until its prompt waits in the scheduler (deterministic arrivals)."""
    caller = Caller(fn, name=tag)
    wait_until(lambda: tag in sched.stats().waiting or caller.error is not None, f"{tag} queued")
    return caller


def held_backlog(sched, model, specs, gate_step=1):
    """Run specs [(tag, ids, max_new_tokens, extra kwargs)]: the first is held at ``gate_step``
    until all the others wait, so arrival order (and so the whole schedule) is deterministic."""
    gate = Gate(gate_step)
    tag0, ids0, n0, extra0 = specs[0]
    criteria = StoppingCriteriaList([gate.criterion, *extra0.pop("stopping_criteria", [])])
    first = Caller(lambda: sched.generate(model, ids0, tag=tag0, max_new_tokens=n0, stopping_criteria=criteria,
                                          **GREEDY, **extra0), name=tag0)
    gate.reached.wait(timeout=120)
    callers = {tag0: first}
    for tag, ids, n, extra in specs[1:]:
        callers[tag] = queue(sched, tag, lambda ids=ids, n=n, tag=tag, extra=extra: sched.generate(
            model, ids, tag=tag, max_new_tokens=n, **GREEDY, **extra))
    gate.open()
    return {tag: caller.join() for tag, caller in callers.items()}


def slice_order(sched):
    return [(s.tag, s.num_steps) for s in sched.stats().slices]


def assert_no_starvation(stats):
    """Between a prompt's arrival and its first slice, and between two of its slices, every
    other prompt runs at most once: with N backlogged, each runs in every N slices. A slice cut
    short (by a newcomer's first token) is not counted: its prompt got less service than a
    slice's, and the fair policy lets it make that up before the others run again."""
    slices = stats.slices
    last = {s.tag: s.index for s in slices}
    cut = {s.index for s in slices if s.num_steps < stats.slice_steps and s.index != last[s.tag]}
    for prompt in stats.prompts:
        mine = [s.index for s in slices if s.tag == prompt.tag]
        gaps = [(prompt.arrival_slice, mine[0])] + list(zip(mine, mine[1:]))
        for start, end in gaps:
            others = [s.tag for s in slices if start <= s.index < end and s.tag != prompt.tag and s.index not in cut]
            assert len(others) == len(set(others)), (prompt.tag, start, end, others)


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_concurrent_outputs_equal_solo_runs(models, arch, policy):
    model = models[arch]
    calls = [(prompt_ids(6 + 5 * i, seed=i), 9 + 4 * i) for i in range(4)]
    expected = [solo(model, ids, max_new_tokens=n) for ids, n in calls]
    sched = Scheduler(policy=policy, slice_steps=3, use_context_cache=(arch != "gpt2"), chunk_tokens=4)
    callers = [Caller(lambda ids=ids, n=n: sched.generate(model, ids, max_new_tokens=n, **GREEDY))
               for ids, n in calls]
    for caller, want in zip(callers, expected):
        caller.join()
        assert caller.error is None
        assert torch.equal(caller.result, want)
    stats = sched.stats()
    assert [p.state for p in stats.prompts] == [PromptState.FINISHED] * 4
    assert sorted(p.num_tokens for p in stats.prompts) == [9, 13, 17, 21]
    assert stats.num_steps == 9 + 13 + 17 + 21
    assert sum(s.num_steps for s in stats.slices) == stats.num_steps
    if policy == "fcfs":
        assert len(stats.slices) == 4  # run to completion: one slice each
    else:
        assert all(s.num_steps <= 3 for s in stats.slices)
        assert_no_starvation(stats)


def test_same_prompt_many_times_interleaved(llama):
    ids = prompt_ids(10, seed=7)
    expected = solo(llama, ids, max_new_tokens=15)
    sched = Scheduler(slice_steps=1, use_context_cache=True, chunk_tokens=2)
    callers = [Caller(lambda: sched.generate(llama, ids, max_new_tokens=15, **GREEDY)) for _ in range(5)]
    for caller in callers:
        assert torch.equal(caller.join().result, expected)


# --------------------------------------------------------------------------- policies, exact orders


@pytest.mark.parametrize("first_token_priority", [True, False])
@pytest.mark.parametrize("policy", POLICIES)
def test_late_short_prompt_first_token(llama, policy, first_token_priority):
    """A short prompt arriving while a long one runs gets its first token right after the long
    one's current step (fair, rr with first-token priority), after at most one slice of it
    (without); fcfs makes it wait for the whole long prompt."""
    sched = Scheduler(policy=policy, slice_steps=5, first_token_priority=first_token_priority)
    late: dict[str, Caller] = {}

    def arrive():  # called by the long prompt at its 3rd step: the short one queues then
        late["short"] = queue(sched, "short", lambda: sched.generate(
            llama, prompt_ids(4, seed=2), tag="short", max_new_tokens=4, **GREEDY))

    long_ = Caller(lambda: sched.generate(llama, prompt_ids(12, seed=1), tag="long", max_new_tokens=30,
                                          stopping_criteria=StoppingCriteriaList([AtStep(3, arrive)]), **GREEDY))
    long_.join()
    late["short"].join()
    assert long_.error is None and late["short"].error is None
    assert torch.equal(late["short"].result, solo(llama, prompt_ids(4, seed=2), max_new_tokens=4))
    stats = {p.tag: p for p in sched.stats().prompts}
    short = stats["short"]
    assert short.arrival_step == 3  # it arrived in the long prompt's 3rd step
    if policy == "fcfs":
        assert short.first_token_step == 31
        assert slice_order(sched) == [("long", 30), ("short", 4)]
    elif first_token_priority:
        # It arrived in a caller's criterion of long's step 3, before that step's boundary:
        # long yields there, and short's prefill is the next step.
        assert short.first_token_step == 4
        assert slice_order(sched) == [("long", 3), ("short", 4)] + [("long", 5)] * 5 + [("long", 2)]
    else:
        assert short.first_token_step == 6  # long's first slice (steps 1-5), then short's prefill
        assert short.first_token_step - short.arrival_step <= sched.slice_steps + 1
        assert slice_order(sched) == [("long", 5), ("short", 4)] + [("long", 5)] * 5


def test_fair_orders_by_least_service(llama):
    """Backlog: a (held), b, c queued. Slices of 2 steps; fair = least service, ties by queue order."""
    sched = Scheduler(policy="fair", slice_steps=2, first_token_priority=False)
    specs = [("a", prompt_ids(5, 1), 6, {}), ("b", prompt_ids(6, 2), 2, {}), ("c", prompt_ids(7, 3), 4, {})]
    results = held_backlog(sched, llama, specs)
    assert all(r.error is None for r in results.values())
    # b and c start at a's service (0): they run before a's second slice.
    assert slice_order(sched) == [("a", 2), ("b", 2), ("c", 2), ("a", 2), ("c", 2), ("a", 2)]
    assert_no_starvation(sched.stats())


def test_first_token_priority_in_a_backlog(llama):
    """Backlog: a (held at step 1), b, c queued. With first-token priority a yields at its next
    step, b yields to c right after its first token, then the fair order resumes."""
    orders, first_tokens = {}, {}
    for priority in (True, False):
        sched = Scheduler(policy="fair", slice_steps=3, first_token_priority=priority)
        specs = [("a", prompt_ids(5, 1), 6, {}), ("b", prompt_ids(6, 2), 2, {}), ("c", prompt_ids(7, 3), 4, {})]
        results = held_backlog(sched, llama, specs)
        assert all(r.error is None for r in results.values())
        for tag, ids, n, _ in specs:
            assert torch.equal(results[tag].result, solo(llama, ids, max_new_tokens=n))
        orders[priority] = slice_order(sched)
        first_tokens[priority] = {p.tag: p.first_token_step for p in sched.stats().prompts}
    # b and c arrive while a's caller holds it in its first step, so a yields at that step's
    # boundary; services: a 1, b 1, c 3 after the newcomers' first slices.
    assert orders[True] == [("a", 1), ("b", 1), ("c", 3), ("a", 3), ("b", 1), ("c", 1), ("a", 2)]
    assert first_tokens[True] == {"a": 1, "b": 2, "c": 3}
    assert orders[False] == [("a", 3), ("b", 2), ("c", 3), ("a", 3), ("c", 1)]
    assert first_tokens[False] == {"a": 1, "b": 4, "c": 6}


def test_newcomers_cannot_starve_a_long_prompt(llama):
    """While prompts keep arriving (one every 4 steps of the first), every prompt still runs
    at least once in every N slices, N the prompts alive; outputs stay exact."""
    for policy in ("fair", "rr"):
        sched = Scheduler(policy=policy, slice_steps=2)
        arrivals: list[Caller] = []

        def arrive():
            tag = f"new{len(arrivals)}"
            arrivals.append(queue(sched, tag, lambda tag=tag, k=len(arrivals): sched.generate(
                llama, prompt_ids(3 + k, seed=50 + k), tag=tag, max_new_tokens=5, **GREEDY)))

        launcher = AtStep({4, 8, 12, 16, 20}, arrive)
        specs = [("long", prompt_ids(8, 10), 24, {"stopping_criteria": [launcher]}),
                 ("b", prompt_ids(5, 11), 10, {}), ("c", prompt_ids(9, 12), 12, {})]
        results = held_backlog(sched, llama, specs)
        for caller in arrivals:
            caller.join()
        assert len(arrivals) == 5
        assert all(r.error is None for r in [*results.values(), *arrivals])
        assert torch.equal(results["long"].result, solo(llama, prompt_ids(8, 10), max_new_tokens=24))
        for k, caller in enumerate(arrivals):
            assert torch.equal(caller.result, solo(llama, prompt_ids(3 + k, seed=50 + k), max_new_tokens=5))
        stats = sched.stats()
        assert_no_starvation(stats)
        assert {p.tag: p.num_tokens for p in stats.prompts} == {
            "long": 24, "b": 10, "c": 12, "new0": 5, "new1": 5, "new2": 5, "new3": 5, "new4": 5}


def test_rr_round_robin_and_fcfs_arrival_order(llama):
    specs = lambda: [("a", prompt_ids(5, 1), 5, {}), ("b", prompt_ids(6, 2), 3, {}), ("c", prompt_ids(7, 3), 5, {})]
    rr = Scheduler(policy="rr", slice_steps=2, first_token_priority=False)
    held_backlog(rr, llama, specs())
    assert slice_order(rr) == [("a", 2), ("b", 2), ("c", 2), ("a", 2), ("b", 1), ("c", 2), ("a", 1), ("c", 1)]
    fcfs = Scheduler(policy="fcfs", slice_steps=2)
    held_backlog(fcfs, llama, specs())
    assert slice_order(fcfs) == [("a", 5), ("b", 3), ("c", 5)]


def test_policy_lookup_and_bad_arguments():
    assert Scheduler(policy="rr").policy is Policy.RR
    assert Scheduler(policy=Policy.FCFS).policy is Policy.FCFS
    assert scheduler_module.pick_next(Policy.FAIR, []) is None  # "not now"
    with pytest.raises(ValueError) as info:
        Scheduler(policy="bogus")
    assert str(info.value) == "policy='bogus': expected one of 'fair', 'rr', 'fcfs'"
    with pytest.raises(ValueError) as info:
        Scheduler(slice_steps=0)
    assert str(info.value) == "slice_steps=0: expected a whole number of decode steps, at least 1"
    with pytest.raises(ValueError, match=r"^slice_steps='5': expected a whole number"):
        Scheduler(slice_steps="5")
    with pytest.raises(ValueError, match=r"^chunk_tokens=0: expected a whole number of tokens, at least 1$"):
        Scheduler(chunk_tokens=0)


@pytest.mark.parametrize("call, text", [
    (lambda: Scheduler(prefetch="no"), "Scheduler(): prefetch='no': expected True or False, got str"),
    (lambda: Scheduler(first_token_priority=1), "Scheduler(): first_token_priority=1: expected True or False, got int"),
    (lambda: Scheduler(use_context_cache="auto"),
     "Scheduler(): use_context_cache='auto': expected True, False or None, got str"),
    (lambda: Scheduler().shutdown(wait="no"), "Scheduler.shutdown(): wait='no': expected True or False, got str"),
])
def test_flags_take_only_booleans(call, text):
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value) == text


@pytest.mark.parametrize("name, call", [
    ("Scheduler.generate()", lambda sched, x: sched.generate(x)),
    ("Scheduler.wrap()", lambda sched, x: sched.wrap(x)),
    ("Scheduler.unwrap()", lambda sched, x: Scheduler.unwrap(x)),
    ("Scheduler.agenerate()", lambda sched, x: asyncio.run(sched.agenerate(x))),
])
def test_something_that_is_not_a_model_is_named(name, call):
    sched = Scheduler()
    for thing, type_name in ((object(), "object"), ("gpt2", "str"),
                             (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear")):
        with pytest.raises(TypeError) as info:
            call(sched, thing)
        assert str(info.value) == (f"{name}: expected a HuggingFace model (an object with a .generate method, such "
                                   f"as AutoModelForCausalLM.from_pretrained(...)), got {type_name}")
    assert sched.stats().prompts == [], "nothing was admitted"


_TRACED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from tiny_models import CONFIGS, GREEDY, build, prompt_ids
import aqua_alloc
from aqua_alloc import Scheduler

model = build(CONFIGS["llama"]())
sched = Scheduler(slice_steps=2)
sched.generate(model, prompt_ids(5, 1), max_new_tokens=4, tag="cpu-a", **GREEDY)
assert not aqua_alloc.is_enabled()
print("served")
"""


def run_traced(tmp_path, trace_path: str) -> subprocess.CompletedProcess:
    """The scheduled CPU run above in a fresh interpreter, with AQUA_TRACE set and nothing enabled."""
    tests = str(Path(__file__).resolve().parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUA_")}
    env.update(AQUA_TRACE=trace_path, PYTHONPATH=os.pathsep.join([str(Path(tests).parent), tests]))
    return subprocess.run([sys.executable, "-c", _TRACED_RUN.format(tests=tests)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_aqua_trace_traces_a_scheduled_run_on_cpu_without_enable(tmp_path):
    path = tmp_path / "t.json"
    proc = run_traced(tmp_path, str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "served\n"
    assert f"[aqua_alloc] trace written to {path} at exit (7 events)" in proc.stderr
    events = [(e.kind, e.context) for e in read_trace(path).events]
    S, E = EventKind.SLICE_START, EventKind.SLICE_END
    assert events == [(k, "cpu-a") for k in (EventKind.PROMPT_ARRIVED, S, EventKind.FIRST_TOKEN, E, S, E,
                                              EventKind.FINISHED)]


def test_aqua_trace_to_a_missing_directory_is_refused_when_the_scheduler_is_made(tmp_path):
    proc = run_traced(tmp_path, "/no/such/dir/t.json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.rstrip().endswith(
        "aqua_alloc.memory.config.ConfigError: AQUA_TRACE='/no/such/dir/t.json': directory /no/such/dir does not "
        "exist; create it or give a file path in an existing directory")
    assert "trace written" not in proc.stderr and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- faults


def test_exception_in_one_prompt_is_raised_in_its_thread_others_go_on(llama):
    sched = Scheduler(policy="rr", slice_steps=2, use_context_cache=True)

    def boom():
        raise RuntimeError("boom at step 3")

    specs = [("ok", prompt_ids(5, 1), 12, {}),
             ("boom", prompt_ids(6, 2), 12, {"stopping_criteria": [AtStep(3, boom)]}),
             ("badkw", prompt_ids(6, 3), 12, {"not_a_generate_argument": 1}),
             ("ok2", prompt_ids(7, 4), 12, {})]
    results = held_backlog(sched, llama, specs)
    assert isinstance(results["boom"].error, RuntimeError) and "boom at step 3" in str(results["boom"].error)
    assert isinstance(results["badkw"].error, ValueError)
    assert torch.equal(results["ok"].result, solo(llama, prompt_ids(5, 1), max_new_tokens=12))
    assert torch.equal(results["ok2"].result, solo(llama, prompt_ids(7, 4), max_new_tokens=12))
    states = {p.tag: p.state for p in sched.stats().prompts}
    assert states == {"ok": PromptState.FINISHED, "boom": PromptState.FAILED,
                      "badkw": PromptState.FAILED, "ok2": PromptState.FINISHED}
    assert sched.stats().running is None and sched.stats().waiting == []
    # The scheduler keeps serving.
    assert torch.equal(sched.generate(llama, prompt_ids(5, 1), max_new_tokens=3, **GREEDY),
                       solo(llama, prompt_ids(5, 1), max_new_tokens=3))


def test_duplicate_tag_is_refused(llama):
    sched = Scheduler()
    gate = Gate(1)
    first = Caller(lambda: sched.generate(llama, prompt_ids(4, 1), tag="x", max_new_tokens=3,
                                          stopping_criteria=StoppingCriteriaList([gate.criterion]), **GREEDY))
    gate.reached.wait(timeout=120)
    with pytest.raises(ValueError, match="already in flight"):
        sched.generate(llama, prompt_ids(4, 1), tag="x", max_new_tokens=3, **GREEDY)
    gate.open()
    assert first.join().error is None


def test_cancel_waiting_and_running_prompts(llama):
    sched = Scheduler(policy="rr", slice_steps=2)
    specs = [("run", prompt_ids(5, 1), 20, {"stopping_criteria": [AtStep(5, lambda: sched.cancel("run"))]}),
             ("wait", prompt_ids(6, 2), 8, {}),
             ("ok", prompt_ids(7, 3), 8, {})]
    gate = Gate(1)
    tag0, ids0, n0, extra0 = specs[0]
    run = Caller(lambda: sched.generate(llama, ids0, tag=tag0, max_new_tokens=n0, **GREEDY,
                                        stopping_criteria=StoppingCriteriaList([gate.criterion, *extra0["stopping_criteria"]])))
    gate.reached.wait(timeout=120)
    wait = queue(sched, "wait", lambda: sched.generate(llama, specs[1][1], tag="wait", max_new_tokens=8, **GREEDY))
    ok = queue(sched, "ok", lambda: sched.generate(llama, specs[2][1], tag="ok", max_new_tokens=8, **GREEDY))
    assert sched.cancel("wait")
    wait.join()
    assert isinstance(wait.error, PromptCancelled)
    gate.open()
    run.join(), ok.join()
    assert isinstance(run.error, PromptCancelled)
    assert torch.equal(ok.result, solo(llama, specs[2][1], max_new_tokens=8))
    stats = {p.tag: p for p in sched.stats().prompts}
    # Cancelled by its caller's criterion in its 5th step: it stops at that step's boundary.
    assert stats["run"].state == PromptState.CANCELLED and stats["run"].num_steps == 5
    assert stats["wait"].state == PromptState.CANCELLED and stats["wait"].num_steps == 0
    assert not sched.cancel("run")  # gone


def test_shutdown_fails_prompts_in_flight(llama):
    sched = Scheduler(policy="fair", slice_steps=2)
    gate = Gate(2)
    running = Caller(lambda: sched.generate(llama, prompt_ids(5, 1), tag="running", max_new_tokens=20,
                                            stopping_criteria=StoppingCriteriaList([gate.criterion]), **GREEDY))
    gate.reached.wait(timeout=120)
    waiting = [queue(sched, f"w{i}", lambda i=i: sched.generate(llama, prompt_ids(5, i), tag=f"w{i}",
                                                                 max_new_tokens=5, **GREEDY)) for i in range(2)]
    assert not sched.shutdown(wait=False)  # the running prompt is still at its step
    for caller in waiting:
        assert isinstance(caller.join().error, SchedulerShutdown)
    gate.open()
    assert isinstance(running.join().error, SchedulerShutdown)
    assert "shut down" in str(running.error)
    assert sched.shutdown(wait=True)
    with pytest.raises(SchedulerShutdown):
        sched.generate(llama, prompt_ids(5, 1), max_new_tokens=2, **GREEDY)
    assert {p.state for p in sched.stats().prompts} == {PromptState.FAILED}


def test_context_manager_shuts_down(llama):
    with Scheduler() as sched:
        sched.generate(llama, prompt_ids(5, 1), max_new_tokens=2, **GREEDY)
    with pytest.raises(SchedulerShutdown):
        sched.generate(llama, prompt_ids(5, 1), max_new_tokens=2, **GREEDY)


# --------------------------------------------------------------------------- forms of call


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1) if value.dim() > 1 and value.shape[0] == 1 else value)

    def end(self) -> None:
        self.ended = True

    def tokens(self) -> list[int]:
        return torch.cat([c.reshape(-1) for c in self.chunks]).tolist()


def test_streaming(llama):
    sched = Scheduler(slice_steps=2)
    streams = [Collect() for _ in range(3)]
    callers = [Caller(lambda i=i: sched.generate(llama, prompt_ids(5 + i, i), max_new_tokens=7, streamer=streams[i],
                                                 **GREEDY)) for i in range(3)]
    for i, caller in enumerate(callers):
        caller.join()
        assert streams[i].ended
        assert streams[i].tokens() == caller.result[0].tolist()
        assert torch.equal(caller.result, solo(llama, prompt_ids(5 + i, i), max_new_tokens=7))


class FirstPutLog(BaseStreamer):
    """Logs ("token", name) when the first generated token is put (the first put is the prompt)."""

    def __init__(self, log: list, name: str) -> None:
        self.log, self.name, self.puts = log, name, 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.log.append(("token", self.name))

    def end(self) -> None:
        pass


def test_a_newcomers_first_token_reaches_its_caller_before_the_next_newcomers_prefill(llama):
    """Three newcomers arrive together while a long prompt runs. Each one's first token is put
    to its streamer, and seen by its own stopping criterion, before the next one's prefill
    starts: the prompt yields after its caller's hooks, not before them."""
    log: list[tuple[str, str]] = []
    sched = Scheduler(policy="fair", slice_steps=4, newcomer_order="arrival")   # a, b, c in turn
    prompts = {"a": prompt_ids(9, 11), "b": prompt_ids(7, 12), "c": prompt_ids(8, 13)}

    def hooks(name):
        return dict(streamer=FirstPutLog(log, name),
                    stopping_criteria=StoppingCriteriaList([AtStep(1, lambda: log.append(("criterion", name)))]))

    serve_burst(llama, sched, prompts, 5, prompt_ids(10, 14), 12, lambda name: log.append(("prefill", name)), hooks)
    newcomers = [("prefill", "a"), ("token", "a"), ("criterion", "a"),
                 ("prefill", "b"), ("token", "b"), ("criterion", "b"),
                 ("prefill", "c"), ("token", "c"), ("criterion", "c")]
    seen = [entry for entry in log if entry[1] != "x"]
    first_seen = [entry for i, entry in enumerate(seen) if entry not in seen[:i]]
    # token and criterion come in the order the installed transformers calls them; both before the next prefill
    assert [entry for entry in first_seen if entry[0] == "prefill"] == [("prefill", n) for n in "abc"]
    for n, following in (("a", "b"), ("b", "c")):
        assert first_seen.index(("token", n)) < first_seen.index(("prefill", following))
        assert first_seen.index(("criterion", n)) < first_seen.index(("prefill", following))
    assert sorted(first_seen) == sorted(newcomers)
    stats = {p.tag: p for p in sched.stats().prompts}
    assert stats["a"].first_token_step + 1 == stats["b"].first_token_step == stats["c"].first_token_step - 1


def test_streamer_is_ended_when_the_prompt_fails(llama):
    sched = Scheduler()
    stream = Collect()

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sched.generate(llama, prompt_ids(5, 1), max_new_tokens=7, streamer=stream,
                       stopping_criteria=StoppingCriteriaList([AtStep(2, boom)]), **GREEDY)
    assert stream.ended  # a consumer reading the stream in another thread is not left hanging


def test_batched_call_is_one_unit(llama):
    ids = prompt_ids(9, seed=3, batch=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :2] = 0
    expected = solo(llama, ids, attention_mask=mask, max_new_tokens=11)
    sched = Scheduler(policy="rr", slice_steps=3, use_context_cache=True, chunk_tokens=4,
                      first_token_priority=False)
    specs = [("batch", ids, 11, {"attention_mask": mask}), ("single", prompt_ids(6, 4), 8, {})]
    results = held_backlog(sched, llama, specs)
    assert torch.equal(results["batch"].result, expected)
    assert torch.equal(results["single"].result, solo(llama, prompt_ids(6, 4), max_new_tokens=8))
    stats = {p.tag: p for p in sched.stats().prompts}
    assert stats["batch"].batch_size == 3 and stats["batch"].num_tokens == 11 and stats["batch"].num_slices == 4
    assert slice_order(sched) == [("batch", 3), ("single", 3), ("batch", 3), ("single", 3), ("batch", 3),
                                  ("single", 2), ("batch", 2)]


def test_beam_search_and_kwargs_forms(llama):
    ids = prompt_ids(6, seed=5)
    sched = Scheduler(slice_steps=2, use_context_cache=True, chunk_tokens=3)
    beams = Caller(lambda: sched.generate(llama, ids, max_new_tokens=8, num_beams=3, **GREEDY))
    named = Caller(lambda: sched.generate(llama, input_ids=ids, attention_mask=torch.ones_like(ids),
                                          max_new_tokens=8, return_dict_in_generate=True, **GREEDY))
    assert torch.equal(beams.join().result, solo(llama, ids, max_new_tokens=8, num_beams=3))
    out = named.join().result
    assert torch.equal(out.sequences, solo(llama, ids, max_new_tokens=8))
    assert isinstance(returned_cache(out), kv_cache.ContextKVCache)  # the caller holds it now
    assert returned_cache(out).get_seq_length() == 6 + 8 - 1


@pytest.mark.skipif(cache_keyword() != "cache", reason="this transformers takes past_key_values")
def test_deprecated_cache_name_warns_at_the_callers_line(llama):
    """A cache passed as ``past_key_values`` to the scheduler, directly or through wrap: the
    warning names the caller's line, not the aqua_alloc line that passes the cache on."""
    ids = prompt_ids(6, seed=5)
    sched = Scheduler(slice_steps=2)
    model = sched.wrap(build(CONFIGS["llama"]()))
    for call in (lambda c: sched.generate(llama, ids, max_new_tokens=4, past_key_values=c, **GREEDY),
                 lambda c: model.generate(ids, max_new_tokens=4, past_key_values=c, **GREEDY)):
        cache = DynamicCache(config=llama.config)
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated .* Use `cache`") as record:
            out = call(cache)
        assert [w.filename for w in record] == [__file__]
        assert torch.equal(out, solo(llama, ids, max_new_tokens=4)) and cache.get_seq_length() == 6 + 4 - 1


def test_async_form(llama):
    sched = Scheduler(slice_steps=2)

    async def main():
        return await asyncio.gather(*(sched.agenerate(llama, prompt_ids(4 + i, i), max_new_tokens=6, **GREEDY)
                                      for i in range(4)))

    outputs = asyncio.run(main())
    for i, out in enumerate(outputs):
        assert torch.equal(out, solo(llama, prompt_ids(4 + i, i), max_new_tokens=6))
    assert len(sched.stats().prompts) == 4


def test_async_cancellation_frees_the_prompt(llama):
    sched = Scheduler(policy="rr", slice_steps=2)

    async def main():
        loop = asyncio.get_running_loop()
        tasks: dict[str, asyncio.Task] = {}
        cancel_self = AtStep(3, lambda: loop.call_soon_threadsafe(tasks["running"].cancel))
        tasks["running"] = asyncio.create_task(sched.agenerate(
            llama, prompt_ids(5, 1), tag="running", max_new_tokens=30,
            stopping_criteria=StoppingCriteriaList([cancel_self]), **GREEDY))
        tasks["ok"] = asyncio.create_task(sched.agenerate(llama, prompt_ids(6, 2), tag="ok", max_new_tokens=9, **GREEDY))
        tasks["queued"] = asyncio.create_task(sched.agenerate(llama, prompt_ids(7, 3), tag="queued",
                                                              max_new_tokens=9, **GREEDY))
        await asyncio.sleep(0)
        tasks["queued"].cancel()
        return await asyncio.gather(*tasks.values(), return_exceptions=True)

    running, ok, queued = asyncio.run(main())
    assert isinstance(running, asyncio.CancelledError)
    assert isinstance(queued, asyncio.CancelledError)
    assert torch.equal(ok, solo(llama, prompt_ids(6, 2), max_new_tokens=9))
    stats = {p.tag: p for p in sched.stats().prompts}
    # When a cancelled task's await ends, its prompt has already left the scheduler.
    assert stats["running"].state == PromptState.CANCELLED and stats["running"].num_tokens < 30
    assert stats["queued"].state == PromptState.CANCELLED
    assert sched.stats().running is None and sched.stats().waiting == []


def test_wrap_makes_generate_scheduled(models):
    model = build(CONFIGS["gpt2"](), seed=3)
    ids = prompt_ids(5, seed=1)
    expected = solo(model, ids, max_new_tokens=6)
    sched = Scheduler(slice_steps=2)
    assert sched.wrap(model) is model
    callers = [Caller(lambda: model.generate(ids, max_new_tokens=6, **GREEDY)) for _ in range(3)]
    for caller in callers:
        assert torch.equal(caller.join().result, expected)
    assert len(sched.stats().prompts) == 3
    Scheduler.unwrap(model)
    assert "generate" not in model.__dict__
    model.generate(ids, max_new_tokens=2, **GREEDY)
    assert len(sched.stats().prompts) == 3


def test_trace_events(llama):
    drain_python_events()
    sched = Scheduler(policy="rr", slice_steps=2)
    held_backlog(sched, llama, [("ev-a", prompt_ids(5, 1), 4, {}), ("ev-b", prompt_ids(5, 2), 3, {})])
    events = [e for e in drain_python_events() if e.context in ("ev-a", "ev-b")]
    kinds = {tag: [e.kind for e in events if e.context == tag] for tag in ("ev-a", "ev-b")}
    S, E = EventKind.SLICE_START, EventKind.SLICE_END
    # ev-b queues while ev-a is held in its first step: ev-a yields at that step's boundary (1
    # step), ev-b runs 2, ev-a 2, ev-b its last, ev-a its last.
    assert kinds["ev-a"] == [EventKind.PROMPT_ARRIVED, S, EventKind.FIRST_TOKEN, E, S, E, S, E, EventKind.FINISHED]
    assert kinds["ev-b"] == [EventKind.PROMPT_ARRIVED, S, EventKind.FIRST_TOKEN, E, S, E, EventKind.FINISHED]
    assert [e.context for e in events if e.kind == S] == ["ev-a", "ev-b", "ev-a", "ev-b", "ev-a"]


# --------------------------------------------------------------------------- memory side (fake allocator)


@dataclasses.dataclass
class FakeMove:
    bytes_moved: int
    bytes_elsewhere: int = 0


class FakeAllocator:
    """Records the scheduler's calls; checks that a context is used only while resumed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple] = []
        self.live: set[str] = set()
        self.parked: set[str] = set()
        self.errors: list[str] = []

    def is_enabled(self) -> bool:
        return True

    @contextlib.contextmanager
    def context(self, tag, device=None):
        with self.lock:
            if tag in self.parked:
                self.errors.append(f"allocation into parked {tag}")
            self.live.add(tag)
            self.calls.append(("context", tag))
        yield tag

    def park(self, tag):
        with self.lock:
            assert tag in self.live
            self.parked.add(tag)
            self.calls.append(("park", tag))

    def resume(self, tag, wait=True):
        with self.lock:
            self.parked.discard(tag)
            self.calls.append(("resume", tag, wait))
        if wait:
            return FakeMove(40)
        future = concurrent.futures.Future()
        future.set_result(FakeMove(40))
        return future

    def release(self, tag):
        with self.lock:
            if tag not in self.live:
                self.errors.append(f"release of unknown {tag}")
            self.live.discard(tag)
            self.parked.discard(tag)
            self.calls.append(("release", tag))

    def prefetch(self, tag):
        return self.resume(tag, wait=False)

    def wait_on_stream(self, future, stream=None):
        return False  # like a driver that cannot queue a GPU-side wait: the scheduler waits on the host

    def reclaim_pending(self):
        return False

    def where(self, tag, *, wait=True):
        return {"gpu0": 60, "host": 40} if tag in self.parked else {"gpu0": 100, "host": 0}


@pytest.fixture
def fake_allocator(monkeypatch):
    fake = FakeAllocator()
    monkeypatch.setattr(kv_cache, "memory_for", lambda device: fake)
    monkeypatch.setattr(scheduler_module, "memory_for", lambda device: fake)
    return fake


def test_contexts_parked_resumed_prefetched_and_released(llama, fake_allocator):
    fake = fake_allocator
    sched = Scheduler(policy="rr", slice_steps=2, first_token_priority=False)
    steps_while_parked = []

    def check(tag):
        return AtStep(set(range(1, 100)), lambda: tag in fake.parked and steps_while_parked.append(tag))

    def boom():
        raise RuntimeError("boom")

    specs = [("a", prompt_ids(5, 1), 7, {"stopping_criteria": [check("a")]}),
             ("b", prompt_ids(6, 2), 6, {"stopping_criteria": [check("b"), AtStep(5, boom)]}),
             ("c", prompt_ids(7, 3), 6, {"stopping_criteria": [check("c")]})]
    results = held_backlog(sched, llama, specs)
    assert isinstance(results["b"].error, RuntimeError)
    assert torch.equal(results["a"].result, solo(llama, prompt_ids(5, 1), max_new_tokens=7))
    assert torch.equal(results["c"].result, solo(llama, prompt_ids(7, 3), max_new_tokens=6))
    assert steps_while_parked == [] and fake.errors == []
    assert fake.live == set()  # every context released, the failed one too
    assert sorted(c[1] for c in fake.calls if c[0] == "release") == ["a", "b", "c"]
    assert slice_order(sched) == [("a", 2), ("b", 2), ("c", 2), ("a", 2), ("b", 2), ("c", 2), ("a", 2),
                                  ("b", 1), ("c", 2), ("a", 1)]
    per_tag = {tag: [c[0] if c[0] != "resume" else f"resume-{'wait' if c[2] else 'prefetch'}"
                     for c in fake.calls if c[1] == tag and c[0] != "context"] for tag in "abc"}
    # a parks after each of its slices but the last; it is prefetched while the one before it runs.
    assert per_tag["a"] == ["park", "resume-prefetch", "park", "resume-prefetch", "park", "resume-prefetch",
                            "release"]
    assert per_tag["b"] == ["park", "resume-prefetch", "park", "resume-prefetch", "release"]
    assert per_tag["c"] == ["park", "resume-prefetch", "park", "resume-prefetch", "release"]
    stats = {p.tag: p for p in sched.stats().prompts}
    assert stats["a"].bytes_moved == 3 * (40 + 40)  # 3 resumes: 40 bytes found on host + 40 brought back
    assert stats["a"].parked_context_bytes == 100
    per_token = 2 * 2 * (2 * 16 * 4)  # layers x (K, V) x [H_kv=2, D=16] fp32 bytes
    assert stats["a"].parked_kv_bytes == per_token * (5 + 6 - 1)  # parked after 6 tokens


class PartialPrefetchAllocator(FakeAllocator):
    """A prefetch that runs while the previous prompt still holds the GPU brings back only
    part of the context (bytes_elsewhere > 0), as the real allocator does when the running
    context cannot be evicted."""

    def resume(self, tag, wait=True):
        result = super().resume(tag, wait)
        if wait:
            return result
        future = concurrent.futures.Future()
        future.set_result(FakeMove(24, bytes_elsewhere=16))
        return future


def test_partial_prefetch_is_completed_when_the_slice_begins(llama, monkeypatch):
    # Regression: on the H200, contexts prefetched under a small local budget stayed mostly
    # on host for their whole slice because nothing resumed them once the GPU was free.
    fake = PartialPrefetchAllocator()
    monkeypatch.setattr(kv_cache, "memory_for", lambda device: fake)
    monkeypatch.setattr(scheduler_module, "memory_for", lambda device: fake)
    sched = Scheduler(policy="rr", slice_steps=2)
    specs = [("a", prompt_ids(5, 1), 5, {}), ("b", prompt_ids(6, 2), 5, {})]
    results = held_backlog(sched, llama, specs)
    assert torch.equal(results["a"].result, solo(llama, prompt_ids(5, 1), max_new_tokens=5))
    assert fake.errors == []
    per_tag = {tag: [c[0] if c[0] != "resume" else f"resume-{'wait' if c[2] else 'prefetch'}"
                     for c in fake.calls if c[1] == tag and c[0] != "context"] for tag in "ab"}
    for tag in "ab":
        seq = per_tag[tag]
        prefetches = [i for i, c in enumerate(seq) if c == "resume-prefetch"]
        assert prefetches, seq
        assert all(seq[i + 1] == "resume-wait" for i in prefetches), seq


class ReclaimingAllocator(FakeAllocator):
    """A lender waits for memory under a running context: ``reclaim_pending`` is true until
    that context is resumed in place (the real allocator then moves its pieces on)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = False
        self.resumed_while_running: list[str] = []

    def reclaim_pending(self) -> bool:
        return self.pending

    def resume(self, tag, wait=True):
        with self.lock:
            if tag not in self.parked and self.pending:
                self.resumed_while_running.append(tag)
                self.pending = False
        return super().resume(tag, wait)


def test_a_pending_reclaim_resumes_the_running_prompt_between_steps(llama, monkeypatch):
    fake = ReclaimingAllocator()
    monkeypatch.setattr(kv_cache, "memory_for", lambda device: fake)
    monkeypatch.setattr(scheduler_module, "memory_for", lambda device: fake)
    sched = Scheduler(policy="fcfs")

    def reclaim_now():
        fake.pending = True

    out = sched.generate(llama, prompt_ids(5, 1), max_new_tokens=6, stopping_criteria=[AtStep(3, reclaim_now)],
                         **GREEDY)
    assert torch.equal(out, solo(llama, prompt_ids(5, 1), max_new_tokens=6))
    assert len(fake.resumed_while_running) == 1 and not fake.pending
    assert fake.errors == []


# --------------------------------------------------------------------------- Ctrl-C in the main thread


def interrupt_main_thread() -> None:
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


class _SignallingList(list):
    """The scheduler's waiting list, sending SIGINT to the main thread when it takes ``tag``
    off the list (once): halfway through handing the device on."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def remove(self, prompt) -> None:
        super().remove(prompt)
        if prompt.tag == self.tag and threading.current_thread() is threading.main_thread():
            self.tag = None
            interrupt_main_thread()


@pytest.mark.parametrize("where", ["waiting", "forward", "step", "parked", "handing over"])
def test_ctrl_c_in_the_main_threads_prompt_leaves_the_scheduler_consistent(llama, fake_allocator, where):
    """SIGINT while the main thread's scheduled generate waits for its first turn, runs the
    model, runs the caller's stopping criterion, waits parked between two slices, or hands the
    device to another prompt: the caller gets KeyboardInterrupt, its prompt leaves (cancelled)
    with its context released, the others finish with their solo outputs, the SIGINT handler is
    the one it was, and the scheduler goes on serving, the tag free again."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread, and this test does not run there")
    fake = fake_allocator
    sched = Scheduler(slice_steps=2, use_context_cache=True, chunk_tokens=4)
    handler = signal.getsignal(signal.SIGINT)
    # Waiting or parked: the first other prompt holds the device at its first step until the end.
    gate = Gate(1) if where in ("waiting", "parked") else None
    others: dict[str, Caller] = {}

    def start_others() -> None:
        for tag, ids, extra in (("w0", prompt_ids(5, 0), [gate.criterion] if gate else []), ("w1", prompt_ids(6, 1), [])):
            others[tag] = Caller(lambda ids=ids, tag=tag, extra=extra: sched.generate(
                llama, ids, tag=tag, max_new_tokens=8, stopping_criteria=StoppingCriteriaList(extra), **GREEDY), name=tag)
            wait_until(lambda: tag in {p.tag for p in sched.stats().prompts}, f"{tag} arrived")

    def interrupt_when(condition: Callable[[], bool], what: str) -> None:
        def wait_then_interrupt() -> None:
            wait_until(condition, what)
            interrupt_main_thread()

        threading.Thread(target=wait_then_interrupt, daemon=True).start()

    criteria, hook = [], None
    if where == "waiting":  # w0 holds the device; main waits for its first turn
        start_others()
        gate.reached.wait(timeout=120)
        interrupt_when(lambda: "main" in sched.stats().waiting, "main waits")
    else:  # main runs first, the others queue behind it at its first step
        criteria.append(AtStep(1, start_others))
        if where == "forward":
            calls = iter(range(1, 1000))

            def in_forward(*_: object) -> None:  # the first layer, main's 5th step
                if threading.current_thread() is threading.main_thread() and next(calls) == 5:
                    interrupt_main_thread()

            hook = llama.model.layers[0].register_forward_pre_hook(in_forward)
        elif where == "step":
            criteria.append(AtStep(4, interrupt_main_thread))
        elif where == "handing over":  # main yields to w0 at its 2nd step (w0 waits for its first token)
            sched._waiting = _SignallingList("w0")
        else:  # parked: main yielded to w0, which the gate holds
            interrupt_when(lambda: gate.reached.is_set() and "main" in sched.stats().waiting, "main parked")
    try:
        with pytest.raises(KeyboardInterrupt):
            sched.generate(llama, prompt_ids(7, 9), tag="main", max_new_tokens=20,
                           stopping_criteria=StoppingCriteriaList(criteria), **GREEDY)
    finally:
        if hook is not None:
            hook.remove()
        if gate is not None:
            gate.open()
    assert torch.equal(others["w0"].join().result, solo(llama, prompt_ids(5, 0), max_new_tokens=8))
    assert torch.equal(others["w1"].join().result, solo(llama, prompt_ids(6, 1), max_new_tokens=8))
    assert signal.getsignal(signal.SIGINT) is handler
    stats = {p.tag: p for p in sched.stats().prompts}
    assert stats["main"].state == PromptState.CANCELLED and "KeyboardInterrupt" in stats["main"].error
    assert sched.stats().running is None and sched.stats().waiting == []
    assert fake.live == set() and fake.errors == []  # every context released, main's too
    assert ("release", "main") in fake.calls or where == "waiting"  # a waiting prompt made none
    assert torch.equal(sched.generate(llama, prompt_ids(7, 9), tag="main", max_new_tokens=4, **GREEDY),
                       solo(llama, prompt_ids(7, 9), max_new_tokens=4))


def test_switch_overhead_lengthens_the_slices_of_prompts_whose_switch_costs_more(llama, monkeypatch):
    """A resume that takes long (a context coming back from host) makes the prompt's slices
    longer with switch_overhead, so the move is paid once per longer slice; without it, or when
    switches cost nothing, slices stay slice_steps long."""
    class SlowResume(FakeAllocator):
        def resume(self, tag, wait=True):
            time.sleep(0.05)  # s: far more than a tiny model's step on CPU
            return super().resume(tag, wait)

    orders = {}
    for overhead in (None, 0.1):
        slow = SlowResume()
        monkeypatch.setattr(kv_cache, "memory_for", lambda device, slow=slow: slow)
        monkeypatch.setattr(scheduler_module, "memory_for", lambda device, slow=slow: slow)
        sched = Scheduler(policy="rr", slice_steps=3, use_context_cache=True, prefetch=False,
                          first_token_priority=False, switch_overhead=overhead)
        specs = [("a", prompt_ids(5, 1), 40, {}), ("b", prompt_ids(6, 2), 40, {})]
        results = held_backlog(sched, llama, specs)
        assert all(r.error is None for r in results.values())
        for tag, ids, n, _ in specs:
            assert torch.equal(results[tag].result, solo(llama, ids, max_new_tokens=n))
        orders[overhead] = slice_order(sched)
        stats = {p.tag: p for p in sched.stats().prompts}
        assert all(p.last_switch_s >= 0.04 for p in stats.values())  # measured: the sleep, less a step
        assert not slow.errors
    assert all(steps == 3 for _, steps in orders[None][1:-2])
    # 0.05 s / (0.1 x a step of a few ms) is more than 8 x 3 steps: slices of 24 once a step is timed
    assert max(steps for _, steps in orders[0.1]) == scheduler_module.MAX_SLICE_FACTOR * 3
    assert len(orders[0.1]) < len(orders[None])


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, True, "0.1"])
def test_switch_overhead_takes_a_share_between_0_and_1(value):
    with pytest.raises(ValueError, match=r"switch_overhead=.*: expected None \(fixed slices\) or a share"):
        Scheduler(switch_overhead=value)


def test_the_step_boundary_waits_for_the_streamer_only_while_it_gets_every_step():
    """The boundary of step k is reached once the criteria and the streamer have both seen
    step k, in either order; a streamer that stops being given tokens (a decoding loop that
    does not put every step) is then ignored, so the prompt still yields."""
    class Recorder:
        def __init__(self):
            self.boundaries = 0

        def _at_step_boundary(self, prompt):
            self.boundaries += 1

    class Sink(BaseStreamer):
        def put(self, value):
            pass

        def end(self):
            pass

    ids = torch.zeros((1, 4), dtype=torch.long)
    recorder = Recorder()
    boundary = scheduler_module._StepBoundary(recorder, prompt=SimpleNamespace(hook_cpu_ns=0))
    streamer = boundary.wrap_streamer(Sink())
    streamer.put(ids)                       # the prompt: no step
    boundary(ids, None)                     # step 1: criteria first ...
    assert recorder.boundaries == 0
    streamer.put(ids[:, -1])                # ... then its token: boundary 1
    assert recorder.boundaries == 1
    streamer.put(ids[:, -1])                # step 2: token first ...
    assert recorder.boundaries == 1
    boundary(ids, None)                     # ... then criteria: boundary 2
    assert recorder.boundaries == 2
    boundary(ids, None)                     # steps 3 and 4 without a put: waited for once,
    assert recorder.boundaries == 2
    boundary(ids, None)                     # then the streamer is ignored: one boundary for both
    assert recorder.boundaries == 3
    boundary(ids, None)
    assert recorder.boundaries == 4


def serve_burst(llama, sched, prompts: dict[str, torch.Tensor], new_tokens: int, long_ids: torch.Tensor,
                long_new_tokens: int, on_prefill, extra=lambda name: {}) -> dict[str, Caller]:
    """Newcomers ``prompts`` arrive together (in dict order, each with ``extra(name)`` in its
    call) in the 2nd step of a long prompt "x"; ``on_prefill(name)`` as each one's prefill
    starts. Checks that nothing failed and that each output equals its solo run."""
    callers: dict[str, Caller] = {}

    def note_prefill(module, args, kwargs):
        ids = kwargs.get("input_ids")
        name = threading.current_thread().name
        if ids is not None and ids.shape[-1] > 1 and name in prompts:
            on_prefill(name)

    def arrive():
        for name, ids in prompts.items():
            callers[name] = queue(sched, name, lambda ids=ids, name=name: sched.generate(
                llama, ids, tag=name, max_new_tokens=new_tokens, **extra(name), **GREEDY))

    handle = llama.register_forward_pre_hook(note_prefill, with_kwargs=True)
    try:
        long_ = Caller(lambda: sched.generate(llama, long_ids, tag="x", max_new_tokens=long_new_tokens,
                                              stopping_criteria=StoppingCriteriaList([AtStep(2, arrive)]), **GREEDY),
                       name="x")
        long_.join()
        for caller in callers.values():
            caller.join()
    finally:
        handle.remove()
    assert long_.error is None and all(c.error is None for c in callers.values())
    for name, ids in prompts.items():
        assert torch.equal(callers[name].result, solo(llama, ids, max_new_tokens=new_tokens))
    return callers


def prefill_order(llama, sched, prompts: dict[str, torch.Tensor]) -> list[str]:
    """The order the prefills of a burst of newcomers ran in."""
    order: list[str] = []
    serve_burst(llama, sched, prompts, 3, prompt_ids(10, 40), 8, order.append)
    return order


def test_shortest_newcomer_first_orders_a_burst_by_prefill_work(llama):
    prompts = {"long": prompt_ids(30, 41), "short": prompt_ids(5, 42), "mid": prompt_ids(12, 43)}
    arrival = prefill_order(llama, Scheduler(slice_steps=4, newcomer_order="arrival"), prompts)
    assert arrival == ["long", "short", "mid"]
    shortest = prefill_order(llama, Scheduler(slice_steps=4), prompts)   # the default
    assert shortest == ["short", "mid", "long"]


def test_shortest_newcomer_first_passes_no_newcomer_more_than_the_limit(llama):
    limit = scheduler_module.NEWCOMER_BYPASS_LIMIT
    prompts = {"long": prompt_ids(30, 50)} | {f"s{i}": prompt_ids(4 + i, 51 + i) for i in range(limit + 2)}
    order = prefill_order(llama, Scheduler(slice_steps=4, newcomer_order="shortest"), prompts)
    shorts = [name for name in prompts if name != "long"]
    assert order == shorts[:limit] + ["long"] + shorts[limit:]


def test_newcomer_order_is_checked():
    with pytest.raises(ValueError, match=r"newcomer_order='longest': expected one of 'arrival', 'shortest'"):
        Scheduler(newcomer_order="longest")
