#!/usr/bin/env bash
# The services' GPU run, as one short script for a lent GPU machine (minutes):
# the CUDA offload/upload check through the shared-memory host pool, and the
# real stack under the same Poisson ShareGPT-like load with fcfs and sj-mlfq,
# each beside the simulator's prediction for the same trace.
#   OUT=/some/dir bash benchmarks/services_gpu.sh
# Needs structlog and orjson importable (the device image lacks them: carry wheels in .whl/).
set -uo pipefail
OUT="${OUT:-/tmp/services_gpu}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
# The fastserve.* namespace without installing: links to the service folders.
mkdir -p /tmp/pkg/fastserve
for d in common gateway scheduler gpu_worker kvstore; do ln -sfn "$PWD/$d" "/tmp/pkg/fastserve/$d"; done
export PYTHONPATH="/tmp/site:/tmp/pkg:$PWD" PYTHONUNBUFFERED=1
PY=python3
M=/tmp/models/small
$PY -c "from fastserve.gpu_worker.model_maker import make_model; make_model('$M', preset='small')" || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -n "${PROFILE:-}" ]; then cp "$PROFILE" "$OUT/profile_cuda.json"; else
    timeout 120 $PY -m fastserve.cli profile --model $M --device cuda --out "$OUT/profile_cuda.json" --quick 2>&1 | tail -1
fi
timeout 150 $PY benchmarks/services_check.py --model $M --device cuda --jobs 16 --prompt-len 40 --max-tokens 40 \
    --gpu-kv-blocks 16 --out "$OUT/offload_cuda.json" 2>"$OUT/offload_err.log" | tail -30
# Load: LOAD x the batch-of-8 decode capacity the profile predicts.
LOAD="${LOAD:-1.1}"
RATE=$($PY -c "LOAD = $LOAD

from fastserve.scheduler.core.cost_model import CostModel
c = CostModel.from_profile('$OUT/profile_cuda.json'); print(min(20.0, max(0.5, round(LOAD * 8 / (338 * c.decode_time(8, 400)), 2))))")
JOBS=$($PY -c "print(min(90, max(40, round($RATE * 20))))")
echo "rate $RATE req/s, $JOBS jobs"
for pol in fcfs sj-mlfq; do
    timeout 100 $PY benchmarks/loadgen.py --spawn --device cuda --model $M --policy $pol --workload sharegpt --cv 2 \
        --num-jobs "$JOBS" --rate "$RATE" --max-batch-size 8 --gpu-kv-blocks 4096 --profile "$OUT/profile_cuda.json" --sim --quiet \
        --out "$OUT/loadgen_$pol.json" >/dev/null 2>"$OUT/loadgen_err_$pol.log"
    echo "$pol rc=$?"; $PY -c "
import json; d = json.load(open('$OUT/loadgen_$pol.json')); r = d['real']
print(json.dumps({'real_jct': r['jct_s'], 'real_norm': r['norm_latency_s_per_token'], 'ttft': r['ttft_s']['mean'],
 'errors': r['errors'], 'sim_jct': d['sim']['mean_jct'], 'sim_in_situ_jct': d.get('sim_in_situ', {}).get('mean_jct'),
 'loop': d['scheduler_loop']}))" 2>&1 | tail -3
done
