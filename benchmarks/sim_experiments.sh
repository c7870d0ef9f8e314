#!/usr/bin/env bash
# Re-runs the simulator experiments of issue 3 (numbers in benchmarks/results/scheduler.md).
# JSON outputs land in benchmarks/results/sim/. Takes ~10-15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/sim
mkdir -p "$OUT"
N=${N:-1000}
# 1. ShareGPT-like, heavy-tailed outputs (cv 2): throughput at the SLO per policy.
fastserve sim --workload sharegpt --cv 2 --rate 1.5 --num-jobs $N --sweep-rates --json --plot "$OUT/sharegpt_cv2.png" > "$OUT/sharegpt_cv2_sweep.json"
# 2. Same, cv 1.
fastserve sim --workload sharegpt --cv 1 --rate 1.5 --num-jobs $N --sweep-rates --json --plot "$OUT/sharegpt_cv1.png" > "$OUT/sharegpt_cv1_sweep.json"
# 3. Alpaca-like, cv 2.
fastserve sim --workload alpaca --cv 2 --rate 8 --num-jobs $N --sweep-rates --json > "$OUT/alpaca_cv2_sweep.json"
# 4. Skip-join ablation on the long-prompt / short-output mix.
fastserve sim --workload longprompt --cv 1 --rate 1.5 --num-jobs $N --policy sj-mlfq,mlfq,fcfs,srpt --sweep-rates --json > "$OUT/longprompt_sweep.json"
# 5. All policies at the rate where fcfs reaches the SLO (read off the sweeps above).
fastserve sim --workload sharegpt --cv 2 --rate 1.484 --num-jobs $N --json > "$OUT/sharegpt_cv2_at_fcfs_slo.json"
fastserve sim --workload sharegpt --cv 1 --rate 1.469 --num-jobs $N --json > "$OUT/sharegpt_cv1_at_fcfs_slo.json"
fastserve sim --workload alpaca --cv 2 --rate 9.5 --num-jobs $N --json > "$OUT/alpaca_cv2_at_fcfs_slo.json"
# 6. KV placement with GPU memory at a third of the unconstrained peak (sj-mlfq, kv none, unlimited: 713 blocks at rate 1.0).
fastserve sim --workload sharegpt --cv 2 --rate 1.0 --num-jobs $N --policy sj-mlfq --kv-policy none --json > "$OUT/kv_unconstrained.json"
for host in 952 100000; do
  for kv in proactive reactive recompute none; do
    fastserve sim --workload sharegpt --cv 2 --rate 1.0 --num-jobs $N --policy sj-mlfq --kv-policy $kv \
      --gpu-kv-blocks 238 --host-kv-blocks $host --json > "$OUT/kv_${kv}_host${host}.json"
  done
done
# 7. Scheduler cost.
fastserve bench scheduler --waiting 1000,10000,100000 --batch 32 --json > "$OUT/bench_scheduler.json"
