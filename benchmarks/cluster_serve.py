"""A server of four to eight GPUs, one process per GPU, started as a user would: a
coordinator, lenders (processes that hold a model and leave memory free) and servers that
park their paused contexts in the lenders' spare memory. Each lender takes memory back in
the middle of the run, once by ``reclaim`` and once by its own allocations growing.

    python benchmarks/cluster_serve.py --servers 0,1 --lenders 2,3 --out benchmarks/results
    python benchmarks/cluster_serve.py --sim --out /tmp/cluster      # CPU: simulated GPUs

What it starts (every process sees the coordinator's socket in ``AQUA_COORDINATOR``):

1. ``python -m aqua_alloc coordinator`` on a private socket.
2. One ``benchmarks/cluster_lender.py`` per lender GPU (``CUDA_VISIBLE_DEVICES`` = that GPU,
   ``AQUA_COORDINATOR_GPUS=0``): it builds ``--lender-model`` there and offers the rest
   elastically (free memory less ``AQUA_LEND_MARGIN``).
3. One server per server GPU, borrowing only (``AQUA_COORDINATOR_GPUS=none``):
   ``benchmarks/bench_serve.py`` with ``--serve-args`` (its fcfs run on the same GPU is the
   baseline; its aqua-peer run parks contexts on the lenders; it checks every output against
   the request run alone and exits 1 when one differs). ``CUDA_VISIBLE_DEVICES`` lists the
   server's GPU first, then the lenders', so that the lenders are its peers. With ``--sim``,
   ``benchmarks/cluster_sim_server.py`` instead: contexts of random bytes on simulated GPUs
   (``AQUA_BACKEND=sim``), checked byte for byte at the end.

The servers' default arguments are the long-context run of issue 20 (the Mooncake trace's
first 16 requests, 8B shape, prompts up to 8,192 tokens, 3 GiB of KV on the server's GPU,
load 0.8, ten requests checked against their solo runs): contexts of up to 1 GiB, several
parked at once, so gigabytes go to the lenders.

While the servers run, the ledger is read every ``--sample-s`` seconds, and one thread per
lender waits until servers hold at least ``--trigger`` bytes of its GPU (on CUDA, bytes
their contexts use there, from the lender's free memory; on the simulated backend, where a
lender cannot see other processes' memory, bytes granted), then has it reclaim everything
borrowed; after ``--gap-s``, and once servers hold its memory again, it grows its own
allocations past its margin by what servers hold there (its client's policy rounds reclaim
until the margin is free again), holds them ``--hold-s``, and frees them. A reclaim
reports the seconds until the borrowers confirmed and, on CUDA, until their bytes had left
the GPU; a growth, every reclaim it caused and the seconds until the margin was free. The
coordinator's log shows whether each server gave everything back before it left.

Writes ``<name>.json`` under ``--out`` (default name ``cluster_serve-<n>gpu-<gpu>``): the
roles and the commands, the ledger before the servers start, every sample during the run,
and after they finish, each lender's reclaims, each server's result (TTFT and tokens/s
against fcfs, bytes per tier with physical GPU names), and the checks. Every process's
output goes to ``<name>/<process>.log``. Exit status 0 when every check passes, 1 when one
fails (each named on stdout), 2 for bad arguments or a machine with too few GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from aqua_alloc.coordinator import protocol as proto
from aqua_alloc.memory.config import ConfigError, parse_size

HERE = Path(__file__).resolve().parent
MiB, GiB = 1 << 20, 1 << 30
DEFAULT_SERVE_ARGS = ("--trace mooncake --model llama-8b --max-prompt 8192 --max-output 128 --kv-budget 3GiB "
                      "--max-requests 16 --loads 0.8 --check 10 --systems fcfs,aqua-peer --budget-s 240")


class ClusterError(Exception):
    """The run cannot go on (a process died, a socket never appeared); the message says why."""


def parse_gpus(text: str, option: str) -> list[int]:
    """``"0,1"`` -> [0, 1]. Raises ValueError naming the option and what it accepts."""
    try:
        gpus = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{option}={text!r}: expected GPU indices separated by commas, e.g. 0,1") from None
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"{option}={text!r}: expected distinct GPU indices (0 or more), at least one")
    return gpus


def check_roles(servers: Sequence[int], lenders: Sequence[int], num_gpus: int) -> None:
    """Raises ValueError when the roles do not fit a machine of ``num_gpus`` GPUs."""
    both = sorted(set(servers) & set(lenders))
    if both:
        raise ValueError(f"GPU {', '.join(map(str, both))} is both a server (--servers) and a lender (--lenders)")
    if num_gpus == 0:
        raise ValueError("this machine has no CUDA GPU (--sim runs the same on simulated GPUs)")
    beyond = sorted(g for g in [*servers, *lenders] if g >= num_gpus)
    if beyond:
        raise ValueError(f"GPU {', '.join(map(str, beyond))}: this machine has {num_gpus} GPU(s), 0 to {num_gpus - 1}")


def member_env(role: str, gpu: int, lenders: Sequence[int], socket_path: str, interval: float,
               simulated: bool, num_gpus: int) -> dict[str, str]:
    """The variables a lender or server process gets on top of this process's environment.
    On CUDA a process sees its own GPU as device 0 (and a server the lenders' GPUs next, its
    peers); on the simulated backend every process has ``num_gpus`` simulated GPUs and uses
    its own by index (their keys, ``sim:<index>``, agree between processes)."""
    env = {"AQUA_COORDINATOR": socket_path, "AQUA_COORDINATOR_INTERVAL": f"{interval:g}",
           "AQUA_HOST_RESERVE": "64MiB" if role == "lender" else os.environ.get("AQUA_HOST_RESERVE", "1GiB")}
    if role == "lender":
        env["AQUA_COORDINATOR_GPUS"] = str(gpu) if simulated else "0"
    elif role == "server":
        env["AQUA_COORDINATOR_GPUS"] = "none"  # borrow only: servers' GPUs are nobody's tier
    else:
        raise ValueError(f"role={role!r}: expected lender or server")
    if simulated:
        env.update(AQUA_BACKEND="sim", AQUA_SIM_DEVICES=str(num_gpus))
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, [gpu] + (list(lenders) if role == "server" else [])))
    return env


def physical_tiers(server: int, lenders: Sequence[int]) -> dict[str, str]:
    """A CUDA server's tier names (its device ordinals) -> physical GPU names."""
    return {f"gpu{i}": f"gpu{g}" for i, g in enumerate([server, *lenders])}


def lender_tier(label: str) -> str:
    """A lender's GPU (``lender<N>``) as the servers' stats name it: ``gpu<N>`` (physical on
    CUDA, the simulated device's index on the simulated backend)."""
    return f"gpu{label.removeprefix('lender')}"


def rename_tiers(by_tier: dict[str, Any] | None, names: dict[str, str]) -> dict[str, Any] | None:
    return None if by_tier is None else {names.get(t, t): v for t, v in by_tier.items()}


def summarize_server(rows: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    """bench_serve's rows, the fields this run reports, tiers named by physical GPU."""
    keep = ("system", "load", "round", "requests", "completed", "failed", "ttft_mean_s", "ttft_p99_s",
            "output_tok_s", "ttft_mean_ratio_to_fcfs", "ttft_p99_ratio_to_fcfs", "output_tok_s_ratio_to_fcfs",
            "outputs_checked", "outputs_identical", "num_moves", "bytes_moved", "skipped")
    out = []
    for row in rows:
        item = {k: row.get(k) for k in keep}
        item["peak_bytes"] = rename_tiers(row.get("peak_bytes"), names)
        out.append(item)
    return out


# --------------------------------------------------------------------------------------
# Processes.


class Member:
    """A lender: one JSON command per stdin line, one JSON answer per stdout line."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.lock = threading.Lock()

    def read(self, what: str) -> dict[str, Any]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise ClusterError(f"{self.name} (pid {self.proc.pid}) exited with {self.proc.wait()} before "
                                   f"answering {what} (see {self.log.name})")
            try:
                reply = json.loads(line)
            except ValueError:
                self.log.write(line)  # a library's print: keep it with the process's log
                continue
            if isinstance(reply, dict):
                return reply

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        with self.lock:
            self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.proc.stdin.flush()
            return self.read(repr(op))

    def leave(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # end of stdin: it leaves
            except OSError:          # it is gone already
                pass
            end(self.proc, timeout)
        self.log.close()


def end(proc: subprocess.Popen, timeout: float) -> int:
    """Wait up to ``timeout`` s for ``proc`` (already told to stop), then kill it; its exit status."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def wait_for_socket(path: str, daemon: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if daemon.poll() is not None:
            raise ClusterError(f"the coordinator exited with {daemon.returncode} before serving {path}")
        if time.monotonic() > deadline:
            raise ClusterError(f"the coordinator's socket never appeared at {path}")
        time.sleep(0.05)


def compact(t: float, ledger: dict[str, Any]) -> dict[str, Any]:
    """One ledger sample as the result keeps it: per GPU [offer, borrowed, available] bytes."""
    return {"t": t, "clients": len(ledger["clients"]), "reclaims": len(ledger["reclaims"]),
            "gpus": {g["gpu"]: [g["offer"], g["borrowed"], g["available"]] for g in ledger["gpus"]}}


class Sampler(threading.Thread):
    """Reads the ledger every ``period`` seconds until stopped: a compact sample of each
    (seconds since ``t0``), and the broken invariants of any (proto.check_ledger)."""

    def __init__(self, socket_path: str, period: float, t0: float) -> None:
        super().__init__(name="ledger-sampler", daemon=True)
        self.socket_path, self.period, self.t0 = socket_path, period, t0
        self.samples: list[dict[str, Any]] = []
        self.problems: list[tuple[float, list[str]]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = round(time.monotonic() - self.t0, 3)
            try:
                ledger = proto.query_ledger(self.socket_path)
            except (OSError, proto.ProtocolError) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
            else:
                self.samples.append(compact(t, ledger))
                if problems := proto.check_ledger(ledger):
                    self.problems.append((t, problems))
            self.stop.wait(self.period)


def drive_lender(lender: Member, key: str, t0: float, servers_done: threading.Event,
                 args: argparse.Namespace, actions: list[dict[str, Any]]) -> None:
    """A lender's part of the run: reclaim everything borrowed, then grow past its margin by
    what servers hold, each once servers hold at least the trigger of its GPU: bytes their
    contexts use there on CUDA (the lender's ``others``), bytes granted on the simulated
    backend (where a lender cannot see other processes' bytes)."""

    def held_enough() -> tuple[int, dict[str, Any]] | None:
        while not servers_done.is_set():
            state = lender.ask("state")
            if not state.get("ok", False):
                raise ClusterError(f"state of {key}: {state.get('error')}")
            held = state["others"] if state["others"] is not None else state["borrowed"]
            if held >= args.trigger_bytes and state["borrowed"] > 0:
                return held, state
            time.sleep(args.sample_s)
        return None

    try:
        for step in ("reclaim", "grow"):
            found = held_enough()
            if found is None:
                actions.append({"action": step, "gpu": key, "state": "not run: servers finished before they "
                                f"held {args.trigger_bytes} bytes of {key}"})
                return
            held, state = found
            at = round(time.monotonic() - t0, 3)
            if step == "reclaim":
                reply = lender.ask("reclaim", timeout_s=args.reclaim_wait_s)   # everything borrowed
            else:
                reply = lender.ask("grow", from_borrowers=held, timeout_s=args.reclaim_wait_s)
            actions.append({"action": step, "gpu": key, "at_s": at, "held_at_trigger": held,
                            "borrowed_at_trigger": state["borrowed"], **reply})
            if step == "grow":
                time.sleep(args.hold_s)
                actions.append({"action": "shrink", "gpu": key, "at_s": round(time.monotonic() - t0, 3),
                                **lender.ask("shrink")})
            else:
                time.sleep(args.gap_s)
    except ClusterError as e:
        actions.append({"action": "failed", "gpu": key, "error": str(e)})


# --------------------------------------------------------------------------------------
# The run.


def placed_on(servers: dict[str, Any], tier: str, simulated: bool) -> int:
    """The most bytes any server's contexts had on ``tier`` at once (its aqua runs only)."""
    peaks = []
    for server in servers.values():
        if server is None:
            continue
        rows = [server] if simulated else [r for r in server if str(r["system"]).startswith("aqua")]
        peaks += [int((r.get("peak_bytes") or {}).get(tier, 0)) for r in rows]
    return max(peaks, default=0)


JOINED = re.compile(r"joined: pid (\d+) ")
LEFT_HOLDING = re.compile(r"left: pid (\d+) \(client \d+\) held (\d+) bytes of (\S+);")


def departures(coordinator_log: str, pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    """For each server (name -> pid): how often it joined the coordinator, and what it still
    held of each GPU when it left (the daemon logs that; a server that disabled aqua_alloc
    cleanly gave everything back first)."""
    out: dict[str, dict[str, Any]] = {name: {"joined": 0, "left_holding": []} for name in pids}
    by_pid = {pid: name for name, pid in pids.items()}
    for line in coordinator_log.splitlines():
        if (m := JOINED.search(line)) and int(m.group(1)) in by_pid:
            out[by_pid[int(m.group(1))]]["joined"] += 1
        elif (m := LEFT_HOLDING.search(line)) and int(m.group(1)) in by_pid:
            out[by_pid[int(m.group(1))]]["left_holding"].append((int(m.group(2)), m.group(3)))
    return out


def check_run(result: dict[str, Any], simulated: bool) -> list[str]:
    """What failed, as sentences (empty: every check passed)."""
    failures = []
    for name, rc in result["exit_codes"].items():
        if rc != 0:
            failures.append(f"{name} exited with {rc}")
    for label, key in result["lender_gpus"].items():
        tier = lender_tier(label)
        if not placed_on(result["servers"], tier, simulated):
            failures.append(f"no server placed bytes on {key} ({tier}): parked contexts did not spread over "
                            "the lenders")
    for name, seen in result["departures"].items():
        if not seen["joined"]:
            failures.append(f"{name} never joined the coordinator")
        for nbytes, key in seen["left_holding"]:
            failures.append(f"{name} left the coordinator still holding {nbytes} bytes of {key} (not given back "
                            "when it disabled aqua_alloc)")
    for action in result["lender_actions"]:
        if action["action"] in ("reclaim", "grow") and action.get("state") != "done":
            failures.append(f"{action['action']} on {action['gpu']}: {action.get('state') or action.get('error')}")
        if action["action"] == "failed":
            failures.append(f"lender of {action['gpu']}: {action['error']}")
    if result.get("error"):
        failures.append(f"the run stopped: {result['error']}")
    for step, ledger in [("before", result["ledger_before"]), ("after", result["ledger_after"])]:
        if ledger is None:
            failures.append(f"ledger {step}: not read")
        elif problems := proto.check_ledger(ledger):
            failures.append(f"ledger {step}: invariants broken: {problems}")
    for t, problems in result["ledger_problems"]:
        failures.append(f"ledger during at {t} s: invariants broken: {problems}")
    after = result["ledger_after"]
    if after is not None and any(g["borrows"] for g in after["gpus"]):
        failures.append(f"ledger after: servers left but borrows remain: {after['gpus']}")
    for name, server in result["servers"].items():
        if server is None:
            failures.append(f"{name}: no result")
        elif simulated:
            if not server["intact"]:
                failures.append(f"{name}: contexts not intact: {server['not_intact']}")
            if server["failures"]:
                failures.append(f"{name}: {len(server['failures'])} moves failed: {server['failures'][:3]}")
        else:
            for row in server:
                if row["skipped"]:
                    failures.append(f"{name}: {row['system']} skipped: {row['skipped']}")
                elif row["failed"]:
                    failures.append(f"{name}: {row['system']}: {row['failed']} requests failed")
                elif row["outputs_identical"] is False:
                    failures.append(f"{name}: {row['system']}: outputs differ from the solo runs")
    return failures


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sim", action="store_true", help="simulated GPUs (AQUA_BACKEND=sim): runs without a GPU")
    p.add_argument("--servers", default="0,1", help="GPUs that serve (default %(default)s)")
    p.add_argument("--lenders", default="2,3", help="GPUs that lend (default %(default)s)")
    p.add_argument("--lender-model", default="llama-8b", help="model each lender holds (CUDA; default %(default)s)")
    p.add_argument("--serve-args", default=DEFAULT_SERVE_ARGS,
                   help="bench_serve.py's arguments for each server (default: %(default)s)")
    p.add_argument("--sim-seconds", type=float, default=12.0, help="--sim: how long each server serves")
    p.add_argument("--interval", type=float, default=0.2, help="AQUA_COORDINATOR_INTERVAL of every process (s)")
    p.add_argument("--trigger", default=None,
                   help="bytes servers hold of a lender's GPU that start its reclaim (default 2GiB, above the "
                        "servers' own CUDA contexts there; --sim 32MiB)")
    p.add_argument("--gap-s", type=float, default=3.0, help="seconds between a lender's reclaim and its growth")
    p.add_argument("--hold-s", type=float, default=3.0, help="seconds a lender holds its grown allocation")
    p.add_argument("--reclaim-wait-s", type=float, default=30.0, help="how long a grow waits for its reclaim")
    p.add_argument("--sample-s", type=float, default=0.25, help="seconds between ledger reads")
    p.add_argument("--join-timeout-s", type=float, default=240.0, help="a lender that has not joined by then "
                                                                      "(building its model) is stopped")
    p.add_argument("--timeout-s", type=float, default=450.0, help="the servers are stopped after this")
    p.add_argument("--name", default=None, help="result name (default cluster_serve-<n>gpu-<gpu>)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    try:
        args.server_gpus = parse_gpus(args.servers, "--servers")
        args.lender_gpus = parse_gpus(args.lenders, "--lenders")
        args.trigger_bytes = parse_size(args.trigger or ("32MiB" if args.sim else "2GiB"), "--trigger",
                                        allow_percent=False)
    except (ValueError, ConfigError) as e:
        p.error(str(e))
    for name in ("interval", "sample_s", "timeout_s", "sim_seconds", "reclaim_wait_s", "join_timeout_s"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')}: expected a number of seconds above 0")
    for name in ("gap_s", "hold_s"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}: expected a number of seconds, 0 or more")
    if args.trigger_bytes < 1:
        p.error("--trigger: expected at least 1 byte")
    return args


def machine(simulated: bool, wanted: int) -> tuple[int, str]:
    """(GPU count, short GPU name) of this machine; simulated: as many as the roles need."""
    if simulated:
        return wanted, "sim"
    import torch  # noqa: PLC0415 - CUDA only

    n = torch.cuda.device_count()
    return n, (torch.cuda.get_device_name(0).split()[-1].lower() if n else "none")


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    simulated = args.sim
    num_gpus, gpu_name = machine(simulated, max([*args.server_gpus, *args.lender_gpus]) + 1)
    check_roles(args.server_gpus, args.lender_gpus, num_gpus)
    name = args.name or f"cluster_serve-{num_gpus}gpu-{gpu_name}"
    logs = args.out / name
    logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"backend": "sim" if simulated else "cuda", "num_gpus": num_gpus, "gpu": gpu_name,
                              "servers_gpus": args.server_gpus, "lenders_gpus": args.lender_gpus,
                              "serve_args": None if simulated else args.serve_args, "commands": {},
                              "lender_gpus": {}, "ledger_before": None, "ledger_during": [], "ledger_problems": [],
                              "ledger_after": None, "lender_actions": [], "servers": {}, "exit_codes": {},
                              "departures": {}, "error": None}
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="aqua-cluster-") as tmp:
        os.chmod(tmp, 0o700)
        sock = os.path.join(tmp, "coordinator.sock")
        coordinator_log = open(logs / "coordinator.log", "w")
        daemon = subprocess.Popen([python, "-m", "aqua_alloc", "coordinator", "--socket", sock],
                                  stdout=coordinator_log, stderr=subprocess.STDOUT)
        lenders: dict[int, Member] = {}
        servers: dict[int, subprocess.Popen] = {}
        sampler = None
        try:
            wait_for_socket(sock, daemon)
            for g in args.lender_gpus:
                argv = [python, str(HERE / "cluster_lender.py"), "--device", str(g if simulated else 0),
                        "--model", args.lender_model]
                env = member_env("lender", g, args.lender_gpus, sock, args.interval, simulated, num_gpus)
                result["commands"][f"lender{g}"] = {"argv": argv[1:], "env": env}
                lenders[g] = Member(f"lender{g}", argv, env, logs / f"lender{g}.log")
            for g, lender in lenders.items():
                # A lender that never joins (a hung build) is killed: its read then ends.
                watchdog = threading.Timer(args.join_timeout_s, lender.proc.kill)
                watchdog.start()
                try:
                    joined = lender.read("joining")
                finally:
                    watchdog.cancel()
                result["lender_gpus"][f"lender{g}"] = joined["gpu"]
                print(f"lender on GPU {g}: joined as {joined['gpu']} (pid {joined['joined']})", flush=True)
            time.sleep(3 * args.interval)  # a policy round or more: each lender has offered its spare
            result["ledger_before"] = proto.query_ledger(sock)
            t0 = time.monotonic()
            sampler = Sampler(sock, args.sample_s, t0)
            sampler.start()
            for g in args.server_gpus:
                env = member_env("server", g, args.lender_gpus, sock, args.interval, simulated, num_gpus)
                if simulated:
                    argv = [python, str(HERE / "cluster_sim_server.py"), "--device", str(g),
                            "--seconds", f"{args.sim_seconds:g}", "--out", str(logs / f"server{g}.json")]
                else:
                    argv = [python, str(HERE / "bench_serve.py"), *shlex.split(args.serve_args),
                            "--out", str(logs), "--name", f"bench_serve-server{g}"]
                result["commands"][f"server{g}"] = {"argv": argv[1:], "env": env}
                with open(logs / f"server{g}.log", "w") as log:
                    servers[g] = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            servers_done = threading.Event()
            drivers = [threading.Thread(target=drive_lender, name=f"lender{g}",
                                        args=(lenders[g], result["lender_gpus"][f"lender{g}"], t0, servers_done,
                                              args, result["lender_actions"]))
                       for g in args.lender_gpus]
            for d in drivers:
                d.start()
            deadline = t0 + args.timeout_s
            for g, proc in servers.items():
                try:
                    result["exit_codes"][f"server{g}"] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGINT)  # bench_serve stops its run and writes what finished
                    result["exit_codes"][f"server{g}"] = f"stopped after {args.timeout_s:g} s: {end(proc, 60)}"
            servers_done.set()
            for d in drivers:
                d.join()
            time.sleep(3 * args.interval)
            result["ledger_after"] = proto.query_ledger(sock)
        except (ClusterError, OSError, proto.ProtocolError) as e:
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            if sampler is not None:
                sampler.stop.set()
                sampler.join()
                result["ledger_during"], result["ledger_problems"] = sampler.samples, sampler.problems
                result["ledger_sample_errors"] = sampler.errors
            for proc in servers.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for g, lender in lenders.items():
                lender.leave()
                result["exit_codes"].setdefault(f"lender{g}", lender.proc.returncode)
            daemon.terminate()
            end(daemon, 30)
            coordinator_log.close()
    result["departures"] = departures((logs / "coordinator.log").read_text(),
                                      {f"server{g}": p.pid for g, p in servers.items()})
    for g in args.server_gpus:
        if simulated:
            path = logs / f"server{g}.json"
            result["servers"][f"server{g}"] = json.loads(path.read_text()) if path.exists() else None
        else:
            path = logs / f"bench_serve-server{g}.json"  # beside its .meta.json, .log and traces
            rows = json.loads(path.read_text()) if path.exists() else None
            result["servers"][f"server{g}"] = (None if rows is None else
                                               summarize_server(rows, physical_tiers(g, args.lender_gpus)))
    failures = check_run(result, simulated)
    result["failures"] = failures
    result["ok"] = not failures
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path} (process logs under {logs})", flush=True)
    return result, failures


def _mib(n: Any) -> str:
    return "?" if n is None else f"{n / MiB:.0f} MiB"


def _s(x: Any) -> str:
    return "-" if x is None else f"{x:.3f} s"


def report(result: dict[str, Any], failures: list[str]) -> None:
    simulated = result["backend"] == "sim"
    for label, key in result["lender_gpus"].items():
        tier = lender_tier(label)
        most = max((s["gpus"].get(key, [0, 0, 0])[1] for s in result["ledger_during"]), default=0)
        print(f"{label} ({key}): servers were granted at most {_mib(most)} of it, placed at most "
              f"{_mib(placed_on(result['servers'], tier, simulated))}", flush=True)
    for a in result["lender_actions"]:
        where = f"  {a.get('gpu')} {a.get('action')}"
        if not a.get("ok", True) or a.get("action") == "failed" or "at_s" not in a:
            print(f"{where}: {a.get('state') or a.get('error')}")
        elif a["action"] == "reclaim":
            print(f"{where} at {a['at_s']} s, servers holding {_mib(a.get('held_at_trigger'))}: "
                  f"{_mib(a.get('nbytes'))} ({_mib(a.get('pending'))} from borrowers) {a.get('state')}: "
                  f"confirmed after {_s(a.get('seconds'))}, off the GPU after {_s(a.get('freed_after_s'))}")
        elif a["action"] == "grow":
            print(f"{where} at {a['at_s']} s: {_mib(a.get('grown'))}, {_mib(a.get('into_margin'))} into the margin; "
                  f"{a.get('num_reclaims')} reclaims ({_mib(a.get('pending'))} from borrowers), the first after "
                  f"{_s(a.get('asked_after_s'))}; margin free again after {_s(a.get('back_after_s'))} "
                  f"({a.get('state')})")
    for name, server in result["servers"].items():
        if server is None:
            print(f"{name}: no result")
        elif simulated:
            print(f"{name}: {server['rounds']} rounds, {server['num_moves']} moves, intact {server['intact']}, "
                  f"peak bytes {server['peak_bytes']}")
        else:
            for row in server:
                print(f"{name} {row['system']}: TTFT mean {row['ttft_mean_s']} s (x{row['ttft_mean_ratio_to_fcfs']} "
                      f"fcfs), p99 {row['ttft_p99_s']} s, {row['output_tok_s']} tok/s "
                      f"(x{row['output_tok_s_ratio_to_fcfs']}), identical {row['outputs_identical']}, "
                      f"peak {row['peak_bytes']}")
    print("PASS" if not failures else f"FAIL ({len(failures)} checks):", *failures, sep="\n  ", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result, failures = run(args)
    except ValueError as e:  # roles that do not fit this machine
        print(f"cluster_serve: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"cluster_serve: {e}", file=sys.stderr)
        return 1
    report(result, failures)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
