#!/usr/bin/env bash
# One prepared GPU check (H100/H200 with torch+cu, triton, nvcc, pybind11, ninja, cmake):
# build with all cores, run the GPU tests, run the benchmarks, print tables. Writes a copy of
# everything to ${OUT:-bench/results/gpu}/gpu_check.md. Target: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-bench/results/gpu}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.md"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" IMAML_BUILD_JOBS="$(nproc)" PYTHONUNBUFFERED=1
export IMAML_DATA="${IMAML_DATA:-$PWD/../shared/data/omniglot}"
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo '```'
  start=$(date +%s)
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
  echo "build: $(( $(date +%s) - start )) s"
  python3 -c "import imaml_kernels._C as C; print('CUDA kernels built:', C.has_cuda, 'devices:', C.cuda_device_count())"
  python3 -m imaml_kernels.selfcheck
  python3 -m pytest -q tests/test_gpu.py 2>&1 | tail -15
  # Every suite at paper shapes: tables, CSV and PNG plots under $OUTDIR.
  python3 -m bench all --device cuda --out "$OUTDIR"
  # The engine's second target shape: Omniglot 20-way 1-shot (T=16, 20 support, 25 steps).
  python3 -m bench meta-step --device cuda --way 20 --tasks 16 --inner-steps 25
  echo '```'
} 2>&1 | tee "$LOG"
