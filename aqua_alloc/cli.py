"""The command line: ``python -m aqua_alloc`` (installed as ``aqua-alloc``).

    aqua-alloc info [--json]                  GPUs, peer access / NVLink, memory, settings
    aqua-alloc trace summarize FILE [--json]  numbers from a trace (AQUA_TRACE=FILE)
    aqua-alloc trace plot FILE -o OUT.png     bytes per tier and context residency over time
                                              (-o's suffix chooses PNG, SVG or PDF)
    aqua-alloc demo [--device cuda|cpu] [--out DIR]
                                              a minute of a real trace served two ways: one
                                              request at a time (fcfs), and aqua_alloc's scheduler
    aqua-alloc coordinator [--socket PATH]    the per-server daemon for lending between processes

Errors exit non-zero with one line on stderr, never a traceback: 1 for a file that cannot
be read or is not a valid trace, 2 for bad arguments (argparse's usage line and message).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "collect_info", "format_info"]

PROG = "aqua-alloc"


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _gib(num_bytes: int | None) -> str:
    return "?" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


# --------------------------------------------------------------------------------------
# info


def collect_info() -> tuple[dict[str, Any], bool]:
    """What ``info`` reports, as JSON-ready data, and whether everything could be read.
    Never raises: what cannot be seen goes into ``notes``."""
    info: dict[str, Any] = {
        "gpus": [], "peer_access": [], "nvlink": [],
        "host_total_bytes": None, "host_available_bytes": None,
        "settings": None, "plan": None, "coordinator": None, "notes": [],
    }
    ok = True
    topo = settings = config = None
    try:
        topology = importlib.import_module("aqua_alloc.memory.topology")
        topo = topology.discover()
        info["gpus"] = [
            {"index": int(g.index), "name": str(g.name),
             "total_bytes": int(g.total_bytes), "free_bytes": int(g.free_bytes)}
            for g in topo.gpus
        ]
        info["peer_access"] = [[bool(x) for x in row] for row in topo.peer_access]
        info["nvlink"] = [[bool(x) for x in row] for row in topo.nvlink]
        info["host_total_bytes"] = int(topo.host_total_bytes)
        info["host_available_bytes"] = int(topo.host_available_bytes)
        info["notes"].extend(str(n) for n in topo.notes)
    except ImportError as e:
        topo = None
        info["notes"].append(f"topology discovery is not available: {e}")
    except Exception as e:  # report, do not crash: info is what one runs when things go wrong
        topo = None
        info["notes"].append(f"topology discovery failed: {type(e).__name__}: {e}")
        ok = False
    try:
        config = importlib.import_module("aqua_alloc.memory.config")
        settings = config.Settings.from_env()
        info["settings"] = json.loads(json.dumps(settings.describe(), default=str))
    except ImportError as e:
        info["notes"].append(f"settings are not available: {e}")
    except Exception as e:   # an invalid AQUA_* variable: enable() would refuse it too
        settings = None
        info["notes"].append(f"AQUA_* settings are invalid: {type(e).__name__}: {e}")
        ok = False
    if topo is not None and settings is not None and hasattr(config, "resolve"):
        try:
            info["plan"] = _plan(config, settings, info)
        except Exception as e:   # budgets that do not fit this machine
            info["notes"].append(f"budgets do not fit this machine: {type(e).__name__}: {e}")
            ok = False
    info["coordinator"] = _coordinator_info()
    return info, ok


def _coordinator_info() -> dict[str, Any]:
    """The ledger of the coordinator at $AQUA_COORDINATOR (or the default socket), asked
    with a short timeout. No coordinator is not a failure: lending between processes is
    optional."""
    from aqua_alloc.coordinator import protocol as proto
    path = proto.socket_path_from_env()
    try:
        return {"socket": path, "ledger": proto.query_ledger(path, timeout=0.5), "error": None}
    except (FileNotFoundError, ConnectionRefusedError):
        return {"socket": path, "ledger": None, "error": None}
    except (OSError, proto.ProtocolError) as e:   # a socket we may not use, a stuck daemon
        return {"socket": path, "ledger": None, "error": f"{type(e).__name__}: {e}"}


def _format_coordinator(coordinator: dict[str, Any] | None) -> list[str]:
    if coordinator is None:
        return []
    ledger = coordinator["ledger"]
    if ledger is None:
        why = f" ({coordinator['error']})" if coordinator["error"] else ""
        return [f"coordinator: no coordinator at {coordinator['socket']}{why}"]
    clients = {c["client"]: c for c in ledger["clients"]}

    def who(client: int | None) -> str:
        c = clients.get(client) if client is not None else None
        return f"pid {c['pid']}" + (f" ({c['name']})" if c["name"] else "") if c else "nobody"

    lines = [f"coordinator at {coordinator['socket']}: {len(ledger['clients'])} processes, "
             f"reclaim timeout {ledger['reclaim_timeout_s']:g} s"]
    for c in ledger["clients"]:
        lines.append(f"  {who(c['client'])}: owns {', '.join(c['gpus']) or 'no GPU'}")
    for g in ledger["gpus"]:
        lines.append(f"  {g['gpu']}: owner {who(g['owner'])}, offers {_gib(g['offer'])}, "
                     f"borrowed {_gib(g['borrowed'])}, available {_gib(g['available'])}")
        for b in g["borrows"]:
            asked = f", {_gib(b['asked'])} asked back" if b["asked"] else ""
            lines.append(f"    {who(b['client'])} holds {_gib(b['held'])}{asked}")
    for r in ledger["reclaims"]:
        state = "timed out" if r["timed_out"] else "pending"
        lines.append(f"  reclaim {r['reclaim']} on {r['gpu']} ({r['reason']}, {state}, {r['age_s']:.1f} s): "
                     f"{_gib(r['bytes'])} asked, {_gib(r['pending'])} not yet given back")
    return lines


def _plan(config: Any, settings: Any, info: dict[str, Any]) -> dict[str, Any]:
    """Budgets and tier order enable() would use, from config.resolve on this machine."""
    total = {g["index"]: g["total_bytes"] for g in info["gpus"]}
    free = {g["index"]: g["free_bytes"] for g in info["gpus"]}
    plan = config.resolve(settings, total, free, info["host_total_bytes"],
                          info["host_available_bytes"])
    gpus = []
    for d in sorted(total):
        # Where a parked context of GPU d may go: itself, NVLink peers, other peers, host.
        peers = [p for p in sorted(total) if p != d and _at(info["peer_access"], d, p)]
        nvlink = [p for p in peers if _at(info["nvlink"], d, p)]
        order = ([f"gpu{d}"] + [f"gpu{p} (NVLink)" for p in nvlink]
                 + [f"gpu{p} (PCIe)" for p in peers if p not in nvlink] + ["host"])
        gpus.append({"index": d, "local_budget_bytes": int(plan.local_budget.get(d, 0)),
                     "lend_bytes": int(plan.lend.get(d, 0)), "tiers": order})
    return {"gpus": gpus, "host_budget_bytes": int(plan.host_budget),
            "host_reserve_bytes": int(plan.host_reserve)}


def _at(matrix: list[list[bool]], i: int, j: int) -> bool:
    return i < len(matrix) and j < len(matrix[i]) and bool(matrix[i][j])


def _matrix(title: str, matrix: list[list[bool]]) -> list[str]:
    lines = [title]
    if not matrix:
        return lines + ["  (none)"]
    names = [f"gpu{i}" for i in range(len(matrix))]
    width = max(len(n) for n in names) + 2
    lines.append(" " * (width + 2) + "".join(f"{n:>{width}}" for n in names))
    for i, row in enumerate(matrix):
        cells = ["-" if i == j else ("yes" if v else "no") for j, v in enumerate(row)]
        lines.append(f"  {names[i]:<{width}}" + "".join(f"{c:>{width}}" for c in cells))
    return lines


def format_info(info: dict[str, Any]) -> str:
    gpus = info["gpus"]
    lines = [f"GPUs: {len(gpus)}"]
    for g in gpus:
        lines.append(f"  gpu{g['index']}  {g['name']:<28}  total {_gib(g['total_bytes']):>12}"
                     f"  free {_gib(g['free_bytes']):>12}")
    lines += _matrix("peer access (row can map column's memory):", info["peer_access"])
    lines += _matrix("NVLink (row to column):", info["nvlink"])
    lines.append(f"host memory: total {_gib(info['host_total_bytes'])}, "
                 f"available {_gib(info['host_available_bytes'])}")
    lines.append("settings enable() would use (from AQUA_* variables):")
    settings = info["settings"]
    if settings is None:
        lines.append("  (not available)")
    elif isinstance(settings, dict):
        for key, value in settings.items():
            shown = value if isinstance(value, str) else json.dumps(value)
            lines.append(f"  {key}: {shown}")
    else:
        lines.append(f"  {json.dumps(settings)}")
    plan = info["plan"]
    if plan is not None:
        lines.append("budgets and tiers enable() would use:")
        for g in plan["gpus"]:
            lines.append(f"  gpu{g['index']}: local budget {_gib(g['local_budget_bytes'])}, "
                         f"lends {_gib(g['lend_bytes'])}; parks to {', '.join(g['tiers'])}")
        lines.append(f"  host: budget {_gib(plan['host_budget_bytes'])}, "
                     f"reserved ahead {_gib(plan['host_reserve_bytes'])}")
    lines += _format_coordinator(info.get("coordinator"))
    if info["notes"]:
        lines.append("notes (what could not be seen, and why):")
        lines += [f"  - {note}" for note in info["notes"]]
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    info, ok = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0 if ok else 1


# --------------------------------------------------------------------------------------
# trace


def _read(path: str) -> Any:
    from aqua_alloc.obs.trace_format import TraceFormatError
    from aqua_alloc.obs.trace_reader import read_trace
    try:
        return read_trace(path)
    except TraceFormatError as e:
        raise CliError(str(e)) from None
    except IsADirectoryError:
        raise CliError(f"cannot read {path}: it is a directory") from None
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None


def _cmd_trace_summarize(args: argparse.Namespace) -> int:
    from aqua_alloc.obs.summary import format_summary, summarize
    summary = summarize(_read(args.file))
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_summary(summary))
    return 0


PLOT_FORMATS = ("png", "svg", "pdf")   # trace plot -o: the suffix chooses one


def _plot_output(text: str) -> str:
    """``trace plot -o``: a file whose suffix names a format matplotlib writes."""
    if Path(text).suffix.lower()[1:] not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r}: its suffix chooses the format; expected "
                                         f"{', '.join('.' + f for f in PLOT_FORMATS)}")
    return text


def _cmd_trace_plot(args: argparse.Namespace) -> int:
    from aqua_alloc.obs.plot import PlotUnavailableError, plot_trace
    trace = _read(args.file)
    try:
        out = plot_trace(trace, args.output)
    except PlotUnavailableError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write {args.output}: {e.strerror or e}") from None
    print(f"wrote {out}")
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from aqua_alloc.coordinator import daemon as coordinator
    try:
        return coordinator.run(args)
    except coordinator.CoordinatorError as e:
        raise CliError(str(e)) from None


def _cmd_demo(args: argparse.Namespace) -> int:
    """A minute of the packaged trace excerpt, served by fcfs and by aqua_alloc's fair
    scheduler (aqua_alloc/demo.py)."""
    try:
        from aqua_alloc import demo
    except ImportError as e:
        raise CliError(f"demo needs torch and transformers ({e}); install them with: "
                       "pip install 'aqua_alloc[hf]'") from None
    try:
        return demo.run(device=args.device, out_dir=args.out)
    except demo.DemoError as e:
        raise CliError(str(e)) from None


# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="aqua_alloc: KV-cache contexts that move between GPUs and host memory.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser("info", help="GPUs, peer access / NVLink, memory, settings")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_cmd_info)

    trace = commands.add_parser("trace", help="read a trace written with AQUA_TRACE=FILE")
    trace_commands = trace.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    summarize = trace_commands.add_parser(
        "summarize", help="time running/parked, bytes moved, TTFT, peak bytes, bandwidth")
    summarize.add_argument("file", metavar="FILE", help="trace JSON file")
    summarize.add_argument("--json", action="store_true", help="machine-readable output")
    summarize.set_defaults(run=_cmd_trace_summarize)
    plot = trace_commands.add_parser(
        "plot", help="picture of bytes per tier and context residency over time (needs matplotlib)")
    plot.add_argument("file", metavar="FILE", help="trace JSON file")
    plot.add_argument("-o", "--output", required=True, metavar="OUT.png", type=_plot_output,
                      help="picture to write: its suffix chooses the format (.png, .svg or .pdf)")
    plot.set_defaults(run=_cmd_trace_plot)

    coordinator = commands.add_parser(
        "coordinator", help="serve the per-server ledger of GPU lending between processes (a daemon)",
        description="One coordinator per server and user: aqua_alloc processes offer, borrow and reclaim "
                    "GPU memory through it (docs/coordinator-protocol.md). Runs until SIGTERM or Ctrl-C.")
    from aqua_alloc.coordinator.daemon import add_arguments
    add_arguments(coordinator)
    coordinator.set_defaults(run=_cmd_coordinator)

    demo = commands.add_parser(
        "demo", help="replay a minute of a real trace: fcfs against aqua_alloc's fair scheduler "
                     "(GPU: contexts parked to host; on CPU a tiny model, scheduling only)")
    demo.add_argument("--device", choices=["cuda", "cpu"], default=None,
                      help="default: cuda when available, else cpu")
    demo.add_argument("--out", metavar="DIR", default=None,
                      help="write demo.json and the aqua run's trace demo-trace.json there, creating DIR "
                           "(default: write nothing)")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (argparse exits 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # e.g. `aqua-alloc trace summarize t.json | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
