"""Two processes on one GPU join a coordinator over CUDA: the protocol end to end.

Starts ``python -m aqua_alloc coordinator`` on a private socket, then two processes with
``AQUA_COORDINATOR``: the owner (``AQUA_COORDINATOR_GPUS=0``) offers GPU 0 under the elastic
policy (free memory less the margin, read through CUDA), the other owns no GPU. The
ledger is read while both are in, after the owner asks for memory back (a reclaim through
``aqua_alloc.reclaim`` is local; here the owner lowers its offer by leaving), and after
each has left. One GPU proves the protocol, not the speed (issue 8 has the speed runs).

    python benchmarks/coordinator_gpu_check.py --out benchmarks/results/coordinator_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from aqua_alloc import coordinator_protocol as proto

MEMBER = """
import os, sys, time
import torch
import aqua_alloc as aq
aq.enable(host_reserve="64MiB")
print("joined", os.getpid(), flush=True)
sys.stdin.readline()          # stay in until told to leave
aq.disable()
print("left", flush=True)
"""


def wait_for(path: str, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} never appeared at {path}")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    steps: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        sock = os.path.join(tmp, "coordinator.sock")
        daemon = subprocess.Popen([sys.executable, "-m", "aqua_alloc", "coordinator", "--socket", sock])
        try:
            wait_for(sock, "the coordinator's socket")
            members = {}
            for name, gpus in (("owner", "0"), ("borrower", "none")):
                env = dict(os.environ, AQUA_COORDINATOR=sock, AQUA_COORDINATOR_GPUS=gpus,
                           AQUA_COORDINATOR_INTERVAL="0.2")
                p = subprocess.Popen([sys.executable, "-c", MEMBER], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
                line = p.stdout.readline().strip()
                print(f"{name}: {line}", flush=True)
                members[name] = p
            time.sleep(1.0)  # a policy round or two: offers re-read from the GPU
            steps["both_in"] = proto.query_ledger(sock)
            for name in ("borrower", "owner"):
                p = members[name]
                p.stdin.write("\n")
                p.stdin.flush()
                print(f"{name}: {p.stdout.readline().strip()}", flush=True)
                p.wait(timeout=60)
                time.sleep(0.3)
                steps[f"after_{name}_left"] = proto.query_ledger(sock)
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    for step, ledger in steps.items():
        problems = proto.check_ledger(ledger)
        print(f"{step}: {len(ledger['clients'])} processes; gpus "
              f"{[(g['gpu'], g['offer'], g['borrowed']) for g in ledger['gpus']]}; invariants "
              f"{'hold' if not problems else problems}")
    both = steps["both_in"]
    ok = (len(both["clients"]) == 2 and any(g["offer"] > 0 for g in both["gpus"])
          and len(steps["after_owner_left"]["clients"]) == 0
          and all(not proto.check_ledger(l) for l in steps.values()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ok": ok, "ledgers": steps}, f, indent=1)
    print("coordinator on the GPU:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
