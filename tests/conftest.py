import os
import sys
from pathlib import Path

import torch

# The shared Omniglot arrays (CI and developers: ../shared/data/omniglot from the repo root).
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("IMAML_DATA", str(ROOT.parent / "shared" / "data" / "omniglot"))
sys.path.insert(0, str(ROOT))

# Triton kernels run on the CPU through the interpreter only where no CUDA device exists: on a
# GPU they must run compiled (tests/test_gpu.py checks it). The variable is read when triton is
# imported, so it is decided here, before any test module imports imaml_kernels (importing
# torch does not import triton; torch.cuda.is_available() does not either). An explicit
# TRITON_INTERPRET in the environment (scripts/test.sh, bench/gpu_check.sh) is left alone.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    if "triton" in sys.modules:
        raise RuntimeError("conftest: triton was imported before TRITON_INTERPRET could be set")
    os.environ["TRITON_INTERPRET"] = "1"

torch.set_num_threads(min(2, os.cpu_count() or 1))
