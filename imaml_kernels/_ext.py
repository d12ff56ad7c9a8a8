"""What this machine can run: the native extension ``imaml_kernels._C`` (loaded here if it
was built) and Triton (importable; interpreted on the CPU).

The package works without the extension (reference and Triton paths); one warning says how to
build it. Nothing here imports another module of the package.
"""

import functools
import importlib.util
import os
import warnings

try:
    from . import _C  # noqa: F401

    EXT_ERROR = None
except ImportError as exc:  # not built, or built for another Python
    _C = None
    EXT_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "imaml_kernels: the native extension imaml_kernels._C is not built "
        f"({EXT_ERROR}); only the 'reference' and 'triton' backends are available. "
        "Build it with `pip install -e .` (CMake, Ninja and pybind11 needed; "
        "set CUDA_HOME for the CUDA kernels).",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_EXT = _C is not None
HAS_CUDA_EXT = HAS_EXT and bool(getattr(_C, "has_cuda", False))


@functools.lru_cache(maxsize=None)
def triton_importable():
    """True when ``triton`` can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted():
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
