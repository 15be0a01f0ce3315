"""Bad input from files and the command line, as properties (hypothesis).

- The trace reader, given a file: wrong JSON types anywhere, truncation anywhere, bytes
  that are not text, pathological JSON. It returns a trace or raises TraceFormatError,
  whose message starts with the file's name and then says where ("metadata.events[3].bytes").
- Anything the reader accepts, ``trace summarize`` (text and JSON) and ``trace plot`` turn
  into output without a traceback.
- ``python -m aqua_alloc`` with random arguments (``cli.main(argv)`` in process): a usage
  error exits 2 with argparse's usage line, a failure returns 1 with one line on stderr;
  nothing else escapes. (The daemon ``coordinator`` and the ``demo`` never start: they get
  arguments that must be refused.)

test_trace.py already fuzzes the reader in memory (random JSON, bytes, truncation,
mutations): these go through files and through the consumers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqua_alloc import cli
from aqua_alloc.obs import trace_reader, trace_writer
from aqua_alloc.obs.events import Event, EventKind
from aqua_alloc.obs.trace_format import TraceFormatError
from aqua_alloc.obs.summary import format_summary, summarize

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "small_trace.json"

FUZZ = settings(max_examples=150, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much])

# Where an error may point, after "<file>: ".
PLACE = r"(top level|metadata(\.[A-Za-z_]+)?(\[\d+\])?(\.[A-Za-z_]+)?|traceEvents(\[\d+\](\.[A-Za-z_]+)?)?)"


def valid_doc() -> dict:
    return json.loads(FIXTURE.read_text())


def _places(obj, path=()):
    """Every (path, value) inside a JSON document."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _places(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _places(v, path + (i,))


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {type(None): "null", str: "string", list: "list", dict: "object"}[type(value)]


OTHER_VALUES = [None, True, False, 0, -1, 1.5, -0.0, 2**64, "", "x", "gpu0", [], [1, "a"], {}, {"a": 1}]


def _read_file(tmp_path: Path, data: bytes | str, name: str = "fuzz.json") -> tuple[Path, object]:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    try:
        return path, trace_reader.read_trace(path)
    except TraceFormatError as exc:
        return path, exc


def assert_names_file_and_place(path: Path, exc: TraceFormatError) -> None:
    message = str(exc)
    prefix = f"{path}: "
    assert message.startswith(prefix), message
    rest = message[len(prefix):]
    assert (re.match(PLACE + r": \S", rest) or rest.startswith(("not valid JSON", "empty file", "not UTF-8"))), message


# ==========================================================================================
# The reader, through files.


@FUZZ
@given(data=st.data())
def test_wrong_type_anywhere_is_refused_naming_file_and_field(tmp_path, data):
    doc = valid_doc()
    places = [(p, v) for p, v in _places(doc) if p]
    path, value = data.draw(st.sampled_from(places))
    replacement = data.draw(st.sampled_from([v for v in OTHER_VALUES if _json_type(v) != _json_type(value)]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = replacement
    file, got = _read_file(tmp_path, json.dumps(doc))
    if isinstance(got, TraceFormatError):
        assert_names_file_and_place(file, got)
        return
    # Accepted: the change was in a place the reader does not check (a trace event's args,
    # an event's args dict, the writer's info...). Its consumers must cope.
    summarize(got)
    format_summary(summarize(got))


@FUZZ
@given(cut=st.integers(0, 10**9), strip=st.booleans())
def test_truncated_file_says_so(tmp_path, cut, strip):
    text = FIXTURE.read_text()
    body = text.rstrip()
    cut %= len(body)
    file, got = _read_file(tmp_path, text[:cut].rstrip() if strip else text[:cut])
    assert isinstance(got, TraceFormatError), f"a trace cut at {cut} of {len(body)} was accepted"
    assert str(got).startswith(f"{file}: "), str(got)
    # (Most cuts get the hint "(truncated?)"; one inside a number such as "90000." does not.)
    assert "empty file" in str(got) or "not valid JSON" in str(got), str(got)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_naming_the_file(tmp_path, data):
    file, got = _read_file(tmp_path, data)
    assert isinstance(got, TraceFormatError)
    assert_names_file_and_place(file, got)


@pytest.mark.parametrize("data, message", [
    (b"\xef\xbb\xbf" + FIXTURE.read_bytes(), "not valid JSON"),            # a UTF-8 byte order mark
    (b"[" * 50_000 + b"]" * 50_000, "not valid JSON: nested too deeply"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "not valid JSON: nested too deeply"),
    (b'{"traceEvents": [], "metadata": {"format": Infinity}}', "not valid JSON: Infinity"),
    (b'{"traceEvents": [], "metadata": {"format": -Infinity}}', "not valid JSON"),
    (FIXTURE.read_bytes().replace(b'"version":1', b'"version":99'), "metadata.version: version 99 is newer"),
    (FIXTURE.read_bytes().replace(b'"version":1', b'"version":1.0'), "metadata.version: expected an integer"),
    (FIXTURE.read_bytes().replace(b'"format":"aqua_alloc.trace"', b'"format":"chrome"'),
     "metadata.format: expected 'aqua_alloc.trace'"),
    (FIXTURE.read_bytes() + b"{}", "not valid JSON: Extra data"),
    (b"\x00" * 64, "not valid JSON"),
    (b"\xff" * 64, "not UTF-8 text (byte 0)"),
])
def test_pathological_files(tmp_path, data, message):
    file, got = _read_file(tmp_path, data)
    assert isinstance(got, TraceFormatError), got
    assert str(got).startswith(f"{file}: ") and message in str(got), str(got)


def test_duplicate_keys_take_the_last_value(tmp_path):
    """JSON objects with a key twice: the last wins (Python's json); still validated."""
    text = FIXTURE.read_text().replace('"version":1', '"version":1,"version":"one"', 1)
    file, got = _read_file(tmp_path, text)
    assert isinstance(got, TraceFormatError) and "metadata.version: expected an integer" in str(got), got


# ==========================================================================================
# What the reader accepts, its consumers turn into output.

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)  # any text but surrogates
events = st.lists(st.builds(
    Event,
    t_ns=st.integers(0, 2**64 - 1),
    kind=st.sampled_from(list(EventKind)),
    context=st.none() | names,
    src=st.none() | st.sampled_from(["gpu0", "gpu1", "host"]) | names,
    dst=st.none() | st.sampled_from(["gpu0", "gpu1", "host"]) | names,
    bytes=st.integers(0, 2**64 - 1),
    dur_ns=st.integers(0, 2**64 - 1),
    status=st.integers(-2**31, 2**31 - 1),
    args=st.dictionaries(names, st.integers(-2**63, 2**64) | names | st.none(), max_size=2),
), max_size=25)


@settings(FUZZ, max_examples=80)
@given(events)
def test_any_written_trace_is_summarized_by_the_cli(tmp_path, capsys, evs):
    path = trace_writer.write_trace(tmp_path / "t.json", evs)
    code, out, err = run_cli(["trace", "summarize", str(path)], capsys)
    assert code == 0 and out and not err, err
    code, out, err = run_cli(["trace", "summarize", str(path), "--json"], capsys)
    assert code == 0 and not err, err
    assert isinstance(json.loads(out), dict)


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
@settings(FUZZ, max_examples=8)
@given(events)
def test_any_written_trace_is_plotted(tmp_path, capsys, evs):
    pytest.importorskip("matplotlib")
    path = trace_writer.write_trace(tmp_path / "t.json", evs)
    out = tmp_path / "t.png"
    assert cli.main(["trace", "plot", str(path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ==========================================================================================
# The command line.

_FILES = ["FIXTURE", "MISSING", "DIR", "BAD", "EMPTY", "TRUNCATED"]
_WORDS = ["info", "trace", "summarize", "summarise", "plot", "--json", "-o", "--output", "OUT", "--help", "-h",
          "--bogus", "-x", "", "-", "--", "=", "info=1", "--json=1", *_FILES]


def _materialize(argv: list[str], tmp_path: Path) -> list[str]:
    files = {
        "FIXTURE": str(FIXTURE), "MISSING": str(tmp_path / "missing.json"), "DIR": str(tmp_path),
        "BAD": str(tmp_path / "bad.json"), "EMPTY": str(tmp_path / "empty.json"),
        "TRUNCATED": str(tmp_path / "truncated.json"), "OUT": str(tmp_path / "out" / "x.png"),
    }
    (tmp_path / "bad.json").write_text('{"traceEvents": 5}')
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "truncated.json").write_text(FIXTURE.read_text()[:777])
    return [files.get(a, a) for a in argv]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@settings(FUZZ, max_examples=200)
@given(st.lists(st.one_of(st.sampled_from(_WORDS), st.text(max_size=6)), max_size=6))
def test_random_arguments_never_give_a_traceback(tmp_path, capsys, words):
    argv = _materialize(words, tmp_path)
    if argv and argv[0] in ("coordinator", "demo"):
        argv.append("--no-such-option")  # those would run for long: they must be refused
    code, out, err = run_cli(argv, capsys)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 2:
        assert "usage: aqua-alloc" in err and "error:" in err, err
    elif code == 1:
        lines = err.splitlines()
        if argv[:1] == ["info"]:
            return  # info reports what it could not see in its output, not as an error line
        assert len(lines) == 1 and lines[0].startswith("aqua-alloc: error: "), err
    else:
        assert code == 0, (argv, code, err)


@pytest.mark.parametrize("argv, code, text", [
    (["coordinator", "--reclaim-timeout", "abc"], 2, "invalid float value: 'abc'"),
    (["coordinator", "--reclaim-timeout", "-1"], 1, "--reclaim-timeout=-1.0: must be > 0 seconds"),
    (["coordinator", "--reclaim-timeout", "0"], 1, "must be > 0 seconds"),
    (["coordinator", "--reclaim-timeout", "nan"], 1, "must be > 0 seconds"),
    (["coordinator", "--log-level", "loud"], 2, "invalid choice: 'loud'"),
    (["demo", "--device", "tpu"], 2, "invalid choice: 'tpu'"),
    (["demo", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["trace", "plot", "FIXTURE", "-o"], 2, "expected one argument"),
    (["trace", "summarize", "FIXTURE", "FIXTURE"], 2, "unrecognized arguments"),
    (["trace", "summarize", "TRUNCATED"], 1, "not valid JSON (truncated?)"),
    (["trace", "summarize", "BAD"], 1, "traceEvents: expected a list, got int"),
    (["trace", "plot", "FIXTURE", "-o", "OUT"], 1, "cannot write"),
])
def test_bad_arguments_of_each_command(tmp_path, capsys, argv, code, text):
    got, out, err = run_cli(_materialize(argv, tmp_path), capsys)
    if "plot" in argv and code == 1:
        pytest.importorskip("matplotlib")
    assert got == code, (got, err)
    assert text in err and "Traceback" not in err, err
    if code == 1:
        assert err.count("\n") == 1 and err.startswith("aqua-alloc: error: "), err


# ==========================================================================================
# Known bugs (aqua_alloc/obs/trace_reader.py; obs/summary.py, obs/plot.py, cli.py).


def _doc_with(mutate) -> str:
    doc = valid_doc()
    mutate(doc)
    return json.dumps(doc)


def _set_move_bytes(doc: dict, value: int) -> None:
    for row in doc["metadata"]["events"]:
        if row[1] == "move_end":
            row[5] = value


def _set_context(doc: dict, value: str) -> None:
    doc["metadata"]["events"][1][2] = value


@pytest.mark.parametrize("command", [["summarize"], ["summarize", "--json"], ["plot", "-o", "OUT"]])
def test_integers_beyond_64_bits_are_refused_or_summarized(tmp_path, capsys, command):
    (tmp_path / "big.json").write_text(_doc_with(lambda d: _set_move_bytes(d, 10**400)))
    argv = ["trace", command[0], str(tmp_path / "big.json"), *_materialize(command[1:], tmp_path)]
    (tmp_path / "out").mkdir(exist_ok=True)
    try:
        code, out, err = run_cli(argv, capsys)
    except Exception as exc:  # noqa: BLE001 - the bug: it escapes
        raise AssertionError(f"{type(exc).__name__}: {exc}") from None
    assert code in (0, 1) and "Traceback" not in err, err


@pytest.mark.parametrize("command", [["summarize"], ["plot", "-o", "OUT"]])
def test_lone_surrogates_are_refused_or_shown(tmp_path, command):
    path = tmp_path / "surrogate.json"
    path.write_text(_doc_with(lambda d: _set_context(d, "\ud800a")))  # json.dumps escapes it: valid JSON
    (tmp_path / "out").mkdir(exist_ok=True)
    argv = ["trace", command[0], str(path), *_materialize(command[1:], tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQUA_")}
    env.update(PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "aqua_alloc", *argv], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0 or proc.stderr.startswith("aqua-alloc: error: "), proc.stderr
