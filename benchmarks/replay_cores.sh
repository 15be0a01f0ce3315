#!/usr/bin/env bash
# Replays a recorded aqua_alloc trace against the cores of several commits, on simulated GPUs
# (benchmarks/replay_placement_sim.py), each core built in a git worktree of its own.
#
#   bash benchmarks/replay_cores.sh TRACE.json OUT_STEM COMMIT...
#
# Writes OUT_STEM-<commit>.json per commit and OUT_STEM.log (everything printed). Python:
# $PYTHON, default python3 (with torch and aqua_alloc's dependencies installed).
set -euo pipefail
trace=$1 stem=$2
shift 2
py=${PYTHON:-python3}
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'for d in "$work"/*/; do git -C "$root" worktree remove --force "$d" >/dev/null 2>&1 || true; done; rm -rf "$work"' EXIT
{
  echo "# replay_cores.sh $(date -u +%FT%TZ) on $(hostname): trace $trace; harness at $(git -C "$root" rev-parse --short HEAD)"
  for commit in "$@"; do
    short=$(git -C "$root" rev-parse --short "$commit")
    git -C "$root" worktree add --detach -q "$work/$short" "$short"
    (cd "$work/$short" && "$py" setup.py -q build_ext --inplace >/dev/null)
    echo "## core $short ($(git -C "$root" log -1 --format=%s "$short" | cut -c1-100))"
    PYTHONPATH="$work/$short" "$py" "$root/benchmarks/replay_placement_sim.py" "$trace" --out "$stem-$short.json" --label "$short"
  done
} 2>&1 | tee "$stem.log"
