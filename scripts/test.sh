#!/usr/bin/env bash
# Set up the pinned CPU test environment, build the extension (C++ always, CUDA when nvcc
# is found), and run the whole test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export IMAML_DATA="${IMAML_DATA:-$(cd .. && pwd)/shared/data/omniglot}"
export TRITON_INTERPRET=1
python3 -m pip install -q -r requirements-test.txt
python3 -m pip install --no-build-isolation -v -e . 2>&1 | grep -E '^\s*\[[0-9]+/[0-9]+\]|imaml_kernels:' || true
python3 -c "import imaml_kernels._C as C; print('imaml_kernels._C built; CUDA kernels:', C.has_cuda)"
python3 -m pytest -q tests "$@"
