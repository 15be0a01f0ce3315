#!/usr/bin/env bash
# The H200 runs behind benchmarks/results/: build, then each step with its own time limit,
# every log under $OUT (default benchmarks/results/). Usage: bash benchmarks/run_h200.sh STEP...
# Steps: build gpu_tests demo long_prompt long_prompt_static long_prompt_window move probe_park probe_host probe_rerecord probe_sched soak sanitizer serve
#        serve_static serve_long serve_long_static coordinator reclaim_load cluster topology move_pairs
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
# Result files are named by what they measured and the machine: NAME-<N>gpu-<model>, e.g.
# bench_move-1gpu-h200 (model: the GPU's name less its vendor, lower case).
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())" 2>/dev/null || echo gpu)
N=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
tag="${N}gpu-$GPU"
run() {  # run NAME SECONDS CMD...: log to $OUT/NAME-$tag.log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name-$tag.log" 2>&1
  echo "[$name] exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/$name-$tag.log"
}
for step in "$@"; do
  case $step in
    build) run build 240 python3 -m pip install --no-build-isolation --no-deps -e . ;;
    gpu_tests) run gpu_tests 240 bash -c "cd tests && python3 -m pytest -m gpu -v -p no:cacheprovider" ;;
    long_prompt) run bench_long_prompt 480 python3 benchmarks/bench_long_prompt.py --out "$OUT" ;;
    long_prompt_static)  # the aqua systems with a static cache and a compiled step, against transformers' own
      run bench_long_prompt-static 590 python3 benchmarks/bench_long_prompt.py --cache static --name static --out "$OUT" ;;
    long_prompt_window)  # aqua-host with another read-ahead window (READ_AHEAD, default 2GiB)
      run "bench_long_prompt-ra${READ_AHEAD:-2GiB}" 200 python3 benchmarks/bench_long_prompt.py \
        --read-ahead "${READ_AHEAD:-2GiB}" --systems local,aqua-host,offloaded --name "ra${READ_AHEAD:-2GiB}" --out "$OUT" ;;
    probe_park) run probe_park_copy 120 python3 benchmarks/probe_park_copy.py --sizes 256M,1G,4G \
                  --out "$OUT/probe_park_copy-$tag.json" ;;
    probe_host) run probe_host_access 120 python3 benchmarks/probe_host_access.py --out "$OUT/probe_host_access-$tag.json" ;;
    probe_rerecord)  # a new static cache per request against one reused: do the CUDA graphs last?
      run probe_graph_rerecord 300 python3 benchmarks/probe_graph_rerecord.py --requests "${RERECORD_REQUESTS:-200}" \
        --out "$OUT/probe_graph_rerecord-$tag.json" ;;
    probe_sched) run probe_sched_paired 400 python3 benchmarks/probe_sched_paired.py --rounds "${PROBE_ROUNDS:-6}" ;;
    move)  # DEVICE_KEEP=0,4GiB measures kept device backings against released ones in the same run
      run bench_move 400 python3 benchmarks/bench_move.py --sizes "${MOVE_SIZES:-64MiB,256MiB,1GiB,4GiB,8GiB}" \
            --device-keep "${DEVICE_KEEP:-0}" --out "$OUT/bench_move-$tag.json" ;;
    move_pairs)  # 4 to 8 GPUs (issue 23): park/resume between every pair of GPUs, one run per source GPU, put
      # first in CUDA_VISIBLE_DEVICES (e.g. 3,0,1,2); rows name physical GPUs (src_gpu, dst_gpu), so the files merge.
      # PAIRS_SRC="0 1 2 3" runs some source GPUs only (to split the step over two calls)
      for s in ${PAIRS_SRC:-$(seq 0 $((N - 1)))}; do
        vis=$s; for d in $(seq 0 $((N - 1))); do [ "$d" = "$s" ] || vis="$vis,$d"; done
        run "bench_move-pairs-src$s" 70 env CUDA_VISIBLE_DEVICES="$vis" python3 benchmarks/bench_move.py \
          --peers all --sizes 256MiB,1GiB --repeat 3 --out "$OUT/bench_move-pairs-src$s-$tag.json"
      done ;;
    soak) run soak_gpu 200 python3 benchmarks/soak_gpu.py --seconds "${SOAK_SECONDS:-120}" --out "$OUT/soak_gpu-$tag.json" ;;
    sanitizer) run sanitizer_memcheck 300 compute-sanitizer --tool memcheck --target-processes all \
                 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py ${SANITIZER_K:+-k "$SANITIZER_K"} ;;
    reclaim_load)  # two GPUs: GPU 1 takes back the memory it lends while a scheduler on GPU 0 serves
      run reclaim_under_load 300 python3 benchmarks/reclaim_under_load.py --out "$OUT/reclaim_under_load-$tag.json" ;;
    topology) run topology_check 120 python3 benchmarks/topology_check.py --out "$OUT/topology_check-$tag.json" ;;
    coordinator) run coordinator_gpu 120 python3 benchmarks/coordinator_gpu_check.py --out "$OUT/coordinator_gpu-$tag.json" ;;
    demo) run demo 240 python3 -m aqua_alloc demo --out "$OUT/demo-$tag" ;;
    serve) run bench_serve 590 python3 benchmarks/bench_serve.py ${SERVE_ARGS:-} --out "$OUT" ;;
    serve_static)  # the conv trace with a static cache and a compiled step (issue 19's serving target)
      run bench_serve-conv-static-run 590 python3 benchmarks/bench_serve.py ${TRACES_DIR:+--traces-dir "$TRACES_DIR"} \
        --trace conv --systems "${SERVE_SYSTEMS:-fcfs,aqua-host}" --loads 0.8 --cache static --switch-overhead 0.05 \
        --budget-s "${SERVE_BUDGET_S:-60}" --name "bench_serve-conv-static-$tag" --out "$OUT" --verbose ${SERVE_FLAGS:-} ;;
    serve_long)  # long contexts in bursts: Mooncake's first 16 requests (10 at one instant), 8B, prompts up to 8192
      # tokens, a KV budget of about three contexts; traces from $TRACES_DIR (default shared/traces near the repo)
      run bench_serve-mooncake-8b-run 590 python3 benchmarks/bench_serve.py ${TRACES_DIR:+--traces-dir "$TRACES_DIR"} \
        --trace mooncake --model llama-8b --max-prompt 8192 --max-output 128 --kv-budget 3GiB --max-requests 16 \
        --loads 0.8 --systems "${SERVE_SYSTEMS:-fcfs,aqua-host,hf-cb}" --switch-overhead 0.1 --budget-s 300 \
        --name "bench_serve-mooncake-8b-$tag" --out "$OUT" --verbose ${SERVE_FLAGS:-} ;;
    serve_long_static)  # the same with a static cache and a compiled step for fcfs and aqua-host
      run bench_serve-mooncake-8b-static-run 590 python3 benchmarks/bench_serve.py ${TRACES_DIR:+--traces-dir "$TRACES_DIR"} \
        --trace mooncake --model llama-8b --max-prompt 8192 --max-output 128 --kv-budget 3GiB --max-requests 16 \
        --loads 0.8 --systems "${SERVE_SYSTEMS:-fcfs,aqua-host}" --cache static --budget-s 300 \
        --name "bench_serve-mooncake-8b-static-$tag" --out "$OUT" --verbose ${SERVE_FLAGS:-} ;;
    cluster)  # 4 to 8 GPUs (issue 23): a coordinator, lenders holding a model, servers running bench_serve's
      # fcfs and aqua-peer; each lender takes memory back mid-run (reclaim, then its own allocations growing)
      # (the servers run issue 20's long-context serving: Mooncake trace, 8B; traces from $TRACES_DIR)
      run cluster_serve 590 python3 benchmarks/cluster_serve.py --servers "${CLUSTER_SERVERS:-0,1}" \
        --lenders "${CLUSTER_LENDERS:-2,3}" --timeout-s 450 --name "cluster_serve-$tag" --out "$OUT" \
        --serve-args "${TRACES_DIR:+--traces-dir $TRACES_DIR} --trace mooncake --model llama-8b --max-prompt 8192 \
          --max-output 128 --kv-budget 3GiB --max-requests 16 --loads 0.8 --check 10 --systems fcfs,aqua-peer --budget-s 240" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
