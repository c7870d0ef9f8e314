#!/usr/bin/env bash
# Pipeline / tensor-parallel checks on a machine with CUDA GPUs, where torch, transformers,
# tokenizers, safetensors, msgpack are installed but this project is not: the split-replica
# tests (CUDA ones included), then bench_pipeline.py on cuda (NCCL with >= 2 GPUs, else both
# stages on one GPU over gloo) and on the CPU. Results go to ${OUT:-out}/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
shim=$(mktemp -d); mkdir -p "$shim/fastserve"; touch "$shim/fastserve/__init__.py"
for d in common gateway scheduler gpu_worker kvstore; do ln -s "$PWD/$d" "$shim/fastserve/$d"; done
export PYTHONPATH="$shim:$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())"
python3 -m pytest -p no:cacheprovider -q -ra tests/test_engine_pipeline.py tests/test_common_model_split.py \
    2>&1 | tee "$OUT/pytest_pipeline.log" | tail -15
backend=$(python3 -c "import torch; print('' if torch.cuda.device_count() >= 2 else '--backend gloo')")
python3 benchmarks/bench_pipeline.py --device cuda $backend --out "$OUT/bench_pipeline_cuda.json" 2>/dev/null | tail -60
OMP_NUM_THREADS=1 python3 benchmarks/bench_pipeline.py --out "$OUT/bench_pipeline_cpu.json" 2>/dev/null | tail -60
