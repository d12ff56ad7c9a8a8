"""The fused CG iteration for T tasks: per-block dot products (r·r, p·Ap, r·Ap, Ap·Ap) into
float64 partials, then one update pass (per-task α, β and status from the summed partials;
``x += α p; r −= α Ap; p = r + β p``).

Shapes: ``[T, P]`` vectors, ``partials [T, ceil(P/chunk), 4]`` float64, per-task ``[T]``
status (int32), step counts (int32) and thresholds (float64). Kernels: ``csrc/cg_cpu.cpp``
(C++), ``csrc/cg_cuda.cu`` (CUDA), :mod:`imaml_kernels.triton.cg` (Triton); twin
:mod:`imaml_kernels.reference.cg`. The solver is :func:`imaml_kernels.cg_solve`.

Example::

    >>> k = dispatch.kernels(b.device, b.dtype)
    >>> partials, chunk = cg_partials(b, k.backend)
    >>> k.cg_dots(r, p, Ap, partials, chunk)
    >>> k.cg_update(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk)
"""

import math

import torch

from .. import reference as ref
from ._checks import check_disjoint, check_tensor, dtype_code, expect, native, native_cuda, stream
from ._registry import OpSpec, register, triton_launcher

# Block lengths of the per-block partial sums, per backend.
CPU_CG_CHUNK = 16384  # 64 KiB of float32 per (task, block) job: L2-resident, enough jobs for 2+ cores
CUDA_CG_CHUNK = 4096  # fixed by csrc/cg_cuda.cu (256 threads x 16 elements)
TRITON_CG_CHUNK = 4096  # = imaml_kernels.triton.cg.CG_BLOCK


def cg_chunk(backend, n):
    """Block length used by ``backend`` for vectors of length ``n``."""
    return {"cpu": CPU_CG_CHUNK, "cuda": CUDA_CG_CHUNK, "triton": TRITON_CG_CHUNK}.get(backend, max(n, 1))


def cg_partials(b, backend):
    """Allocate the ``[T, NB, 4]`` float64 workspace for ``b`` ``[T, P]``; -> ``(partials, chunk)``."""
    T, P = b.shape
    chunk = cg_chunk(backend, P)
    nb = max(1, math.ceil(P / chunk))
    return torch.empty(T, nb, 4, dtype=torch.float64, device=b.device), chunk


# --------------------------------------------------------------------------- validation


def _check_task_vec(name, t, ref_vec, dtype):
    T = ref_vec.shape[0]
    expect(isinstance(t, torch.Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    expect(tuple(t.shape) == (T,), ValueError, f"{name} must have shape ({T},), got {tuple(t.shape)}")
    expect(t.dtype == dtype, TypeError, f"{name} must have dtype {dtype}, got {t.dtype}")
    expect(t.device == ref_vec.device, ValueError, f"{name} must be on {ref_vec.device}, got {t.device}")
    expect(t.is_contiguous(), ValueError, f"{name} must be contiguous")


def _check_partials(partials, like, chunk):
    T, P = like.shape
    expect(chunk > 0, ValueError, f"chunk must be positive, got {chunk}")
    nb = max(1, math.ceil(P / chunk))
    expect(isinstance(partials, torch.Tensor), TypeError, "partials must be a torch.Tensor")
    expect(tuple(partials.shape) == (T, nb, 4), ValueError,
           f"partials must have shape ({T}, {nb}, 4) for P={P}, chunk={chunk}; got {tuple(partials.shape)}")
    expect(partials.dtype == torch.float64, TypeError, f"partials must be float64, got {partials.dtype}")
    expect(partials.device == like.device, ValueError, f"partials must be on {like.device}, got {partials.device}")
    expect(partials.is_contiguous(), ValueError, "partials must be contiguous")


def check_cg_dots(r, p, Ap, partials, chunk):
    check_tensor("r", r, dim=2)
    check_tensor("p", p, dim=2, like=r)
    check_tensor("Ap", Ap, dim=2, like=r)
    _check_partials(partials, r, chunk)
    check_disjoint({"partials": partials}, {"r": r, "p": p, "Ap": Ap})


def check_cg_update(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk):
    check_tensor("x", x, dim=2)
    for name, t in (("r", r), ("p", p), ("Ap", Ap)):
        check_tensor(name, t, dim=2, like=x)
    _check_partials(partials, x, chunk)
    _check_task_vec("status_in", status_in, x, torch.int32)
    _check_task_vec("status_out", status_out, x, torch.int32)
    _check_task_vec("iters", iters, x, torch.int32)
    _check_task_vec("thresh", thresh, x, torch.float64)
    # Every block reads status_in, Ap and partials while block 0 writes status_out and the
    # others write their share of x, r, p: none may share memory with what another writes.
    check_disjoint({"x": x, "r": r, "p": p, "status_out": status_out, "iters": iters},
                   {"Ap": Ap, "partials": partials, "status_in": status_in, "thresh": thresh})


# --------------------------------------------------------------------------- launchers


def _dots_args(r, p, Ap, partials, chunk):
    T, P = r.shape
    return (dtype_code(r), r.data_ptr(), p.data_ptr(), Ap.data_ptr(), partials.data_ptr(), T, P, chunk)


def _update_args(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk):
    T, P = x.shape
    return (dtype_code(x), x.data_ptr(), r.data_ptr(), p.data_ptr(), Ap.data_ptr(), partials.data_ptr(),
            status_in.data_ptr(), status_out.data_ptr(), iters.data_ptr(), thresh.data_ptr(), T, P, chunk)


def _cpu_dots(*args):
    native().cg_dots_cpu(*_dots_args(*args))


def _cpu_update(*args):
    native().cg_update_cpu(*_update_args(*args))


def _cuda_dots(r, *rest):
    # The kernel needs chunk = CUDA_CG_CHUNK (the fake checks the workspace against chunk).
    expect(rest[-1] == CUDA_CG_CHUNK, ValueError, f"chunk must be {CUDA_CG_CHUNK} for the CUDA kernels, got {rest[-1]}")
    if r.shape[0]:
        native_cuda().cg_dots_cuda(*_dots_args(r, *rest), stream(r))


def _cuda_update(x, *rest):
    expect(rest[-1] == CUDA_CG_CHUNK, ValueError, f"chunk must be {CUDA_CG_CHUNK} for the CUDA kernels, got {rest[-1]}")
    if x.shape[0]:
        native_cuda().cg_update_cuda(*_update_args(x, *rest), stream(x))


# --------------------------------------------------------------------------- registrations

register(OpSpec(
    "cg_dots", "(Tensor r, Tensor p, Tensor Ap, Tensor(a!) partials, int chunk) -> ()",
    check_cg_dots, ref.cg_dots, cpu=_cpu_dots, cuda=_cuda_dots, triton=triton_launcher("cg.cg_dots"), mutates=("partials",),
))
register(OpSpec(
    "cg_update",
    "(Tensor(a!) x, Tensor(b!) r, Tensor(c!) p, Tensor Ap, Tensor partials, Tensor status_in, Tensor(d!) status_out,"
    " Tensor(e!) iters, Tensor thresh, int chunk) -> ()",
    check_cg_update, ref.cg_update, cpu=_cpu_update, cuda=_cuda_update, triton=triton_launcher("cg.cg_update"),
    mutates=("x", "r", "p", "status_out", "iters"),
))
