#!/usr/bin/env bash
# Same-call A/B of bench_move: an older commit's build against the working tree's, run
# alternately (old, new, old, new) so that both see the same machine. This is how
# benchmarks/results/bench_move-ab-refactor-* were made (OLD=8f5aed5, the code before the
# layout refactor).
#   Here (with git):  bash benchmarks/ab_bench_move.sh prepare [OLD]   # writes .ab/old (git-ignored)
#   On the GPU:       bash benchmarks/ab_bench_move.sh run OUTDIR       # carry .ab with the call
set -u
case ${1:-} in
  prepare)
    rm -rf .ab/old && mkdir -p .ab/old
    git archive "${2:-8f5aed5}" csrc aqua_alloc setup.py setup.cfg pyproject.toml benchmarks/bench_move.py \
      | tar -x -C .ab/old ;;
  run)
    R=${2:?OUTDIR}; S=${SIZES:-64MiB,256MiB,1GiB}; mkdir -p "$R"
    python3 -m pip install -q --no-build-isolation --no-deps -e . > "$R/build.log" 2>&1
    (cd .ab/old && python3 setup.py -q build_ext --inplace) > "$R/build-old.log" 2>&1
    for i in 1 2; do
      PYTHONPATH=$PWD/.ab/old python3 .ab/old/benchmarks/bench_move.py --sizes "$S" --out "$R/ab-old$i.json" \
        > "$R/ab-old$i.log" 2>&1
      python3 benchmarks/bench_move.py --sizes "$S" --out "$R/ab-new$i.json" > "$R/ab-new$i.log" 2>&1
    done ;;
  *) echo "usage: $0 prepare [OLD] | run OUTDIR" >&2; exit 2 ;;
esac
