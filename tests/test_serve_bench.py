"""The serving benchmark's pieces on CPU: traces, windows, time scaling, metrics on known inputs,
bad inputs named in the error, the systems on a tiny model (outputs equal solo runs, deadlines
abort cleanly). ``python -m aqua_alloc demo`` is tested in tests/test_demo.py.

What can fail here: exact values (arrivals, scales, percentiles), exact counts, exact token ids.
No test measures time.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # the harness lives there

import serve_harness as sb  # noqa: E402
from serve_options import check_options  # noqa: E402
from serve_trace import (  # noqa: E402
    EXCERPT_NAME,
    BenchInputError,
    LoadedTrace,
    Request,
    RequestRecord,
    ServiceModel,
    TraceRow,
    clip_requests,
    fit_service_model,
    load_trace,
    parse_loads,
    parse_names,
    read_azure_csv,
    replay_arrivals,
    select_window,
    summarize_run,
    time_scale,
    window_rate,
)
from aqua_alloc.obs.trace_reader import read_trace

REPO = Path(__file__).resolve().parents[1]
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def trace_of(arrivals: list[float], prompt: int = 100, output: int = 10) -> LoadedTrace:
    rows = [TraceRow(a, prompt + i, output + i) for i, a in enumerate(arrivals)]
    return LoadedTrace("test", Path("test.csv"), rows, False, None)


def requests_at(arrivals: list[float]) -> list[Request]:
    return [Request(i, a, 10, 5, 10, 5) for i, a in enumerate(arrivals)]


# --------------------------------------------------------------------------------------
# Traces and windows


def test_read_azure_csv_rebases_to_the_first_row(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["2023-11-16 18:15:46.6805900,374,44",
                                          "2023-11-16 18:15:50.9951690,396,109",
                                          "2023-11-16 18:16:46.6805900,91,16"])
    rows = read_azure_csv(path)
    assert [(r.prompt_tokens, r.output_tokens) for r in rows] == [(374, 44), (396, 109), (91, 16)]
    assert rows[0].arrival_s == 0
    assert rows[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert rows[2].arrival_s == pytest.approx(60.0, abs=1e-6)


@pytest.mark.parametrize("rows, text", [
    (["2023-11-16 18:15:46.68,374"], "t.csv:2: expected 3 fields, got 2"),
    (["yesterday,374,44"], "t.csv:2: bad TIMESTAMP 'yesterday'"),
    (["2023-11-16 18:15:46.68,many,44"], "t.csv:2: token counts must be integers"),
    (["2023-11-16 18:15:46.68,374,0"], "t.csv:2: token counts must be at least 1"),
    (["2023-11-16 18:15:47.00,1,1", "2023-11-16 18:15:46.00,1,1"],
     "t.csv:3: TIMESTAMP 2023-11-16 18:15:46.00 is earlier"),
    ([], "the trace has no requests"),
])
def test_bad_csv_rows_name_file_and_line(tmp_path, rows, text):
    with pytest.raises(BenchInputError, match=text.replace("(", r"\(")):
        read_azure_csv(write_csv(tmp_path / "t.csv", rows))


def test_bad_csv_header(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(BenchInputError, match="expected the header TIMESTAMP,ContextTokens,GeneratedTokens"):
        read_azure_csv(path)


def test_packaged_excerpt_is_the_start_of_the_conv_trace():
    excerpt = load_trace(EXCERPT_NAME)
    assert excerpt.is_excerpt and len(excerpt.rows) == 400
    assert (excerpt.rows[0].prompt_tokens, excerpt.rows[0].output_tokens) == (374, 44)
    assert (excerpt.rows[-1].prompt_tokens, excerpt.rows[-1].output_tokens) == (1314, 200)
    assert (REPO / "aqua_alloc" / "data" / "README.md").read_text().count("CC-BY-4.0") >= 1


def test_named_trace_found_or_excerpt_stands_in(tmp_path):
    write_csv(tmp_path / "AzureLLMInferenceTrace_code.csv",
              ["2023-11-16 18:15:46.0,10,2", "2023-11-16 18:15:47.5,20,3"])
    code = load_trace("code", traces_dir=tmp_path)
    assert code.name == "code" and [r.arrival_s for r in code.rows] == [0, 1.5] and not code.is_excerpt
    conv = load_trace("conv", traces_dir=tmp_path)  # not there: the packaged excerpt, with a note saying so
    assert conv.is_excerpt and conv.name == EXCERPT_NAME and "not found" in conv.note
    with pytest.raises(BenchInputError, match="--window-s=200: the window runs past the end of the packaged excerpt"):
        select_window(conv, 0, 200, None)


MOONCAKE_LINES = [  # the first lines of kvcache-ai/Mooncake's conversation_trace.jsonl (Apache-2.0)
    '{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2, 3]}',
    '{"timestamp": 0, "input_length": 7322, "output_length": 490, "hash_ids": [0, 14, 15]}',
    '{"timestamp": 3000, "input_length": 13544, "output_length": 71, "hash_ids": [0, 111]}',
    '{"timestamp": 5999, "input_length": 1053, "output_length": 26, "hash_ids": [0, 300]}',
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_mooncake_trace_is_read_as_published(tmp_path):
    write_jsonl(tmp_path / "conversation_trace.jsonl", MOONCAKE_LINES)
    trace = load_trace("mooncake", traces_dir=tmp_path)
    assert trace.name == "mooncake" and not trace.is_excerpt
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace.rows] == [
        (0.0, 6758, 500), (0.0, 7322, 490), (3.0, 13544, 71), (5.999, 1053, 26)]  # ms -> s, bursts kept
    assert [r.arrival_s for r in load_trace(str(tmp_path / "conversation_trace.jsonl")).rows] == [0, 0, 3.0, 5.999]
    window = select_window(trace, 1.0, 10.0, None)
    assert [(r.id, r.arrival_s) for r in window] == [(2, 0.0), (3, pytest.approx(2.999))]


@pytest.mark.parametrize("lines, text", [
    (["{not json"], "t.jsonl:1: not a JSON line"),
    (["[1, 2]"], "t.jsonl:1: expected a JSON object, got list"),
    (['{"input_length": 5, "output_length": 2}'], "t.jsonl:1: timestamp must be a number of ms >= 0, got None"),
    (['{"timestamp": -1, "input_length": 5, "output_length": 2}'], "t.jsonl:1: timestamp must be a number"),
    (['{"timestamp": 0, "input_length": 5.5, "output_length": 2}'], "t.jsonl:1: input_length must be a whole number"),
    (['{"timestamp": 0, "input_length": 5, "output_length": 0}'], "t.jsonl:1: output_length must be a whole number"),
    (['{"timestamp": 9, "input_length": 5, "output_length": 1}', "",
      '{"timestamp": 3, "input_length": 5, "output_length": 1}'], "t.jsonl:3: timestamp 3 is earlier"),
    ([], "the trace has no requests"),
])
def test_bad_mooncake_lines_name_file_and_line(tmp_path, lines, text):
    with pytest.raises(BenchInputError, match=text):
        load_trace(str(write_jsonl(tmp_path / "t.jsonl", lines)))


def test_unknown_and_missing_traces_name_the_argument(tmp_path):
    with pytest.raises(BenchInputError, match=r"--trace='chat': not a known trace \(conv, code, mooncake, conv-excerpt\)"):
        load_trace("chat")
    with pytest.raises(BenchInputError, match="--trace='code': AzureLLMInferenceTrace_code.csv not found"):
        load_trace("code", traces_dir=tmp_path)
    path = write_csv(tmp_path / "mine.csv", ["2023-11-16 18:15:46.0,10,2"])
    assert load_trace(str(path)).name == "mine"


def test_select_window_rebases_and_caps():
    trace = trace_of([0.0, 1.0, 2.5, 4.0, 7.0, 9.0])
    window = select_window(trace, 2.0, 5.0, None)
    assert [r.id for r in window] == [2, 3]  # 2.5, 4.0 (7.0 is the end, excluded)
    assert [r.arrival_s for r in window] == [0.0, 1.5]
    assert [r.id for r in select_window(trace, 0, 100, 3)] == [0, 1, 2]
    assert window[0].prompt_tokens == window[0].trace_prompt_tokens == 102


@pytest.mark.parametrize("start, duration, max_requests, text", [
    (20.0, 5.0, None, r"--window-start=20 --window-s=5: no request of trace 'test' arrives in \[20, 25\)"),
    (0.0, 0.0, None, "--window-s=0.0: must be a positive number of seconds"),
    (-1.0, 5.0, None, "--window-start=-1.0: must be a finite number of seconds >= 0"),
    (0.0, 5.0, 0, "--max-requests=0: must be at least 1"),
])
def test_bad_windows_name_the_argument(start, duration, max_requests, text):
    with pytest.raises(BenchInputError, match=text):
        select_window(trace_of([0.0, 1.0, 2.0]), start, duration, max_requests)


def test_clip_counts_what_it_clipped():
    window = select_window(trace_of([0, 1, 2], prompt=100, output=10), 0, 10, None)  # prompts 100..102, outputs 10..12
    clipped, num_prompts, num_outputs = clip_requests(window, 101, 10)
    assert [(r.prompt_tokens, r.output_tokens) for r in clipped] == [(100, 10), (101, 10), (101, 10)]
    assert (num_prompts, num_outputs) == (1, 2)
    assert clipped[2].trace_output_tokens == 12
    with pytest.raises(BenchInputError, match="--max-output=0: must be at least 1 token"):
        clip_requests(window, None, 0)


# --------------------------------------------------------------------------------------
# Arguments


def test_parse_loads():
    assert parse_loads("0.5,0.8,0.95") == [0.5, 0.8, 0.95]
    assert parse_loads(" 1 ") == [1.0]


@pytest.mark.parametrize("text, message", [
    ("0.5,abc", "'abc' is not a number"),
    ("", "'' is not a number"),
    ("0", "each load must be in (0, 2]"),
    ("2.5", "each load must be in (0, 2]"),
    ("nan", "each load must be in (0, 2]"),
    ("0.5,0.5", "a load is given twice"),
])
def test_bad_loads_name_the_argument(text, message):
    with pytest.raises(BenchInputError) as info:
        parse_loads(text)
    assert str(info.value).startswith(f"--loads={text!r}: ") and message in str(info.value)


def test_parse_names():
    known = [s.value for s in sb.System]
    assert parse_names("fcfs, aqua-host", known, "--systems") == ["fcfs", "aqua-host"]
    with pytest.raises(BenchInputError, match=r"--systems='fcfs,vllm': unknown 'vllm' \(choose from fcfs, threads"):
        parse_names("fcfs,vllm", known, "--systems")
    with pytest.raises(BenchInputError, match="--systems=',': empty"):
        parse_names(",", known, "--systems")


# --------------------------------------------------------------------------------------
# Time scaling and the service model


def test_time_scale_gives_the_offered_load():
    requests = requests_at([0.0, 1.0, 3.0, 4.0, 10.0])  # 4 gaps over 10 s: 0.4 requests per trace second
    assert window_rate(requests) == pytest.approx(0.4)
    scale = time_scale(requests, mean_service_s=0.5, load=0.8)  # target rate 0.8 / 0.5 = 1.6 req/s
    assert scale == pytest.approx(0.4 * 0.5 / 0.8)
    arrivals = replay_arrivals(requests, scale)
    assert arrivals == pytest.approx([0.0, 0.25, 0.75, 1.0, 2.5])
    offered_rate = (len(arrivals) - 1) / arrivals[-1]
    assert offered_rate * 0.5 == pytest.approx(0.8)  # arrival rate x service time = load


def test_window_rate_needs_two_distinct_arrivals():
    with pytest.raises(BenchInputError, match="the window holds 1 request; at least 2 are needed"):
        window_rate(requests_at([0.0]))
    with pytest.raises(BenchInputError, match="every request of the window arrives at the same instant"):
        window_rate(requests_at([0.0, 0.0]))


def test_fit_service_model_recovers_a_known_model():
    truth = ServiceModel(first_token_s=0.02, prefill_s_per_token=1e-5, decode_s_per_token=0.01)
    samples = [(p, o, truth.ttft_s(p), truth.service_s(p, o)) for p, o in [(100, 10), (1000, 50), (2000, 2)]]
    fit = fit_service_model(samples)
    assert fit.first_token_s == pytest.approx(0.02)
    assert fit.prefill_s_per_token == pytest.approx(1e-5)
    assert fit.decode_s_per_token == pytest.approx(0.01)
    assert fit.mean_service_s(requests_at([0, 1])) == pytest.approx(truth.service_s(10, 5))
    same_prompt = fit_service_model([(50, 3, 0.1, 0.3), (50, 5, 0.2, 0.6)])  # decode: 0.6 s over 6 tokens
    assert (same_prompt.first_token_s, same_prompt.prefill_s_per_token) == (pytest.approx(0.15), 0.0)
    assert same_prompt.decode_s_per_token == pytest.approx(0.1)


# --------------------------------------------------------------------------------------
# Metrics


def record(i, arrival, first, finish, tokens, expected=None, error=None, oom=False):
    return RequestRecord(request_id=i, arrival_s=arrival, expected_tokens=expected or tokens, submitted_s=arrival,
                         first_token_s=first, finish_s=finish, num_tokens=tokens, error=error, oom=oom)


def test_summarize_run_on_known_records():
    records = [record(0, 0.0, 0.1, 1.1, 11),      # ttft 0.1, tpot 0.1
               record(1, 1.0, 1.3, 2.3, 6),       # ttft 0.3, tpot 0.2
               record(2, 2.0, 2.6, 3.6, 5),       # ttft 0.6, tpot 0.25
               record(3, 3.0, 4.0, 5.0, 3),       # ttft 1.0, tpot 0.5
               record(4, 4.0, None, 4.5, 0, expected=7, error="OutOfMemoryError: CUDA out of memory", oom=True),
               record(5, 5.0, 5.5, 6.0, 2, expected=4, error="stopped at the run's deadline")]
    s = summarize_run(records)
    assert (s["requests"], s["completed"], s["failed"], s["oom"]) == (6, 4, 2, 1)
    assert s["ttft_mean_s"] == pytest.approx(0.5)
    assert s["ttft_p50_s"] == pytest.approx(0.45)          # between 0.3 and 0.6
    assert s["ttft_p90_s"] == pytest.approx(0.88)          # 0.6 + 0.7 * 0.4
    assert s["ttft_p99_s"] == pytest.approx(0.988)         # 0.6 + 0.97 * 0.4
    assert s["tpot_mean_s"] == pytest.approx((0.1 + 0.2 + 0.25 + 0.5) / 4)
    assert s["e2e_mean_s"] == pytest.approx((1.1 + 1.3 + 1.6 + 2.0) / 4)
    assert s["output_tok_s"] == pytest.approx((11 + 6 + 5 + 3) / 5.0)  # first arrival 0 to last finish 5.0
    assert s["max_submit_lag_s"] == 0


def test_first_token_gaps_between_the_callers_clock_and_the_systems_log():
    records = [record(0, 0.0, 0.10, 1.0, 4), record(1, 0.0, 0.30, 1.0, 4), record(2, 0.0, 0.50, 1.0, 4),
               record(3, 0.0, None, 1.0, 0, expected=4, error="boom")]
    for r, system_first in zip(records, (0.10, 0.28, 0.20, 0.05)):
        r.system_first_token_s = system_first   # gaps 0, 0.02, 0.3 (the failed one is not counted)
    s = summarize_run(records, first_step_s=[0.025, 0.025, 0.25, 0.025])
    assert s["first_token_gap_max_s"] == pytest.approx(0.3)
    assert s["first_token_gaps_over_step"] == 1   # 0.3 s after, for a first step of 0.25 s
    assert summarize_run(records, first_step_s=[0.025, 0.025, 0.4, 0.025])["first_token_gaps_over_step"] == 0
    plain = summarize_run([record(0, 0.0, 0.1, 1.0, 4)], first_step_s=[0.025])  # a system that logs nothing itself
    assert plain["first_token_gap_max_s"] is None and plain["first_token_gaps_over_step"] is None


def test_summarize_run_with_nothing_completed():
    s = summarize_run([record(0, 0.0, None, 1.0, 0, expected=5, error="boom")])
    assert (s["completed"], s["failed"], s["ttft_mean_s"], s["ttft_p99_s"]) == (0, 1, None, None)
    assert s["output_tok_s"] is None


def test_ratios_and_table():
    rows = [sb._make_row("fcfs", 0.8, requests=4, completed=4, failed=0, oom=0, ttft_mean_s=2.0, ttft_p99_s=4.0,
                         output_tok_s=100.0, peak_bytes={"gpu0": 3 << 20}),
            sb._make_row("aqua-host", 0.8, requests=4, completed=4, failed=0, oom=0, ttft_mean_s=0.5, ttft_p99_s=1.0,
                         output_tok_s=95.0, peak_bytes={"gpu0": 1 << 20, "gpu1": 0, "host": 2 << 20},
                         outputs_identical=True),
            sb._make_row("aqua-peer", 0.8, skipped="needs 2 GPUs")]
    sb._add_ratios(rows)
    assert (rows[0]["ttft_mean_ratio_to_fcfs"], rows[0]["output_tok_s_ratio_to_fcfs"]) == (1.0, 1.0)
    assert (rows[1]["ttft_mean_ratio_to_fcfs"], rows[1]["ttft_p99_ratio_to_fcfs"]) == (0.25, 0.25)
    assert rows[1]["output_tok_s_ratio_to_fcfs"] == 0.95
    assert rows[2]["ttft_mean_ratio_to_fcfs"] is None
    table = sb.format_table(rows).splitlines()
    assert "peak gpu0" in table[0] and "peak host" in table[0] and "peak gpu1" not in table[0]  # unused tier left out
    assert "aqua-peer    0.8  skipped: needs 2 GPUs" in table[4]
    assert table[3].split()[-4:] == ["0.25", "0.25", "0.95", "yes"]


def test_ratios_pair_with_fcfs_of_the_same_load_and_round():
    def row(system, round_no, ttft, tok_s, **fields):
        return sb._make_row(system, 0.8, round_no, requests=4, completed=4, failed=0, oom=0, ttft_mean_s=ttft,
                            ttft_p99_s=2 * ttft if ttft else None, output_tok_s=tok_s, **fields)

    rows = [row("fcfs", 1, 2.0, 100.0), row("aqua-host", 1, 0.5, 90.0),
            row("fcfs", 2, 4.0, 50.0), row("aqua-host", 2, 0.5, 60.0),   # the machine ran slower in round 2
            row("fcfs", 3, None, None, skipped="out of time"), row("aqua-host", 3, 0.5, 70.0),
            row("aqua-peer", 1, None, None, skipped="needs 2 GPUs")]
    sb._add_ratios(rows)
    assert [(r["round"], r["ttft_mean_ratio_to_fcfs"], r["ttft_p99_ratio_to_fcfs"], r["output_tok_s_ratio_to_fcfs"])
            for r in rows if r["system"] == "aqua-host"] == [(1, 0.25, 0.25, 0.9), (2, 0.125, 0.125, 1.2),
                                                              (3, None, None, None)]
    paired = sb._paired_ratios(rows)
    assert paired == [{"system": "aqua-host", "load": 0.8,
                       "rounds": [{"round": 1, "ttft_mean_ratio": 0.25, "ttft_p99_ratio": 0.25, "output_tok_s_ratio": 0.9},
                                  {"round": 2, "ttft_mean_ratio": 0.125, "ttft_p99_ratio": 0.125,
                                   "output_tok_s_ratio": 1.2},
                                  {"round": 3, "ttft_mean_ratio": None, "ttft_p99_ratio": None,
                                   "output_tok_s_ratio": None}],
                       "median_ttft_mean_ratio": 0.1875, "median_ttft_p99_ratio": 0.1875,
                       "median_output_tok_s_ratio": 1.05}]  # aqua-peer: no paired round, left out
    table = sb.format_table(rows).splitlines()
    assert table[0].split()[:3] == ["system", "load", "round"]
    assert table[2].split()[:3] == ["fcfs", "0.8", "1"] and table[5].split()[:3] == ["aqua-host", "0.8", "2"]
    assert table[7].startswith("aqua-host    0.8     3     4/4") and table[7].split()[-4:] == ["-", "-", "-", "-"]
    assert "fcfs         0.8     3  skipped: out of time" in table
    assert table[-1] == ("aqua-host    0.8  ttft x 0.25 0.12 - -> 0.19; p99 x 0.25 0.12 - -> 0.19; "
                         "tok/s x 0.90 1.20 - -> 1.05")
    one_round = sb.format_table(rows[:2]).splitlines()
    assert "round" not in one_round[0] and not any("paired" in line for line in one_round)


def test_budget_fits_every_round():
    service = ServiceModel(first_token_s=0.1, prefill_s_per_token=0.0, decode_s_per_token=0.01)
    requests = requests_at([float(i) for i in range(20)])

    def kept(rounds, budget_s):
        bench = SimpleNamespace(options=SimpleNamespace(budget_s=budget_s), requests=list(requests),
                                prompts=list(range(20)), log=lambda message: None)
        sb._fit_budget(bench, service, 2, [0.5, 0.9], keep=2, rounds=rounds)
        assert len(bench.prompts) == len(bench.requests)
        return len(bench.requests)

    budget = sb._estimate_replays_s(service, requests[:6], 2, [0.5, 0.9], rounds=3)
    assert budget == 3 * sb._estimate_replays_s(service, requests[:6], 2, [0.5, 0.9], rounds=1)
    assert kept(3, budget) == 6
    assert kept(1, budget) > 6 and kept(1, budget / 3) == 6


def test_budget_keeps_a_second_arrival_time_after_a_burst():
    """Mooncake's first bucket holds 10 requests at one instant: a budget that would keep fewer
    keeps the first request of the next bucket too (one instant has no arrival rate)."""
    service = ServiceModel(first_token_s=0.1, prefill_s_per_token=0.0, decode_s_per_token=0.01)
    requests = requests_at([0.0] * 10 + [3.0] * 6)
    bench = SimpleNamespace(options=SimpleNamespace(budget_s=1e-3), requests=list(requests),
                            prompts=list(range(16)), log=lambda message: None)
    sb._fit_budget(bench, service, 2, [0.8], keep=3)
    assert [r.arrival_s for r in bench.requests] == [0.0] * 10 + [3.0]
    window_rate(bench.requests)  # replayable


# --------------------------------------------------------------------------------------
# The systems on a tiny model (CPU)


def tiny_options(tmp_path, **overrides) -> sb.BenchOptions:
    settings = dict(trace=EXCERPT_NAME, model="tiny", device="cpu", max_requests=10, max_prompt=24, max_output=10,
                    loads=(0.9,), budget_s=None, out_dir=tmp_path, plots=False)
    settings.update(overrides)
    return sb.BenchOptions(**settings)


def test_every_system_serves_every_request_exactly(tmp_path):
    result = sb.run_benchmark(tiny_options(tmp_path), sb.Log(stream=open(os.devnull, "w")))
    assert result.ok, result.mismatches
    rows = {row["system"]: row for row in result.rows}
    assert list(rows) == [s.value for s in sb.System]
    assert rows["aqua-peer"]["skipped"] == "needs 2 CUDA GPUs; this machine has none"
    for name in ("fcfs", "threads", "aqua-host", "hf-cb"):
        row = rows[name]
        assert (row["requests"], row["completed"], row["failed"]) == (10, 10, 0), row
        assert row["outputs_checked"] == 3 and row["outputs_identical"] is True
        for field in ("ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_mean_s", "e2e_mean_s",
                      "output_tok_s", "ttft_mean_ratio_to_fcfs", "ttft_p99_ratio_to_fcfs",
                      "output_tok_s_ratio_to_fcfs"):
            assert row[field] is not None and row[field] > 0, (name, field)
    assert rows["aqua-host"]["num_slices"] >= 10  # every request ran at least one slice
    assert rows["aqua-host"]["scheduler_cpu_us_per_step"] > 0  # the scheduler's own cost, next to the step's
    for name in ("aqua-host", "hf-cb"):  # they log first tokens themselves: compared with the caller's clock
        assert rows[name]["first_token_gap_max_s"] is not None  # below 0 where the put comes before the log
    for name in ("fcfs", "threads"):
        assert rows[name]["first_token_gap_max_s"] is None
    first_tokens = {run["system"]: [r["first_token_s"] - r["arrival_s"] for r in run["records"]] for run in result.runs}
    assert all(t is not None and t > 0 for times in first_tokens.values() for t in times)
    written = json.loads(Path(result.files["results"]).read_text())
    assert [r["system"] for r in written] == list(rows)
    assert all(r["round"] == 1 for r in written) and "paired_ratios" not in result.meta
    trace = read_trace(rows["aqua-host"]["trace_file"])
    assert {e.context for e in trace.events if e.kind.value == "prompt_arrived"} == {
        f"aqua-host@0.9-r{r['id']}" for r in result.meta["requests"]}


def test_static_cache_runs_and_the_plain_transformers_reference_steps(tmp_path):
    """--cache static: every generate-based system uses a static cache of the same bucketed
    length (plain calls: transformers' StaticCache; aqua: one per prompt, in its context),
    outputs equal their solo runs; hf-cb says the option does not apply; each cache length
    is called once before anything is timed (the first-call cost). Every run prints plain
    transformers' eager and static-cache steps for the same model and prompt, and says
    deterministic mode is off."""
    lines: list[str] = []

    class Capture(sb.Log):
        def __call__(self, message: str = "") -> None:
            lines.append(message)
            super().__call__(message)

    result = sb.run_benchmark(tiny_options(tmp_path, cache="static", check=2),
                              Capture(stream=open(os.devnull, "w")))
    assert result.ok, result.mismatches
    rows = {row["system"]: row for row in result.rows}
    for name in ("fcfs", "threads", "aqua-host", "hf-cb"):
        assert rows[name]["completed"] == 10 and rows[name]["outputs_identical"] is True, rows[name]
    assert rows["hf-cb"]["notes"] == ["--cache static does not apply: continuous batching keeps its own paged cache"]
    steps = result.meta["reference_steps"]
    assert steps["eager_ms_per_step"] > 0 and steps["static_ms_per_step"] > 0
    assert steps["attn"] == "aqua_sdpa" and steps["static_aqua_sdpa_ms_per_step"] > 0  # --attn's, beside sdpa's
    assert list(result.meta["static_warmup_s"]) == ["256"] and result.meta["static_warmup_s"]["256"] > 0
    assert result.meta["kernels"] == {"deterministic": False, "cache": "static"}
    assert any(line.startswith("kernels: as users run them (no deterministic mode); KV cache: static") for line in lines)
    assert any(line.startswith("plain transformers, same model, r") and "ms per step eager" in line for line in lines)
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_runs_are_said_and_the_mode_is_put_back(tmp_path):
    result = sb.run_benchmark(tiny_options(tmp_path, systems=["fcfs"], check=1, max_requests=4, min_requests=2),
                              sb.Log(stream=open(os.devnull, "w")))
    assert result.meta["kernels"]["deterministic"] is False
    result = sb.run_benchmark(tiny_options(tmp_path, systems=["fcfs"], check=1, max_requests=4, min_requests=2,
                                           deterministic=True), sb.Log(stream=open(os.devnull, "w")))
    assert result.meta["kernels"]["deterministic"] is True and result.ok
    assert not torch.are_deterministic_algorithms_enabled()  # as it was before the run


def test_outputs_that_differ_from_solo_runs_are_mismatches(tmp_path, monkeypatch):
    real_solo = sb._solo

    def wrong_solo(bench, i):
        ttft, total, ids = real_solo(bench, i)
        return ttft, total, [(t + 1) % bench.model.config.vocab_size for t in ids]

    monkeypatch.setattr(sb, "_solo", wrong_solo)
    result = sb.run_benchmark(tiny_options(tmp_path, systems=["fcfs", "hf-cb"], check=2),
                              sb.Log(stream=open(os.devnull, "w")))
    assert not result.ok
    assert len(result.mismatches) == 2 and all(m.startswith("fcfs load 0.9 request r") for m in result.mismatches)
    hf_cb = next(row for row in result.rows if row["system"] == "hf-cb")
    assert hf_cb["outputs_identical"] is False and hf_cb["exact_expected"] is False  # recorded, not an error


def test_rounds_run_every_system_in_turn_and_pair_ratios_within_a_round(tmp_path):
    options = tiny_options(tmp_path, systems=["fcfs", "aqua-host"], loads=(0.5, 0.9), rounds=2, max_requests=6,
                           check=2, min_requests=4, plots=True)
    log = sb.Log(stream=open(os.devnull, "w"))
    result = sb.run_benchmark(options, log)
    assert result.ok, result.mismatches
    # Each load: round 1 (every system), then round 2 (every system).
    assert [(r["load"], r["round"], r["system"]) for r in result.rows] == [
        (load, round_no, system) for load in (0.5, 0.9) for round_no in (1, 2) for system in ("fcfs", "aqua-host")]
    assert [(run["load"], run["round"], run["system"]) for run in result.runs] == [
        (r["load"], r["round"], r["system"]) for r in result.rows]
    fcfs = {(r["load"], r["round"]): r for r in result.rows if r["system"] == "fcfs"}
    for row in result.rows:
        assert (row["completed"], row["failed"], row["outputs_identical"]) == (6, 0, True), row
        base = fcfs[row["load"], row["round"]]
        for field, ratio in (("ttft_mean_s", "ttft_mean_ratio_to_fcfs"), ("ttft_p99_s", "ttft_p99_ratio_to_fcfs"),
                             ("output_tok_s", "output_tok_s_ratio_to_fcfs")):
            assert row[ratio] == round(row[field] / base[field], 4), (row["system"], row["load"], row["round"], ratio)
    # Paired ratios: per (system, load) other than fcfs, each round's ratios and their median.
    assert result.meta["rounds"] == 2
    paired = result.meta["paired_ratios"]
    assert [(p["system"], p["load"]) for p in paired] == [("aqua-host", 0.5), ("aqua-host", 0.9)]
    for entry in paired:
        rows = [r for r in result.rows if (r["system"], r["load"]) == (entry["system"], entry["load"])]
        assert [r["round"] for r in entry["rounds"]] == [1, 2]
        for short, ratio in (("ttft_mean_ratio", "ttft_mean_ratio_to_fcfs"), ("ttft_p99_ratio", "ttft_p99_ratio_to_fcfs"),
                             ("output_tok_s_ratio", "output_tok_s_ratio_to_fcfs")):
            assert [r[short] for r in entry["rounds"]] == [r[ratio] for r in rows]
            assert entry[f"median_{short}"] == round(statistics.median(r[ratio] for r in rows), 4)
    # One aqua trace per run (the round in the file name), tagged with the round's label.
    trace_files = [r["trace_file"] for r in result.rows if r["system"] == "aqua-host"]
    assert [Path(f).name for f in trace_files] == [
        f"{Path(result.files['results']).stem}-trace-aqua-host-load{load}-round{n}.json"
        for load in (0.5, 0.9) for n in (1, 2)]
    trace = read_trace(trace_files[1])
    assert {e.context for e in trace.events if e.kind.value == "prompt_arrived"} == {
        f"aqua-host@0.5#2-r{r['id']}" for r in result.meta["requests"]}
    # The table, the files and the plots.
    table = sb.format_table(result.rows)
    assert "paired ratios to fcfs (same load, same round)" in table
    assert sum(line.startswith("aqua-host    0.5  ttft x") for line in table.splitlines()) == 1
    files = sb.write_results(result, tmp_path, log)
    assert json.loads(Path(files["meta"]).read_text())["paired_ratios"] == paired
    assert Path(files["ttft_plot"]).stat().st_size > 0
    assert Path(files["trace_plot aqua-host"]).name.endswith("-trace-aqua-host-load0.9-round2.png")


def test_rounds_below_one_are_refused(tmp_path):
    with pytest.raises(BenchInputError, match="--rounds=0: must be a whole number, at least 1"):
        sb.run_benchmark(tiny_options(tmp_path, rounds=0), sb.Log(stream=open(os.devnull, "w")))


@pytest.mark.parametrize("system", ["fcfs", "threads", "aqua-host", "hf-cb"])
def test_a_run_past_its_deadline_stops_and_counts_failures(tmp_path, system):
    """Deadline 0: whatever has not finished when the last request arrives fails; nothing hangs."""
    model = sb.build_model("tiny", torch.device("cpu"))
    requests = [Request(i, float(i), 16, 1000, 16, 1000) for i in range(4)]
    prompts = [torch.randint(1, 512, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    bench = sb._Bench(tiny_options(tmp_path), sb.Log(stream=open(os.devnull, "w")), model, torch.device("cpu"),
                      requests, prompts, kv_budget=4 << 20, out_dir=tmp_path, stem="deadline")
    row, records = sb._run_one(bench, sb.System(system), 1.0, [0.0] * 4, 0.0, 1.0, {}, [])
    assert row["skipped"] is None and row["requests"] == 4
    assert row["failed"] >= 1 and row["completed"] + row["failed"] == 4
    assert all(r.error for r in records if not r.completed)


# --------------------------------------------------------------------------------------
# Command lines


def load_bench_cli():
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "benchmarks" / "bench_serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Bad arguments of bench_serve.py and the start of the message that refuses each.
BAD_ARGUMENTS = [
    (["--trace", "nope"], "--trace='nope': not a known trace"),
    (["--loads", "0.5,fast"], "--loads='0.5,fast': 'fast' is not a number"),
    (["--systems", "fcfs,tgi"], "--systems='fcfs,tgi': unknown 'tgi'"),
    (["--trace", "conv-excerpt", "--window-start", "5000"], "--window-start=5000 --window-s=60: no request"),
    (["--kv-budget", "lots"], "--kv-budget='lots': not a size"),
    (["--rounds", "0"], "--rounds=0: must be a whole number, at least 1"),
    (["--switch-overhead", "2"], "--switch-overhead=2.0: a share of a slice between 0 and 1"),
    (["--cache", "paged"], "argument --cache: invalid choice: 'paged'"),
]


@pytest.mark.parametrize("args, text", BAD_ARGUMENTS)
def test_bench_cli_bad_inputs_exit_2_naming_the_argument(args, text, capsys, tmp_path):
    cli = load_bench_cli()
    with pytest.raises(SystemExit) as info:
        cli.main([*args, "--device", "cpu", "--model", "tiny", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert text in capsys.readouterr().err


_REFUSAL = """
import os, runpy, sys
sys.argv = ["bench_serve.py", *{args!r}]
sys.path.insert(0, os.path.dirname({script!r}))  # as running the script does
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    print("exit", e.code, "torch imported:", "torch" in sys.modules, "transformers imported:",
          "transformers" in sys.modules)
"""


@pytest.mark.parametrize("args, text", BAD_ARGUMENTS + [
    (["--check", "0"], "--check=0: at least one request must run alone"),
    (["--model", "gpt5"], "argument --model: invalid choice: 'gpt5'"),
])
def test_bench_cli_refuses_bad_arguments_before_importing_torch(args, text, tmp_path):
    script = str(REPO / "benchmarks" / "bench_serve.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUA_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", _REFUSAL.format(args=[*args, "--out", str(tmp_path)], script=script)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout == "exit 2 torch imported: False transformers imported: False\n", proc.stderr
    assert text in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cpu_defaults_to_the_tiny_model_and_a_gpu_to_llama_1b():
    plan = sb._resolve(sb.BenchOptions(device="cpu"))
    assert (plan.model, plan.model_is_default, plan.kv_budget, plan.max_prompt) == ("tiny", True, 4 * 2**20, 64)
    assert sb._resolve(sb.BenchOptions(device="cpu", model="llama-1b")).model == "llama-1b"  # asked for: kept
    checked = check_options(sb.BenchOptions(), "cuda")
    assert (checked.model, checked.kv_budget, checked.max_prompt) == ("llama-1b", 128 * 2**20, 2048)


def test_no_out_of_memory_warning_on_cpu_where_nothing_is_capped(tmp_path):
    stream = io.StringIO()
    sb.run_benchmark(tiny_options(tmp_path, model=None, kv_budget="1KiB", systems=["fcfs"], budget_s=1e-3),
                     sb.Log(stream=stream))
    log = stream.getvalue()
    assert "model tiny: the default on CPU, where llama-1b takes seconds per request (--model to choose)" in log
    assert "; on CPU nothing is capped (fcfs and threads) or parked (aqua)" in log
    assert "WARNING" not in log and "run out of memory" not in log


def test_runs_that_would_overrun_the_budget_are_skipped_not_started(tmp_path):
    result = sb.run_benchmark(tiny_options(tmp_path, systems=["fcfs", "aqua-host"], loads=(0.5, 0.9), budget_s=1e-3),
                              sb.Log(stream=open(os.devnull, "w")))
    assert len(result.rows) == 4 and not result.runs and result.ok
    assert all(row["skipped"] == "out of time: too little left of 1.5 x --budget-s for a replay" for row in result.rows)
    assert len(result.meta["requests"]) == 8  # trimmed to --min-requests by the budget
    result = sb.run_benchmark(tiny_options(tmp_path, systems=["fcfs", "aqua-host"], loads=(0.5,), budget_s=1e-3,
                                           rounds=2), sb.Log(stream=open(os.devnull, "w")))
    assert [(row["round"], row["system"]) for row in result.rows] == [
        (1, "fcfs"), (1, "aqua-host"), (2, "fcfs"), (2, "aqua-host")]
    assert all(row["skipped"] for row in result.rows) and result.meta["paired_ratios"] == []
