"""The pieces every op-family test (``tests/ops/test_<family>.py``) shares.

Each family file checks every op of its family on every backend that runs here against the
op's float64 twin (:mod:`imaml_kernels.reference`), like fla's ``tests/ops``:

- :data:`BACKENDS` and :func:`grid`: the backends, as :mod:`imaml_kernels.dispatch` names
  them: ``cpu`` (the C++ kernel behind ``imaml::<name>``, CPU tensors), ``triton``
  (``imaml::<name>_triton``: CUDA tensors on a GPU, else CPU tensors through the
  interpreter), ``reference`` (the twin, through dispatch) and ``cuda`` (CUDA tensors: the
  CUDA C++ kernel where the op has one, else Triton, as dispatch does). A backend that cannot
  run here is skipped with dispatch's reasons. :func:`grid` makes the ``case x dtype x
  backend`` parameters with readable ids (``T3-R37-C5-relu-fp32-triton``);
- :func:`gen`, :func:`randn`, :func:`cast`: fresh random inputs, seeded by the case, drawn in
  float64 and rounded to the dtype under test (never zeros);
- :func:`check_op`: the backend's kernel launched into outputs poisoned first (NaN; 77 for
  uint8, -7 for int32) and compared with the twin; then the public op
  (``dispatch.op(name, backend)``) must give the launcher's bits;
- the tolerance rule (flash-attention's): float64 within :data:`TOL64` of the float64 twin
  (max-norm relative); float32 within :data:`RATIO32` x torch's own float32 error (the twin
  run in float32 on the same rounded inputs) or :data:`FLOOR32`, whichever is larger; integer
  outputs exactly; NaN (an unwritten element) never passes;
- :func:`opcheck`: ``torch.library.opcheck`` of ``imaml::<name>`` or ``imaml::<name>_triton``.
"""

import re
import zlib
from typing import NamedTuple

import pytest
import torch

from imaml_kernels import _ext, dispatch
from imaml_kernels.ops import SPECS

F32, F64 = torch.float32, torch.float64
DTYPES = (F64, F32)
DTYPE_IDS = {F64: "fp64", F32: "fp32"}
EPS = 1e-5  # BatchNorm's epsilon: not fp32-exact (a Triton kernel gets it as an fp32 hi + lo pair)
TOL64 = 1e-12  # float64 vs the float64 twin, max-norm relative
RATIO32 = 2.0  # float32: at most this many times torch's own float32 error ...
FLOOR32 = 1e-6  # ... or this, where torch's float32 error is smaller still (exact data movement)

# The op families, one test file each (tests/ops/test_registry.py checks they cover SPECS).
FAMILIES = {
    "cg": ("cg_dots", "cg_update"),
    "conv": ("im2col", "col2im"),
    "batchnorm": ("bn_fwd", "bn_bwd", "bn_tfwd", "bn_tbwd", "col2im_bn_bwd", "col2im_bn_tbwd"),
    "maxpool": ("maxpool_fwd", "maxpool_gather", "maxpool_scatter"),
    "softmax_ce": ("softmax_ce", "softmax_ce_bias", "softmax_ce_tangent"),
    "prox": ("prox_step",),
}

# --------------------------------------------------------------------------- backends

GPU = torch.cuda.is_available()
# CUDA parameters exist where a GPU does (tests/test_gpu.py is the GPU suite on CPU-only CI).
BACKEND_NAMES = ("cpu", "triton", "reference") + (("cuda",) if GPU else ())
KERNELS = ("cpu", "triton") + (("cuda",) if GPU else ())  # the backends with kernels of their own (opcheck, validation)
NATIVE = ("cpu",) + (("cuda",) if GPU else ())  # compiled kernels only: sizes the interpreter would take minutes over


def device(backend):
    """The device of the tensors ``backend`` runs on here."""
    return "cuda" if backend == "cuda" or (backend == "triton" and GPU) else "cpu"


def _why_not(backend):
    if backend == "cuda" and not GPU:
        return "no CUDA device"
    problems = dispatch.backend_problems(backend, device(backend), F32)
    if backend == "cpu" and not problems and not hasattr(_ext._C, "maxpool_fwd_cpu"):
        problems.append("the native extension lacks the engine kernels")
    return "; ".join(problems)


SKIPS = {b: _why_not(b) for b in BACKEND_NAMES}


def runs(backend):
    """A mark that skips a test of ``backend`` where it cannot run, with the reasons."""
    return pytest.mark.skipif(bool(SKIPS[backend]), reason=f"backend {backend!r}: {SKIPS[backend]}")


def backends(names=BACKEND_NAMES):
    """``names`` as pytest parameters (id: the name; skipped where the backend cannot run)."""
    return [pytest.param(b, id=b, marks=runs(b)) for b in names]


BACKENDS = backends()


class Case(NamedTuple):
    """One input configuration: ``id`` (``T3-R37-C5-relu``), the test's ``values`` and the
    backends it runs on."""

    id: str
    values: tuple
    on: tuple = BACKEND_NAMES


def case(cid, *values, on=BACKEND_NAMES):
    return Case(cid, values, on)


def grid(cases, dtypes=DTYPES, names=BACKEND_NAMES):
    """The parameters ``(*case.values, dtype, backend)`` of every case x dtype x backend (of
    ``names`` and of the case's own), with ids ``<case>-<dtype>-<backend>``."""
    return [
        pytest.param(*c.values, dt, b, id=f"{c.id}-{DTYPE_IDS[dt]}-{b}", marks=runs(b))
        for c in cases for dt in dtypes for b in names if b in c.on
    ]


# --------------------------------------------------------------------------- random inputs


def gen(key):
    """A generator seeded by ``key`` (a case id): every case draws its own inputs."""
    return torch.Generator().manual_seed(zlib.crc32(str(key).encode()))


def randn(g, *shape, scale=1.0, shift=0.0):
    """``shift + scale * N(0, 1)``, float64 on the CPU."""
    return torch.randn(*shape, generator=g, dtype=F64) * scale + shift


def cast(dtype, dev, *tensors):
    """The tensors on ``dev``, floating ones rounded to ``dtype`` (``None`` passes)."""
    return [t if t is None else t.to(dev, dtype) if t.is_floating_point() else t.to(dev) for t in tensors]


def poison(t):
    """Fill ``t`` with a value no kernel writes: NaN, 77 in uint8 (arg-max codes are 0..3), -7 in ints."""
    return t.fill_({torch.uint8: 77, torch.int32: -7, torch.int64: -7}.get(t.dtype, float("nan")))


def poisoned(*shape, dtype=F64, dev="cpu"):
    return poison(torch.empty(*shape, dtype=dtype, device=dev))


# --------------------------------------------------------------------------- running an op


def _written(spec):
    """Positions, among the op's arguments, of those it writes."""
    names = re.findall(r"(\w+)\s*[,)]", spec.schema.split("->")[0])
    return [i for i, n in enumerate(names) if n in spec.mutates]


def _as_tuple(res):
    return () if res is None else res if isinstance(res, tuple) else (res,)


def _results(spec, res, args):
    """An op's outputs: the tensors it returns, then the arguments it wrote."""
    return [*_as_tuple(res), *(args[i] for i in _written(spec))]


def _copies(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def launch(name, backend, args):
    """Op ``name``'s kernel on ``backend`` (its :class:`~imaml_kernels.ops.OpSpec` launcher), on
    copies of ``args``, into outputs allocated by the op's fake and poisoned first. Returns its
    outputs (:func:`_results`)."""
    spec, args = SPECS[name], _copies(args)
    if backend == "reference":
        return _results(spec, spec.reference(*args), args)
    res = spec.fake(*args)
    outs = [poison(o) for o in _as_tuple(res)]
    if backend == "triton" or (backend == "cuda" and spec.cuda is None):
        spec.triton(*args, *outs, wrap=lambda kernel: kernel)
    else:
        (spec.cuda if backend == "cuda" else spec.cpu)(*args, *outs)
    if outs and outs[0].is_cuda:
        torch.cuda.synchronize()
    return _results(spec, res, args)


def run_op(name, backend, args):
    """The public op, ``dispatch.op(name, backend)``, on copies of ``args`` -> its outputs."""
    args = _copies(args)
    return _results(SPECS[name], dispatch.op(name, backend)(*args), args)


def max_rel_err(out, want):
    """Max-norm error of ``out`` relative to ``want``'s max-norm (absolute where ``want`` is 0)."""
    out, want = out.double(), want.double().to(out.device)
    if want.numel() == 0:
        return 0.0
    err, scale = (out - want).abs().max().item(), want.abs().max().item()
    return err / scale if scale > 0 else err


def assert_rel(out, want, tol, what=""):
    """``out`` has ``want``'s shape, is finite (no poison left) and within ``tol`` of it (max-norm relative)."""
    assert tuple(out.shape) == tuple(want.shape), f"{what}: shape {tuple(out.shape)}, expected {tuple(want.shape)}"
    assert torch.isfinite(out).all(), f"{what}: unwritten (poison left) or non-finite elements"
    err = max_rel_err(out, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def _in64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def check_op(name, backend, args, dtype, tol64=TOL64, floor32=FLOOR32):
    """Op ``name`` on ``backend`` against its float64 twin on the same (rounded) ``args``
    (the tolerance rule of the module docstring), then the public op against the launcher
    (bit for bit). Returns the launcher's outputs."""
    want = launch(name, "reference", _in64(args))
    same_dtype = launch(name, "reference", args) if dtype == F32 else None
    got = launch(name, backend, args)
    assert len(got) == len(want), f"{name}[{backend}]: {len(got)} outputs, the twin has {len(want)}"
    for i, (o, w) in enumerate(zip(got, want)):
        what = f"{name}[{backend}] output {i} ({DTYPE_IDS[dtype]})"
        assert o.device.type == device(backend), f"{what}: on {o.device}"
        if not w.is_floating_point():
            assert torch.equal(o.cpu(), w.cpu().to(o.dtype)), f"{what}: integer output differs from the twin"
            continue
        expected = w.dtype if dtype == F64 else same_dtype[i].dtype
        assert o.dtype == expected, f"{what}: dtype {o.dtype}, expected {expected}"
        tol = tol64 if dtype == F64 else max(RATIO32 * max_rel_err(same_dtype[i], w), floor32)
        assert_rel(o, w, tol, what)
    for i, (o, p) in enumerate(zip(got, run_op(name, backend, args))):
        assert torch.equal(o, p), f"dispatch.op({name!r}, {backend!r}) output {i} differs from the launcher's"
    return got


# --------------------------------------------------------------------------- opcheck

# Under TRITON_INTERPRET the kernel body runs on real pointers, which the AOT-dispatch checks
# (FakeTensor/functional tracing through the triton_op body) cannot provide: the interpreter
# gets these; on a GPU (bench/gpu_check.sh) the full opcheck runs.
INTERPRETED_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def op_of(name, backend):
    """The ``torch.ops.imaml`` op that ``backend`` runs for ``name`` (C++/CUDA C++:
    ``imaml::<name>``; Triton, and CUDA for an op without CUDA C++: ``imaml::<name>_triton``)."""
    triton = backend == "triton" or (backend == "cuda" and SPECS[name].cuda is None)
    return getattr(torch.ops.imaml, f"{name}_triton" if triton else name)


def opcheck(name, backend, args):
    """``torch.library.opcheck`` of :func:`op_of` on ``args``."""
    interpreted = backend == "triton" and _ext.triton_interpreted()
    torch.library.opcheck(op_of(name, backend), tuple(args), **({"test_utils": INTERPRETED_UTILS} if interpreted else {}))


# --------------------------------------------------------------------------- launches without a GPU

GRID_MAX = (2**31 - 1, 65535, 65535)  # CUDA's grid limits, axes 0, 1, 2


class Recorder:
    """A launcher's ``wrap`` that records each launch's grid and launches nothing: the launchers'
    grid and index guards checked at their limits on ``meta`` tensors (no memory)."""

    def __init__(self):
        self.grids = []

    def __call__(self, kernel):
        return self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append(tuple(grid))


def assert_grids_fit(grids):
    assert grids, "nothing launched"
    for g in grids:
        assert len(g) <= 3 and all(0 < n <= m for n, m in zip(g, GRID_MAX)), f"grid {g} exceeds CUDA's {GRID_MAX}"
