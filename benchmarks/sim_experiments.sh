#!/usr/bin/env bash
# Re-runs the simulator experiments of issue 3 (numbers in benchmarks/results/scheduler.md).
# JSON (and PNG) outputs land in benchmarks/results/sim/. ~15 minutes on 2 busy CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/sim
mkdir -p "$OUT"
N=${N:-1000}
get() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

# 1-3. Throughput at the SLO per policy (sweep), then every policy at the rate
# where fcfs reaches the SLO.
sweep() {  # name workload cv start_rate
  fastserve sim --workload "$2" --cv "$3" --rate "$4" --num-jobs $N --sweep-rates --json \
    --plot "$OUT/$1.png" > "$OUT/$1_sweep.json"
  local rf
  rf=$(get "$OUT/$1_sweep.json" "round(d['fcfs']['max_rate_at_slo'], 4)")
  fastserve sim --workload "$2" --cv "$3" --rate "$rf" --num-jobs $N --json > "$OUT/$1_at_fcfs_slo.json"
}
sweep sharegpt_cv2 sharegpt 2 1.5
sweep sharegpt_cv1 sharegpt 1 1.5
sweep alpaca_cv2 alpaca 2 8
# 4. Skip-join ablation on the long-prompt / short-output mix.
sweep longprompt longprompt 1 0.5

# 5. KV placement: GPU memory at a third of the unconstrained peak of sj-mlfq at
# 2/3 of fcfs's SLO rate (ShareGPT, cv 2); host pool 4x the GPU (default) and large.
R=$(get "$OUT/sharegpt_cv2_sweep.json" "round(d['fcfs']['max_rate_at_slo'] * 2 / 3, 3)")
fastserve sim --workload sharegpt --cv 2 --rate "$R" --num-jobs $N --policy sj-mlfq,fcfs --kv-policy none \
  --json > "$OUT/kv_unconstrained.json"
B=$(get "$OUT/kv_unconstrained.json" "d['sj-mlfq']['peak_gpu_blocks'] // 3")
echo "kv experiment: rate $R, gpu blocks $B" > "$OUT/kv_setup.txt"
for host in $((4 * B)) 100000; do
  for kv in proactive reactive recompute none; do
    fastserve sim --workload sharegpt --cv 2 --rate "$R" --num-jobs $N --policy sj-mlfq,fcfs --kv-policy $kv \
      --gpu-kv-blocks "$B" --host-kv-blocks $host --json > "$OUT/kv_${kv}_host${host}.json"
  done
done
# 5b. Sensitivity: a 80x slower copy link (copies comparable to iterations), large host.
for kv in proactive reactive; do
  fastserve sim --workload sharegpt --cv 2 --rate "$R" --num-jobs $N --policy sj-mlfq --kv-policy $kv \
    --gpu-kv-blocks "$B" --host-kv-blocks 100000 --copy-bandwidth 2e8 --json > "$OUT/kv_bw2e8_${kv}.json"
done

# 6. Scheduler cost.
fastserve bench scheduler --waiting 1000,10000,100000 --batch 32 --json > "$OUT/bench_scheduler.json"
