#!/usr/bin/env bash
# Engine checks on a machine with a CUDA GPU (and a quiet many-core CPU), where torch,
# transformers, tokenizers, safetensors are already installed but this project is not:
# CUDA tests, then bench_engine.py on cuda and on the CPU. Results go to ${OUT:-out}/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
shim=$(mktemp -d); mkdir -p "$shim/fastserve"; touch "$shim/fastserve/__init__.py"
for d in common gateway scheduler gpu_worker kvstore; do ln -s "$PWD/$d" "$shim/fastserve/$d"; done
export PYTHONPATH="$shim:$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -p no:cacheprovider -q -ra tests/test_engine_cuda.py tests/test_engine_equivalence.py \
    tests/test_engine_kv_copy.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
python3 benchmarks/bench_engine.py --device cuda --repeats 5 --out "$OUT/bench_cuda.json" 2>/dev/null | tail -40
python3 benchmarks/bench_engine.py --threads 2 --repeats 5 --out "$OUT/bench_cpu_2threads.json" 2>/dev/null | tail -40
