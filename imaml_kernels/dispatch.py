"""The one dispatch point: which backend runs a kernel.

Backends, in the order of the automatic choice:

- ``"cuda"``: the CUDA kernels of the native extension (CUDA tensors);
- ``"triton"``: the Triton kernels (CUDA tensors; CPU tensors only through the
  interpreter, ``TRITON_INTERPRET=1``, and only when named);
- ``"cpu"``: the C++ kernels of the native extension (CPU tensors);
- ``"reference"``: pure PyTorch, any device.

The choice uses static facts only (device, dtype, what is built and importable), so
``torch.compile`` traces it as constants. An explicit ``backend=`` argument wins, then the
``IMAML_BACKEND`` environment variable, then the automatic choice. A backend named
explicitly that cannot run raises a ``RuntimeError`` listing why; the automatic choice
falls back quietly.
"""

import functools
import importlib.util
import os

import torch

from . import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference")
SUPPORTED_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=None)
def _triton_importable():
    return importlib.util.find_spec("triton") is not None


def triton_interpreted():
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_problems(backend, device, dtype):
    """Reasons why ``backend`` cannot run on tensors of ``device``/``dtype`` (empty list: it can)."""
    device = torch.device(device)
    problems = []
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r}; expected one of {BACKENDS}"]
    if backend != "reference" and dtype not in SUPPORTED_DTYPES:
        problems.append(f"dtype {dtype} is not supported (float32, float64)")
    if backend in ("cuda", "cpu") and not _ext.HAS_EXT:
        problems.append(f"the native extension is not built ({_ext.EXT_ERROR})")
    if backend == "cuda":
        if _ext.HAS_EXT and not _ext.HAS_CUDA_EXT:
            problems.append("the native extension was built without CUDA (no nvcc at build time)")
        if device.type != "cuda":
            problems.append(f"tensors are on {device}, not a CUDA device")
    elif backend == "cpu":
        if device.type != "cpu":
            problems.append(f"tensors are on {device}, not the CPU")
    elif backend == "triton":
        if not _triton_importable():
            problems.append("triton is not installed")
        if device.type == "cpu" and not triton_interpreted():
            problems.append("CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing)")
        elif device.type not in ("cpu", "cuda"):
            problems.append(f"tensors are on {device}; Triton needs CUDA (or the CPU interpreter)")
    return problems


def select_backend(device, dtype, backend=None):
    """Return the backend name for tensors on ``device`` with ``dtype``.

    Args:
        device: ``torch.device`` (or string) of the operands.
        dtype: their dtype.
        backend: ``None`` for automatic (or ``IMAML_BACKEND``), else one of :data:`BACKENDS`.

    Example::

        >>> select_backend("cpu", torch.float32)
        'cpu'
    """
    name = backend if backend is not None else os.environ.get("IMAML_BACKEND") or None
    if name is not None:
        problems = backend_problems(name, device, dtype)
        if problems:
            source = "backend=" if backend is not None else "IMAML_BACKEND="
            raise RuntimeError(
                f"imaml_kernels: {source}{name!r} cannot run here: " + "; ".join(problems)
            )
        return name
    device = torch.device(device)
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for candidate in order:
        if not backend_problems(candidate, device, dtype):
            return candidate
    return "reference"


def available_backends(device, dtype=torch.float32):
    """Backends that can run on ``device``, in dispatch order (the Triton interpreter included)."""
    return [b for b in BACKENDS if not backend_problems(b, device, dtype)]
