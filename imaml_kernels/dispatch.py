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

The same choice serves every op family. :func:`kernels` resolves it once (per
:func:`~imaml_kernels.cg_solve` call, per engine pass) into a :class:`Kernels` table of bound
implementations, so no op call re-decides. The network engine's stages have no CUDA C++
kernels: on a GPU ``"cuda"`` runs the CG kernels in CUDA C++ and the engine's stages in
Triton (named explicitly without Triton, it raises).
"""

import functools
import os

import torch

from . import _ext
from .ops import SPECS  # importing the ops package registers every family
from .ops._registry import bound

BACKENDS = ("cuda", "triton", "cpu", "reference")
SUPPORTED_DTYPES = (torch.float32, torch.float64)


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
        if not _ext.triton_importable():
            problems.append("triton is not installed")
        if device.type == "cpu" and not _ext.triton_interpreted():
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


# Ops of the CG family; every other registered op is a stage of the network engine.
CG_OPS = ("cg_dots", "cg_update")


def _engine_kernels_built():
    return _ext.HAS_EXT and hasattr(_ext._C, "maxpool_fwd_cpu")


class Kernels:
    """The implementation of every ``imaml::`` op for one choice of backend.

    Attributes: ``backend`` (what the CG ops run), ``engine_backend`` (what the engine's stages
    run), and one callable per op name (``cg_dots``, ``bn_fwd``, ...) taking the op's public
    arguments (:mod:`imaml_kernels.ops`)."""

    def __init__(self, backend, engine_backend):
        self.backend, self.engine_backend = backend, engine_backend
        for name, spec in SPECS.items():
            setattr(self, name, bound(spec, backend if name in CG_OPS else engine_backend))

    def __repr__(self):
        return f"Kernels(backend={self.backend!r}, engine_backend={self.engine_backend!r})"


@functools.lru_cache(maxsize=None)
def _kernels(backend, engine_backend):
    return Kernels(backend, engine_backend)


def _engine_choice(name, device, dtype, explicit):
    """The engine stages' backend for the CG-level choice ``name`` (see the module docstring)."""
    if name == "cuda":
        problems = backend_problems("triton", device, dtype)
        if not problems:
            return "triton"
        if explicit:
            raise RuntimeError("imaml_kernels: backend 'cuda' cannot run the network engine here: its GPU kernels are "
                               "Triton kernels, and " + "; ".join(problems))
        return "reference"
    if name == "cpu" and not _engine_kernels_built():
        if explicit:
            raise RuntimeError("imaml_kernels: backend 'cpu': the native extension lacks the engine kernels (rebuild it)")
        return "reference"
    return name


def kernels(device, dtype, backend=None) -> Kernels:
    """The :class:`Kernels` for tensors on ``device`` with ``dtype`` (``backend`` as in
    :func:`select_backend`).

    Example::

        >>> k = kernels("cpu", torch.float32)
        >>> k.backend, k.engine_backend
        ('cpu', 'cpu')
        >>> y, xhat, rstd = k.bn_fwd(x, gamma, beta, 1e-5, True)
    """
    device = torch.device(device)
    name = select_backend(device, dtype, backend)
    explicit = (backend if backend is not None else os.environ.get("IMAML_BACKEND") or None) is not None
    # Traced, the table is built afresh (no cache state; dynamo would bypass the cache anyway).
    make = _kernels.__wrapped__ if torch.compiler.is_compiling() else _kernels
    return make(name, _engine_choice(name, device, dtype, explicit))


def op(name: str, backend=None):
    """The ``imaml::<name>`` op as a callable that picks its backend from its first tensor
    argument (``backend`` as in :func:`select_backend`): what tests and benchmarks call to run
    one op on a named backend.

    Example::

        >>> y, xhat, rstd = op("bn_fwd", "cpu")(x, gamma, beta, 1e-5, True)
    """
    if name not in SPECS:
        raise ValueError(f"unknown op {name!r}; the ops are {sorted(SPECS)}")

    def run(*args):
        t = next(a for a in args if isinstance(a, torch.Tensor))
        return getattr(kernels(t.device, t.dtype, backend), name)(*args)

    run.__name__ = name
    return run
