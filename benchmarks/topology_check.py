"""The topology aqua_alloc sees, checked against the driver's: ``nvidia-smi topo -m``.

``python -m aqua_alloc info --json`` says which GPU pairs NVML reports as NVLink peers
(``nvlink``), which pairs may map each other's memory (``peer_access``) and where each GPU
parks a context, in order (``plan`` -> ``gpus`` -> ``tiers``: itself, NVLink peers, PCIe
peers, host). ``nvidia-smi topo -m`` prints the driver's matrix: ``NV<k>`` for a pair joined
by k bonded NVLinks, ``PIX``, ``PXB``, ``PHB``, ``NODE`` or ``SYS`` for a PCIe path (NIC
rows and columns are left out). Each check is named:

- ``gpu_count``: both see the same number of GPUs (the other checks run only then);
- ``nvlink_matches``: for every pair i != j, info's nvlink[i][j] exactly when topo says NV<k>;
- ``nvlink_peer_access``: info's peer_access[i][j] for every NVLink pair;
- ``tier_order``: each GPU's tiers list its NVLink peers (topo's) before any other GPU;
- ``tier_complete``: each GPU's tiers start with itself and list each GPU it has peer
  access to once, and no other GPU.

aqua_alloc ranks NVLink peers equally (NV18 and NV4 alike): the link counts of each GPU's
NVLink peers are reported in tier order, but their order among themselves is not checked.

For a machine with 4 to 8 NVIDIA GPUs (any number works). ``--topo-file`` and
``--info-file`` read saved outputs instead of running the two commands (the tests feed it
that way, on CPU):

    python benchmarks/topology_check.py --out benchmarks/results/topology_check-8gpu-h200.json
    nvidia-smi topo -m > topo.txt && python -m aqua_alloc info --json > info.json
    python benchmarks/topology_check.py --topo-file topo.txt --info-file info.json

Exit status: 0 when every check passes; 1 when one fails (the summary names it); 2 for bad
arguments, or when nvidia-smi or info cannot be run or their output cannot be read (one
line on stderr naming which).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

PROG = "topology_check.py"
TOPO_COMMAND = ["nvidia-smi", "topo", "-m"]
INFO_COMMAND = [sys.executable, "-m", "aqua_alloc", "info", "--json"]
COMMAND_TIMEOUT = 120  # s, for each of the two commands

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # nvidia-smi underlines the header and the row names
GPU_NAME = re.compile(r"GPU(\d+)$")            # a column or row of the matrix; NIC<k> ones are not
NVLINK = re.compile(r"NV(\d+)$")               # NV<k>: k bonded NVLinks
PCIE_PATHS = ("PIX", "PXB", "PHB", "NODE", "SYS")  # nearest first, as nvidia-smi's legend explains
TIER = re.compile(r"gpu(\d+)(?: \((?:NVLink|PCIe)\))?$")  # a GPU in info's tiers: "gpu2 (PCIe)"
SHOWN = 6  # problems named in one check's reason; the rest are counted


class InputError(Exception):
    """An input that cannot be had or read: printed as one line, exit status 2."""


class TopoFormatError(InputError):
    """Text that is not an ``nvidia-smi topo -m`` matrix; the message says where."""


class InfoFormatError(InputError):
    """JSON that is not ``aqua_alloc info --json``; the message says which key."""


@dataclasses.dataclass(frozen=True)
class TopoMatrix:
    """``nvidia-smi topo -m`` between GPUs, by nvidia-smi's GPU index (PCI bus id order)."""
    connection: list[list[str]]  # [i][j]: "X" when i == j, else "NV<k>", "PIX", "PXB", "PHB", "NODE" or "SYS"
    nvlinks: list[list[int]]     # [i][j]: bonded NVLinks between i and j; 0 on the diagonal and when not NV<k>

    @property
    def num_gpus(self) -> int:
        return len(self.connection)

    def to_dict(self) -> dict[str, Any]:
        return {"num_gpus": self.num_gpus, "connection": self.connection, "nvlinks": self.nvlinks}


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not run (the GPU counts differ, so pairs cannot be matched)
    reason: str


# --------------------------------------------------------------------------------------
# reading the two inputs


def parse_topo(text: str) -> TopoMatrix:
    """The GPU-to-GPU part of ``nvidia-smi topo -m``'s text. The header is the first line
    naming GPU0; each row GPU<i> then gives one cell per GPU column before the NIC and
    affinity columns. Rows of NICs are skipped; the legend ends the matrix. Cells are split
    on any whitespace, so a copy with tabs turned to spaces reads the same."""
    names: list[str] | None = None
    rows: dict[int, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        cells = ANSI.sub("", line).split()
        if not cells:
            continue
        if cells[0].startswith("Legend"):
            break
        if names is None:
            if GPU_NAME.match(cells[0]):
                names = _leading(cells, GPU_NAME)
                if names != [f"GPU{i}" for i in range(len(names))]:
                    raise TopoFormatError(f"line {number}: GPU columns {' '.join(names)}, "
                                          f"expected GPU0 to GPU{len(names) - 1} in order")
            continue
        row = GPU_NAME.match(cells[0])
        if row is None:  # NIC<k> (or an older driver's mlx5_<k>) rows
            continue
        i, n = int(row.group(1)), len(names)
        if i >= n or i in rows:
            raise TopoFormatError(f"line {number}: row {cells[0]} "
                                  f"{'appears twice' if i in rows else f'but only {n} GPU columns'}")
        if len(cells) < n + 1:
            raise TopoFormatError(f"line {number}: row {cells[0]} has only {len(cells) - 1} of {n} GPU columns")
        for j, cell in enumerate(cells[1:n + 1]):
            if (cell == "X") != (i == j) or not (cell == "X" or NVLINK.match(cell) or cell in PCIE_PATHS):
                raise TopoFormatError(f"line {number}: GPU{i} to GPU{j} is {cell!r}; expected "
                                      f"{'X' if i == j else 'NV<k>, ' + ', '.join(PCIE_PATHS)}")
        rows[i] = cells[1:n + 1]
    if names is None:
        raise TopoFormatError("no header line naming GPU0: not the output of nvidia-smi topo -m")
    missing = [f"GPU{i}" for i in range(len(names)) if i not in rows]
    if missing:
        raise TopoFormatError(f"no row for {', '.join(missing)}")
    connection = [rows[i] for i in range(len(names))]
    nvlinks = [[_links(cell) for cell in row] for row in connection]
    return TopoMatrix(connection=connection, nvlinks=nvlinks)


def _leading(cells: list[str], pattern: re.Pattern) -> list[str]:
    """The cells up to the first that does not match ``pattern``."""
    out = []
    for cell in cells:
        if not pattern.match(cell):
            break
        out.append(cell)
    return out


def _links(cell: str) -> int:
    match = NVLINK.match(cell)
    return int(match.group(1)) if match else 0


def read_info(data: Any) -> dict[str, Any]:
    """``info --json``'s keys this check reads, their types checked; ``plan`` may be None
    (info could not resolve budgets: its notes say why, and the tier checks fail)."""
    if not isinstance(data, dict):
        raise InfoFormatError(f"expected a JSON object, got {type(data).__name__}")
    for key in ("gpus", "peer_access", "nvlink"):
        if not isinstance(data.get(key), list):
            raise InfoFormatError(f"no list {key!r}")
    for key in ("peer_access", "nvlink"):
        if not all(isinstance(row, list) and all(isinstance(x, bool) for x in row) for row in data[key]):
            raise InfoFormatError(f"{key!r} is not a matrix of true/false")
    plan = data.get("plan")
    if plan is not None:
        gpus = plan.get("gpus") if isinstance(plan, dict) else None
        if not isinstance(gpus, list) or not all(
                isinstance(g, dict) and isinstance(g.get("index"), int) and isinstance(g.get("tiers"), list)
                for g in gpus):
            raise InfoFormatError("'plan' has no list 'gpus' of {index, tiers}")
    notes = data.get("notes")
    return {"gpus": data["gpus"], "peer_access": data["peer_access"], "nvlink": data["nvlink"],
            "plan": plan, "notes": [str(n) for n in notes] if isinstance(notes, list) else []}


def run_topo() -> str:
    """``nvidia-smi topo -m``'s text."""
    what = " ".join(TOPO_COMMAND)
    try:
        done = subprocess.run(TOPO_COMMAND, check=False, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except FileNotFoundError:
        raise InputError(f"{what}: nvidia-smi is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise InputError(f"{what}: no answer within {COMMAND_TIMEOUT} s") from None
    if done.returncode != 0:
        raise InputError(f"{what}: exit {done.returncode}: {_last_line(done.stderr or done.stdout)}")
    return done.stdout


def run_info() -> tuple[Any, int]:
    """``info --json``'s JSON and its exit status. info exits 1 when it could not see
    everything but still prints its JSON, with notes saying what: the checks judge that."""
    what = "python -m aqua_alloc info --json"
    # nvidia-smi numbers GPUs by PCI bus id; CUDA's default order puts the fastest first.
    # Under CUDA_DEVICE_ORDER=PCI_BUS_ID info's CUDA ordinals are nvidia-smi's GPU indices,
    # so gpu<i> names the same GPU on both sides of every check.
    env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    try:
        done = subprocess.run(INFO_COMMAND, check=False, capture_output=True, text=True, env=env,
                              timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise InputError(f"{what}: no answer within {COMMAND_TIMEOUT} s") from None
    try:
        data = json.loads(done.stdout)
    except ValueError:
        raise InputError(f"{what}: exit {done.returncode}, no JSON on stdout: "
                         f"{_last_line(done.stderr or done.stdout)}") from None
    if done.returncode not in (0, 1):
        raise InputError(f"{what}: exit {done.returncode}: {_last_line(done.stderr)}")
    return data, done.returncode


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _read_file(path: str, flag: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{flag} {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None


# --------------------------------------------------------------------------------------
# checks: each takes the topo matrix and info's data, returns (ok, reason)


def _at(matrix: list[list[bool]], i: int, j: int) -> bool:
    return i < len(matrix) and j < len(matrix[i]) and bool(matrix[i][j])


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(n) if i != j]


def _named(problems: list[str]) -> str:
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return "; ".join(problems[:SHOWN]) + more


def check_gpu_count(topo: TopoMatrix, info: dict[str, Any]) -> tuple[bool, str]:
    n = topo.num_gpus  # at least 1: parse_topo needs GPU0's row
    if len(info["gpus"]) != n:
        return False, f"nvidia-smi sees {n} GPUs, info {len(info['gpus'])}"
    shapes = {key: (len(info[key]), sorted({len(row) for row in info[key]})) for key in ("peer_access", "nvlink")}
    bad = [f"info's {key} is {rows} rows of {'/'.join(map(str, widths)) or 0}"
           for key, (rows, widths) in shapes.items() if (rows, widths) != (n, [n])]
    if bad:
        return False, f"{n} GPUs, but " + "; ".join(bad)
    return True, f"{n} GPUs in both"


def check_nvlink_matches(topo: TopoMatrix, info: dict[str, Any]) -> tuple[bool, str]:
    problems = []
    for i, j in _pairs(topo.num_gpus):
        topo_nv, info_nv = topo.nvlinks[i][j] > 0, _at(info["nvlink"], i, j)
        if topo_nv != info_nv:
            problems.append(f"gpu{i}->gpu{j}: topo {topo.connection[i][j]}, info "
                            f"{'NVLink' if info_nv else 'no NVLink'}")
    if problems:
        return False, _named(problems)
    num_nvlink = sum(topo.nvlinks[i][j] > 0 for i, j in _pairs(topo.num_gpus))
    return True, f"{num_nvlink} of {len(_pairs(topo.num_gpus))} ordered pairs NVLink in both"


def check_nvlink_peer_access(topo: TopoMatrix, info: dict[str, Any]) -> tuple[bool, str]:
    nvlink_pairs = [(i, j) for i, j in _pairs(topo.num_gpus) if topo.nvlinks[i][j] > 0]
    problems = [f"gpu{i}->gpu{j} ({topo.connection[i][j]}): no peer access"
                for i, j in nvlink_pairs if not _at(info["peer_access"], i, j)]
    if problems:
        return False, _named(problems)
    return True, f"peer access on all {len(nvlink_pairs)} NVLink pairs"


def plan_tiers(info: dict[str, Any]) -> dict[int, list[str]]:
    """GPU index -> info's tier list for it; empty when info has no plan."""
    plan = info["plan"]
    return {g["index"]: [str(t) for t in g["tiers"]] for g in plan["gpus"]} if plan else {}


def _tier_gpus(tiers: list[str]) -> list[int]:
    """The GPUs in a tier list, in order ("host" and anything else left out)."""
    return [int(m.group(1)) for m in map(TIER.match, tiers) if m]


def check_tier_order(topo: TopoMatrix, info: dict[str, Any]) -> tuple[bool, str]:
    if info["plan"] is None:
        return False, "info has no plan (see its notes)"
    problems = []
    for d, tiers in sorted(plan_tiers(info).items()):
        if d >= topo.num_gpus:
            continue  # tier_complete names a GPU the plan has and nvidia-smi has not
        peers = [p for p in _tier_gpus(tiers) if p != d and p < topo.num_gpus]
        nvlink = [topo.nvlinks[d][p] > 0 for p in peers]
        if False in nvlink and True in nvlink[nvlink.index(False):]:
            first_other = nvlink.index(False)
            early, late = peers[first_other], peers[nvlink.index(True, first_other)]
            problems.append(f"gpu{d}: gpu{early} ({topo.connection[d][early]}) before NVLink peer "
                            f"gpu{late} ({topo.connection[d][late]})")
    if problems:
        return False, _named(problems)
    return True, "every GPU's NVLink peers come before its other peers"


def check_tier_complete(topo: TopoMatrix, info: dict[str, Any]) -> tuple[bool, str]:
    if info["plan"] is None:
        return False, "info has no plan (see its notes)"
    tiers_of = plan_tiers(info)
    problems = [f"gpu{d}: in the plan, not in nvidia-smi's matrix" for d in sorted(tiers_of) if d >= topo.num_gpus]
    for d in range(topo.num_gpus):
        tiers = tiers_of.get(d)
        if tiers is None:
            problems.append(f"gpu{d}: not in the plan")
            continue
        if not tiers or tiers[0] != f"gpu{d}":
            problems.append(f"gpu{d}: tiers start with {tiers[0] if tiers else 'nothing'}, not gpu{d}")
        listed = [p for p in _tier_gpus(tiers) if p != d]
        peers = [p for p in range(topo.num_gpus) if p != d and _at(info["peer_access"], d, p)]
        twice = sorted({p for p in listed if listed.count(p) > 1})
        missing = [p for p in peers if p not in listed]
        extra = sorted({p for p in listed if p not in peers})
        for what, gpus in (("listed twice", twice), ("peer access but not listed", missing),
                           ("listed without peer access", extra)):
            if gpus:
                problems.append(f"gpu{d}: {what}: {', '.join(f'gpu{p}' for p in gpus)}")
    if problems:
        return False, _named(problems)
    return True, "every GPU's tiers start with itself and list each GPU it has peer access to, once"


# The checks after gpu_count, in order; they compare pairs, so they run only when the counts agree.
PAIR_CHECKS: tuple[tuple[str, Callable[[TopoMatrix, dict[str, Any]], tuple[bool, str]]], ...] = (
    ("nvlink_matches", check_nvlink_matches),
    ("nvlink_peer_access", check_nvlink_peer_access),
    ("tier_order", check_tier_order),
    ("tier_complete", check_tier_complete),
)


def run_checks(topo: TopoMatrix, info: dict[str, Any]) -> list[Check]:
    counted, reason = check_gpu_count(topo, info)
    checks = [Check("gpu_count", counted, reason)]
    for name, check in PAIR_CHECKS:
        checks.append(Check(name, *check(topo, info)) if counted
                      else Check(name, None, "not run: the GPU counts or matrix shapes differ"))
    return checks


def failed(checks: list[Check]) -> list[str]:
    """Names of the checks that failed (not those not run: gpu_count's failure covers them)."""
    return [c.name for c in checks if c.ok is False]


def nvlink_ranking(topo: TopoMatrix, info: dict[str, Any]) -> list[dict[str, Any]]:
    """For each GPU, its NVLink peers (topo's) in the order its tiers list them (index
    order when the plan has none) with their link counts, and whether more links came
    first. Reported, not checked: aqua_alloc ranks NVLink peers equally. (When the GPU
    counts differ, info's gpu<i> may be another GPU: index order then.)"""
    tiers_of = plan_tiers(info) if len(info["gpus"]) == topo.num_gpus else {}
    out = []
    for d in range(topo.num_gpus):
        order = _tier_gpus(tiers_of[d]) if d in tiers_of else list(range(topo.num_gpus))
        order += [p for p in range(topo.num_gpus) if p not in order]  # unlisted peers last
        peers = [{"gpu": p, "links": topo.nvlinks[d][p]}
                 for p in order if p != d and p < topo.num_gpus and topo.nvlinks[d][p]]
        links = [p["links"] for p in peers]
        out.append({"index": d, "nvlink_peers": peers, "most_links_first": links == sorted(links, reverse=True)})
    return out


# --------------------------------------------------------------------------------------


def format_summary(topo: TopoMatrix, info: dict[str, Any], checks: list[Check],
                   ranking: list[dict[str, Any]]) -> str:
    n = topo.num_gpus
    width = max([len(f"gpu{n - 1}"), *(len(c) for row in topo.connection for c in row)]) + 2
    lines = [f"nvidia-smi topo -m: {n} GPUs",
             " " * (width + 2) + "".join(f"{f'gpu{j}':>{width}}" for j in range(n))]
    lines += [f"  {f'gpu{i}':<{width}}" + "".join(f"{c:>{width}}" for c in row)
              for i, row in enumerate(topo.connection)]
    num_nvlink = sum(map(sum, info["nvlink"]))
    lines.append(f"info: {len(info['gpus'])} GPUs, {num_nvlink} ordered pairs NVLink")
    lines += [f"  note: {note}" for note in info["notes"]]
    lines.append("NVLink peers in tier order, with links (aqua_alloc ranks them equally; not checked):")
    for r in ranking:
        peers = ", ".join(f"gpu{p['gpu']} NV{p['links']}" for p in r["nvlink_peers"]) or "none"
        lines.append(f"  gpu{r['index']}: {peers}" + ("" if r["most_links_first"] else "  (not most links first)"))
    lines.append("checks:")
    status = {True: "PASS", False: "FAIL", None: "SKIP"}
    lines += [f"  {status[c.ok]} {c.name}: {c.reason}" for c in checks]
    names = failed(checks)
    lines.append("topology check: " + (f"FAIL ({', '.join(names)})" if names else "PASS"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", metavar="PATH", default=None,
                        help="write the parsed matrices, the checks and ok there as JSON")
    parser.add_argument("--topo-file", metavar="PATH", default=None,
                        help="read saved `nvidia-smi topo -m` output instead of running it")
    parser.add_argument("--info-file", metavar="PATH", default=None,
                        help="read saved `python -m aqua_alloc info --json` output instead of running it")
    args = parser.parse_args(argv)
    try:
        if args.topo_file:
            topo_text, topo_source = _read_file(args.topo_file, "--topo-file"), args.topo_file
        else:
            topo_text, topo_source = run_topo(), " ".join(TOPO_COMMAND)
        try:
            topo = parse_topo(topo_text)
        except TopoFormatError as e:
            raise TopoFormatError(f"{topo_source}: {e}") from None
        if args.info_file:
            info_source, info_exit = args.info_file, None
            try:
                data = json.loads(_read_file(args.info_file, "--info-file"))
            except ValueError as e:
                raise InfoFormatError(f"--info-file {args.info_file}: not JSON: {e}") from None
        else:
            info_source = "python -m aqua_alloc info --json (CUDA_DEVICE_ORDER=PCI_BUS_ID)"
            data, info_exit = run_info()
        try:
            info = read_info(data)
        except InfoFormatError as e:
            raise InfoFormatError(f"{info_source}: {e}") from None
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    checks = run_checks(topo, info)
    ranking = nvlink_ranking(topo, info)
    names = failed(checks)
    ok = all(c.ok for c in checks)
    print(format_summary(topo, info, checks, ranking), flush=True)
    if args.out:
        result = {
            "ok": ok, "failed": names, "checks": [dataclasses.asdict(c) for c in checks],
            "topo": {"source": topo_source, **topo.to_dict(), "text": topo_text},
            "info": {"source": info_source, "exit": info_exit, **info},
            "nvlink_ranking": ranking,
        }
        try:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        except OSError as e:
            print(f"{PROG}: error: --out {args.out}: cannot write it: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
