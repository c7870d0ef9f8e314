#!/usr/bin/env bash
# Re-runs the simulator experiments of issue 3 (numbers in benchmarks/results/scheduler.md).
# JSON (and PNG) outputs land in benchmarks/results/sim/. ~15 minutes on 2 busy CPU cores.
#
#   bash benchmarks/sim_experiments.sh [SECTION...]
# SECTIONs: sharegpt_cv2 sharegpt_cv1 alpaca_cv2 longprompt kv bench (default: all; kv needs
# sharegpt_cv2's sweep). Environment:
#   N=1000            jobs per run
#   PROFILE=path.json cost profile for every `fastserve sim` (default: the built-in CPU profile)
#   PREFIX=gpu_       prefix of every output file name (default: none)
#   BANDWIDTHS="2e8"  copy bandwidths (bytes/s) of the proactive-vs-reactive sensitivity runs
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/sim
mkdir -p "$OUT"
N=${N:-1000}
P=${PREFIX:-}
BANDWIDTHS=${BANDWIDTHS:-2e8}
PROF=()
if [ -n "${PROFILE:-}" ]; then PROF=(--profile "$PROFILE"); fi
SECTIONS=${*:-sharegpt_cv2 sharegpt_cv1 alpaca_cv2 longprompt kv bench}
get() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }
sim() { fastserve sim "${PROF[@]}" "$@"; }

# 1-3. Throughput at the SLO per policy (sweep), then every policy at the rate
# where fcfs reaches the SLO.
sweep() {  # name workload cv start_rate
  sim --workload "$2" --cv "$3" --rate "$4" --num-jobs $N --sweep-rates --json \
    --plot "$OUT/$P$1.png" > "$OUT/$P$1_sweep.json"
  local rf
  # The search expands at most 1.5^10 from the start rate; where fcfs never
  # crossed the SLO (a faster cost profile), go on from where it stopped.
  if [ "$(get "$OUT/$P$1_sweep.json" "d['fcfs']['sweep_saturated']")" = True ]; then
    rf=$(get "$OUT/$P$1_sweep.json" "round(d['fcfs']['max_rate_at_slo'], 4)")
    mv "$OUT/$P$1_sweep.json" "$OUT/$P$1_sweep_capped.json"
    sim --workload "$2" --cv "$3" --rate "$rf" --num-jobs $N --sweep-rates --json \
      --plot "$OUT/$P$1.png" > "$OUT/$P$1_sweep.json"
  fi
  rf=$(get "$OUT/$P$1_sweep.json" "round(d['fcfs']['max_rate_at_slo'], 4)")
  sim --workload "$2" --cv "$3" --rate "$rf" --num-jobs $N --json > "$OUT/$P$1_at_fcfs_slo.json"
}

kv() {
  # 5. KV placement: GPU memory at a third of the unconstrained peak of sj-mlfq at
  # 2/3 of fcfs's SLO rate (ShareGPT, cv 2); host pool 4x the GPU (default) and large.
  local R B host kv bw
  R=$(get "$OUT/${P}sharegpt_cv2_sweep.json" "round(d['fcfs']['max_rate_at_slo'] * 2 / 3, 3)")
  sim --workload sharegpt --cv 2 --rate "$R" --num-jobs $N --policy sj-mlfq,fcfs --kv-policy none \
    --json > "$OUT/${P}kv_unconstrained.json"
  B=$(get "$OUT/${P}kv_unconstrained.json" "d['sj-mlfq']['peak_gpu_blocks'] // 3")
  echo "kv experiment: rate $R, gpu blocks $B" > "$OUT/${P}kv_setup.txt"
  for host in $((4 * B)) 100000; do
    for kv in proactive reactive recompute none; do
      sim --workload sharegpt --cv 2 --rate "$R" --num-jobs $N --policy sj-mlfq,fcfs --kv-policy $kv \
        --gpu-kv-blocks "$B" --host-kv-blocks $host --json > "$OUT/${P}kv_${kv}_host${host}.json"
    done
  done
  # 5b. Sensitivity to the copy link (slower: copies comparable to iterations), large host.
  for bw in $BANDWIDTHS; do
    for kv in proactive reactive; do
      sim --workload sharegpt --cv 2 --rate "$R" --num-jobs $N --policy sj-mlfq --kv-policy $kv \
        --gpu-kv-blocks "$B" --host-kv-blocks 100000 --copy-bandwidth "$bw" --json > "$OUT/${P}kv_bw${bw}_${kv}.json"
    done
  done
}

for s in $SECTIONS; do
  case $s in
    sharegpt_cv2) sweep sharegpt_cv2 sharegpt 2 1.5 ;;
    sharegpt_cv1) sweep sharegpt_cv1 sharegpt 1 1.5 ;;
    alpaca_cv2) sweep alpaca_cv2 alpaca 2 8 ;;
    # 4. Skip-join ablation on the long-prompt / short-output mix.
    longprompt) sweep longprompt longprompt 1 0.5 ;;
    kv) kv ;;
    # 6. Scheduler cost (independent of the cost profile).
    bench) fastserve bench scheduler --waiting 1000,10000,100000 --batch 32 --json > "$OUT/${P}bench_scheduler.json" ;;
    *) echo "unknown section: $s" >&2; exit 2 ;;
  esac
done
