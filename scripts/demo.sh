#!/usr/bin/env bash
# Set up and run the main job on a fresh machine (CPU). Until the trainer lands this is the
# self-check: every built backend on a small multi-task CG problem, as a table.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export IMAML_DATA="${IMAML_DATA:-$(cd .. && pwd)/shared/data/omniglot}"
python3 -m pip install -q -r requirements-test.txt
python3 -m pip install -q --no-build-isolation -e .
TRITON_INTERPRET="${TRITON_INTERPRET:-1}" python3 -m imaml_kernels.selfcheck
