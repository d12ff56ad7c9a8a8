import os
import sys
from pathlib import Path

# Triton kernels run on the CPU through the interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The shared Omniglot arrays (CI and developers: ../shared/data/omniglot from the repo root).
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("IMAML_DATA", str(ROOT.parent / "shared" / "data" / "omniglot"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
