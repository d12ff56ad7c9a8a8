#!/usr/bin/env bash
# Set up and run the main job on a fresh machine (CPU): a short iMAML meta-training on
# Omniglot 5-way 1-shot (preset omniglot-5w1s-demo: the paper's network, GD inner loop,
# implicit meta-gradient by 5 CG iterations; see imaml_kernels/trainer/presets.py), then the
# 600-task meta-test evaluation, printing the mean accuracy ± 95% CI. Under 15 minutes on
# 2 CPU cores, setup included (bench/results/cpu_demo.md). Extra arguments go to
# imaml-train (e.g. --steps 50 for a quicker look, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export IMAML_DATA="${IMAML_DATA:-$(cd .. && pwd)/shared/data/omniglot}"
# Idle OpenMP threads sleep instead of spinning: with spinning threads, one other busy
# process on a 2-core machine made every meta-step about 20x slower (measured).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
SECONDS=0
python3 -m pip install -q -r requirements-test.txt
python3 -m pip install -q --no-build-isolation -e .
echo "setup: ${SECONDS} s"
OUT="${IMAML_DEMO_OUT:-runs/omniglot-5w1s-demo}"
# A rerun of the demo starts over (--overwrite replaces its earlier run), unless --resume is given.
FRESH=--overwrite
for arg in "$@"; do
    if [ "$arg" = "--resume" ]; then FRESH=; fi
done
python3 -m imaml_kernels.trainer --preset omniglot-5w1s-demo --out "$OUT" ${FRESH} \
    --threads "${IMAML_THREADS:-$(python3 -c 'import os; print(min(2, os.cpu_count() or 1))')}" "$@"
echo "demo total: ${SECONDS} s (setup, training, evaluation); run folder: $OUT"
