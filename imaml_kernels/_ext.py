"""Loads the native extension ``imaml_kernels._C`` if it was built.

The package works without it (reference and Triton paths); one warning says how to build it.
"""

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
