"""Two processes on one GPU join a coordinator over CUDA: the protocol end to end.

Starts ``python -m aqua_alloc coordinator`` on a private socket, then two processes with
``AQUA_COORDINATOR``: the owner (``AQUA_COORDINATOR_GPUS=0``) offers GPU 0 under the elastic
policy (free memory less the margin, read through CUDA), the borrower owns no GPU. Then,
each step driven from here and checked against the ledger and both processes' own books:

1. both in: the owner offers GPU 0; the borrower's lend budget for it is 0;
2. borrow: the borrower borrows 256 MiB of GPU 0 through its coordinator client; the
   ledger shows the borrow and the borrower's aqua_alloc has a lend budget on GPU 0 of
   exactly what was granted (``stats()["tiers"]["gpu0"]["lend_budget"]``);
3. reclaim: the owner asks for all of its unborrowed offer plus 128 MiB back
   (``Client.reclaim(..., wait=True)``), so the coordinator must ask the borrower for
   128 MiB; the borrower lowers its lend budget and confirms (``reclaim_done``), the owner's
   reclaim ends "done"; the ledger then holds 128 MiB less of the borrow and no open reclaim;
4. release: the borrower gives back the rest: no borrow left, lend budget 0; then both
   leave (borrower first) and the ledger is empty.

On one GPU the borrowed bytes cannot hold the borrower's contexts: a borrowed GPU is a
peer tier for contexts of *other* GPUs of the borrower, and here it has only GPU 0 (the
same physical GPU). What this proves is that the protocol, the clients' confirmations and
the allocators' lend budgets work end to end over CUDA, not that memory moves (issue 8
has the speed runs).

``--sim`` runs the same flow with ``AQUA_BACKEND=sim`` in the two processes (one simulated
GPU of 1 GiB each, ``AQUA_SIM_DEVICES=1``; both name it ``sim:0``), so it runs on CPU.
The script exits 1 with the failed checks named when one fails.

    python benchmarks/coordinator_gpu_check.py --out benchmarks/results/coordinator_gpu.json
    python benchmarks/coordinator_gpu_check.py --sim
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from aqua_alloc.coordinator import protocol as proto

MiB = 1 << 20
# One borrow step of the client's policy (Policy.borrow_step): the borrower's own policy
# thread gives back unused room only past two steps (plan_release), so it leaves this be.
BORROW = 256 * MiB
# Of it, what the owner's reclaim must take from the borrower: half, so that something is
# left for the borrower to release in step 4.
FROM_BORROWER = 128 * MiB
POLICY_INTERVAL = 0.2  # s: AQUA_COORDINATOR_INTERVAL of both processes
SETTLE = 1.0           # s: a few policy rounds, for the owner's elastic offer to re-read the GPU

# One process of the check. It answers one JSON command per stdin line with one JSON line
# on stdout, and leaves (disable()) on {"op": "leave"} or at the end of stdin.
MEMBER = """
import dataclasses, json, os, sys
if os.environ.get("AQUA_BACKEND") != "sim":
    import torch  # noqa: F401 - CUDA up first, as in a model server
import aqua_alloc as aq
from aqua_alloc.memory import allocator
aq.enable(host_reserve="64MiB")
# aqua_alloc has no public accessor for the coordinator client enable() joined: this check
# (only this script) reaches it through the allocator's state, as tests/conftest.py does.
client = allocator._state.coordinator
GPU = 0  # device ordinal; both processes name it by the same key (the GPU's UUID, or sim:0)

def state():
    s = aq.stats()
    return {"lend_budget": s["tiers"]["gpu0"]["lend_budget"], "lent": s["tiers"]["gpu0"]["lent"],
            "coordinator": s["coordinator"]}

def answer(op, args):
    if op == "state":
        return state()
    if op == "borrow":
        return {"granted": client.borrow(GPU, args["bytes"]), **state()}
    if op == "reclaim":
        # A reclaim is served first from the offer nobody borrowed ("immediate"): take all of
        # that plus `from_borrowers`, which the coordinator must then ask of the borrowers.
        entry = next(g for g in client.ledger()["gpus"] if g["gpu"] == client.key(GPU))
        nbytes = entry["available"] + args["from_borrowers"]
        outcome = client.reclaim(GPU, nbytes, wait=True)
        return {"offer_before": entry["offer"], "available_before": entry["available"],
                **dataclasses.asdict(outcome)}
    if op == "release":
        return {"released": client.release(GPU, None, timeout=5.0), **state()}
    raise ValueError(f"unknown op {op!r}")

print(json.dumps({"joined": os.getpid(), "client": client.client_id, "gpu": client.key(GPU)}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    op = command.pop("op")
    if op == "leave":
        break
    try:
        reply = {"ok": True, **answer(op, command)}
    except Exception as e:
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(reply), flush=True)
aq.disable()
print(json.dumps({"left": True}), flush=True)
"""


class CheckFailed(Exception):
    """A step cannot go on (a process died or refused); the message says which and why."""


def wait_for(path: str, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} never appeared at {path}")
        time.sleep(0.05)


def read_reply(name: str, p: subprocess.Popen, what: str) -> dict[str, Any]:
    """The next JSON line of a member; other lines (a library's print) are echoed."""
    while True:
        line = p.stdout.readline()
        if not line:
            code = p.wait(timeout=30)
            raise CheckFailed(f"the {name} (pid {p.pid}) exited with {code} before answering {what} "
                              "(its stderr is above)")
        try:
            reply = json.loads(line)
        except ValueError:
            print(f"{name}: {line.rstrip()}", flush=True)
            continue
        if isinstance(reply, dict):
            return reply


def ask(name: str, p: subprocess.Popen, op: str, **fields: Any) -> dict[str, Any]:
    """One command to a member; its reply (less "ok"), or CheckFailed if it refused or died."""
    p.stdin.write(json.dumps({"op": op, **fields}) + "\n")
    p.stdin.flush()
    reply = read_reply(name, p, repr(op))
    if op != "leave" and not reply.pop("ok", False):
        raise CheckFailed(f"{op} in the {name}: {reply.get('error')}")
    return reply


def gpu_row(ledger: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((g for g in ledger["gpus"] if g["gpu"] == key), None)


def borrow_row(ledger: dict[str, Any], key: str, client: int) -> dict[str, Any]:
    """The borrower's row on GPU ``key``; zeros when it holds nothing there."""
    row = gpu_row(ledger, key)
    rows = [b for b in (row["borrows"] if row else []) if b["client"] == client]
    return rows[0] if rows else {"client": client, "held": 0, "asked": 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--sim", action="store_true",
                        help="simulated backend in both processes (AQUA_BACKEND=sim): runs without a GPU")
    args = parser.parse_args()
    steps: dict[str, Any] = {}       # step -> the coordinator's ledger after it
    borrower: dict[str, Any] = {}    # step -> the borrower's lend budget and client view
    outcomes: dict[str, Any] = {}    # borrow / reclaim / release: what the clients returned
    failures: list[str] = []

    def expect(ok: bool, message: str) -> None:
        if not ok:
            failures.append(message)
            print(f"CHECK FAILED: {message}", flush=True)

    backend_env = {"AQUA_BACKEND": "sim", "AQUA_SIM_DEVICES": "1"} if args.sim else {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        sock = os.path.join(tmp, "coordinator.sock")
        daemon = subprocess.Popen([sys.executable, "-m", "aqua_alloc", "coordinator", "--socket", sock])
        members: dict[str, subprocess.Popen] = {}
        try:
            wait_for(sock, "the coordinator's socket")
            joined = {}
            for name, gpus in (("owner", "0"), ("borrower", "none")):
                env = dict(os.environ, AQUA_COORDINATOR=sock, AQUA_COORDINATOR_GPUS=gpus,
                           AQUA_COORDINATOR_INTERVAL=str(POLICY_INTERVAL), **backend_env)
                p = subprocess.Popen([sys.executable, "-c", MEMBER], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
                members[name] = p
                joined[name] = read_reply(name, p, "joining")
                print(f"{name}: joined {joined[name]['joined']}", flush=True)
            owner, lender = members["owner"], joined["owner"]["client"]
            b, me = members["borrower"], joined["borrower"]["client"]
            key = joined["owner"]["gpu"]
            expect(joined["borrower"]["gpu"] == key,
                   f"the processes name GPU 0 differently: {key} and {joined['borrower']['gpu']}")

            # 1. Both in: the owner offers GPU 0; nothing of the borrower's may go there yet.
            time.sleep(SETTLE)  # a policy round or two: offers re-read from the GPU
            steps["both_in"] = ledger = proto.query_ledger(sock)
            borrower["both_in"] = ask("borrower", b, "state")
            row = gpu_row(ledger, key)
            expect(len(ledger["clients"]) == 2, f"both_in: {len(ledger['clients'])} processes in the ledger, not 2")
            expect(row is not None and row["owner"] == lender and row["offer"] > 0,
                   f"both_in: the owner (client {lender}) offers nothing of {key}: {row}")
            expect(borrower["both_in"]["lend_budget"] == 0,
                   f"both_in: the borrower's lend budget on GPU 0 is {borrower['both_in']['lend_budget']}, not 0")

            # 2. Borrow: granted in full (the offer is far larger), in the ledger and in the
            # borrower's allocator as its lend budget on GPU 0.
            reply = ask("borrower", b, "borrow", bytes=BORROW)
            granted = reply["granted"]
            outcomes["borrow"] = {"asked": BORROW, "granted": granted}
            print(f"borrow: asked {BORROW} bytes, granted {granted}", flush=True)
            if granted == 0:
                raise CheckFailed(f"borrow: nothing granted of {key} (offer {row and row['offer']} bytes)")
            expect(granted == BORROW, f"borrow: granted {granted} bytes of the {BORROW} asked")
            time.sleep(SETTLE)  # the owner's elastic offer re-counts the borrowed bytes (+granted)
            steps["after_borrow"] = ledger = proto.query_ledger(sock)
            borrower["after_borrow"] = state = ask("borrower", b, "state")
            mine = borrow_row(ledger, key, me)
            expect((mine["held"], mine["asked"]) == (granted, 0),
                   f"after_borrow: the ledger has the borrower holding {mine['held']} bytes "
                   f"(asked {mine['asked']}), not {granted} (asked 0)")
            expect(state["lend_budget"] == granted,
                   f"after_borrow: the borrower's lend budget on GPU 0 is {state['lend_budget']}, not {granted}")

            # 3. Reclaim: the owner takes back more than is unborrowed; the borrower is asked
            # for the rest, lowers its budget, confirms; the owner's reclaim ends "done".
            outcomes["reclaim"] = rec = ask("owner", owner, "reclaim", from_borrowers=FROM_BORROWER)
            print(f"reclaim: {rec['nbytes']} bytes: {rec['immediate']} at once, {rec['pending']} from the "
                  f"borrower; {rec['state']} after {rec['seconds']:.3f} s", flush=True)
            expect(rec["pending"] > 0, "reclaim: nothing was asked of the borrower (the owner's offer grew "
                                       "between reading the ledger and reclaiming?)")
            expect(rec["state"] == "done" and rec["bytes_back"] == rec["nbytes"],
                   f"reclaim: state {rec['state']!r} with {rec['bytes_back']} of {rec['nbytes']} bytes back")
            steps["after_reclaim"] = ledger = proto.query_ledger(sock)
            borrower["after_reclaim"] = state = ask("borrower", b, "state")
            kept = granted - rec["pending"]
            mine = borrow_row(ledger, key, me)
            expect((mine["held"], mine["asked"]) == (kept, 0),
                   f"after_reclaim: the ledger has the borrower holding {mine['held']} bytes "
                   f"(asked {mine['asked']}), not {kept} (asked 0)")
            expect(not [r for r in ledger["reclaims"] if r["gpu"] == key],
                   f"after_reclaim: reclaims of {key} still open: {ledger['reclaims']}")
            expect(state["lend_budget"] == kept,
                   f"after_reclaim: the borrower's lend budget on GPU 0 is {state['lend_budget']}, not {kept}")

            # 4. Release: the borrower gives back the rest; nothing borrowed, budget 0.
            reply = ask("borrower", b, "release")
            outcomes["release"] = {"released": reply["released"]}
            print(f"release: {reply['released']} bytes", flush=True)
            expect(reply["released"] == kept, f"release: {reply['released']} bytes released, not {kept}")
            steps["after_release"] = ledger = proto.query_ledger(sock)
            borrower["after_release"] = state = ask("borrower", b, "state")
            row = gpu_row(ledger, key)
            expect(row is not None and row["borrowed"] == 0 and not row["borrows"],
                   f"after_release: {key} still has borrows: {row}")
            expect(state["lend_budget"] == 0 and not state["coordinator"]["borrowed"],
                   f"after_release: the borrower's lend budget on GPU 0 is {state['lend_budget']} "
                   f"and it still counts {state['coordinator']['borrowed']}")

            for name in ("borrower", "owner"):
                ask(name, members[name], "leave")
                print(f"{name}: left", flush=True)
                members[name].wait(timeout=60)
                time.sleep(0.3)
                steps[f"after_{name}_left"] = proto.query_ledger(sock)
            expect(len(steps["after_borrower_left"]["clients"]) == 1,
                   f"after_borrower_left: {len(steps['after_borrower_left']['clients'])} processes, not 1")
            last = steps["after_owner_left"]
            expect(not last["clients"] and not last["gpus"] and not last["reclaims"],
                   f"after_owner_left: the ledger is not empty: {last}")
        except CheckFailed as e:
            failures.append(str(e))
            print(f"CHECK FAILED: {e}", flush=True)
        finally:
            for p in members.values():  # end of stdin: a member still in leaves
                if p.poll() is None:
                    p.stdin.close()
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            daemon.terminate()
            daemon.wait(timeout=30)
    for step, ledger in steps.items():
        problems = proto.check_ledger(ledger)
        expect(not problems, f"{step}: ledger invariants broken: {problems}")
        print(f"{step}: {len(ledger['clients'])} processes; gpus "
              f"{[(g['gpu'], g['offer'], g['borrowed']) for g in ledger['gpus']]}; invariants "
              f"{'hold' if not problems else problems}")
    for step, state in borrower.items():
        print(f"{step}: borrower's lend budget on GPU 0 {state['lend_budget']} bytes; "
              f"client view {state['coordinator']['borrowed']}")
    ok = not failures and "after_owner_left" in steps
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ok": ok, "backend": "sim" if args.sim else "cuda", "ledgers": steps,
                       "borrower": borrower, "outcomes": outcomes, "failures": failures}, f, indent=1)
    where = "the simulated backend" if args.sim else "the GPU"
    if failures:
        print(f"coordinator on {where}: FAIL ({len(failures)} checks):", *failures, sep="\n  ")
    else:
        print(f"coordinator on {where}:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
