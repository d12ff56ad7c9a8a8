#!/usr/bin/env bash
# The paper's Omniglot 5-way 1-shot schedule (or as much as fits) on a lent GPU, then the
# 600-task evaluation. Usage: bash bench/gpu_train.sh [STEPS] [gd|hf]. Output under
# ${OUT:-bench/results/gpu}/train_<inner>/ (metrics.jsonl, curves.png, eval.json, log).
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-3000}"
INNER="${2:-gd}"
OUTDIR="${OUT:-bench/results/gpu}/train_${INNER}"
mkdir -p "$OUTDIR"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1
export IMAML_DATA="${IMAML_DATA:-$PWD/../shared/data/omniglot}"
python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1
python3 -m imaml_kernels.trainer --preset omniglot-5w1s --inner "$INNER" --device cuda --steps "$STEPS" \
    --eval-tasks 600 --out "$OUTDIR" --no-progress 2>&1 | tee "$OUTDIR/log.txt"
