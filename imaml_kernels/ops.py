"""``torch.library`` ops in the ``imaml::`` namespace, one per kernel and backend.

- C++/CUDA kernels: ``torch.library.custom_op`` (``imaml::cg_dots``, ``imaml::cg_update``);
  the device of the operands picks the CPU or CUDA kernel of the extension.
- Triton kernels: ``torch.library.triton_op`` + ``wrap_triton``
  (``imaml::cg_dots_triton``, ``imaml::cg_update_triton``).

Every op has a fake implementation (shape checks only), so ``torch.compile(fullgraph=True)``
traces through it, and declares what it mutates. Inputs are validated in both the real and
the fake implementation: a mismatch raises ``ValueError``/``TypeError`` naming the argument.
"""

import math

import torch
from torch.library import custom_op, triton_op, wrap_triton

from . import _ext
from .dispatch import SUPPORTED_DTYPES

# Block lengths of the per-block partial sums, per backend.
CPU_CG_CHUNK = 16384  # 64 KiB of float32 per (task, block) job: L2-resident, enough jobs for 2+ cores
CUDA_CG_CHUNK = 4096  # fixed by csrc/cg_cuda.cu (256 threads x 16 elements)
TRITON_CG_CHUNK = 4096  # = imaml_kernels.triton.cg.CG_BLOCK


def cg_chunk(backend, n):
    """Block length used by ``backend`` for vectors of length ``n``."""
    return {"cpu": CPU_CG_CHUNK, "cuda": CUDA_CG_CHUNK, "triton": TRITON_CG_CHUNK}.get(backend, max(n, 1))


def cg_partials(b, backend):
    """Allocate the ``[T, NB, 4]`` float64 workspace for ``b`` ``[T, P]`` and return ``(partials, chunk)``."""
    T, P = b.shape
    chunk = cg_chunk(backend, P)
    nb = max(1, math.ceil(P / chunk))
    return torch.empty(T, nb, 4, dtype=torch.float64, device=b.device), chunk


# --------------------------------------------------------------------------- validation


def _expect(cond, exc, msg):
    if not cond:
        raise exc(msg)


def _check_vec(name, t, ref):
    _expect(isinstance(t, torch.Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _expect(t.dim() == 2, ValueError, f"{name} must be [T, P], got shape {tuple(t.shape)}")
    _expect(t.dtype in SUPPORTED_DTYPES, TypeError, f"{name} must be float32 or float64, got {t.dtype}")
    if ref is not None:
        _expect(t.shape == ref.shape, ValueError, f"{name} must have shape {tuple(ref.shape)}, got {tuple(t.shape)}")
        _expect(t.dtype == ref.dtype, TypeError, f"{name} must have dtype {ref.dtype}, got {t.dtype}")
        _expect(t.device == ref.device, ValueError, f"{name} must be on {ref.device}, got {t.device}")
    _expect(t.is_contiguous(), ValueError, f"{name} must be contiguous")


def _check_task_vec(name, t, ref, dtype):
    T = ref.shape[0]
    _expect(isinstance(t, torch.Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _expect(tuple(t.shape) == (T,), ValueError, f"{name} must have shape ({T},), got {tuple(t.shape)}")
    _expect(t.dtype == dtype, TypeError, f"{name} must have dtype {dtype}, got {t.dtype}")
    _expect(t.device == ref.device, ValueError, f"{name} must be on {ref.device}, got {t.device}")
    _expect(t.is_contiguous(), ValueError, f"{name} must be contiguous")


def _check_partials(partials, ref, chunk):
    T, P = ref.shape
    _expect(chunk > 0, ValueError, f"chunk must be positive, got {chunk}")
    nb = max(1, math.ceil(P / chunk))
    _expect(isinstance(partials, torch.Tensor), TypeError, "partials must be a torch.Tensor")
    _expect(
        tuple(partials.shape) == (T, nb, 4),
        ValueError,
        f"partials must have shape ({T}, {nb}, 4) for P={P}, chunk={chunk}; got {tuple(partials.shape)}",
    )
    _expect(partials.dtype == torch.float64, TypeError, f"partials must be float64, got {partials.dtype}")
    _expect(partials.device == ref.device, ValueError, f"partials must be on {ref.device}, got {partials.device}")
    _expect(partials.is_contiguous(), ValueError, "partials must be contiguous")


def check_cg_dots(r, p, Ap, partials, chunk):
    _check_vec("r", r, None)
    _check_vec("p", p, r)
    _check_vec("Ap", Ap, r)
    _check_partials(partials, r, chunk)


def check_cg_update(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk):
    _check_vec("x", x, None)
    for name, t in (("r", r), ("p", p), ("Ap", Ap)):
        _check_vec(name, t, x)
    _check_partials(partials, x, chunk)
    _check_task_vec("status_in", status_in, x, torch.int32)
    _check_task_vec("status_out", status_out, x, torch.int32)
    _check_task_vec("iters", iters, x, torch.int32)
    _check_task_vec("thresh", thresh, x, torch.float64)


def _dtype_code(t):
    return 0 if t.dtype == torch.float32 else 1


def _require_ext(device):
    if not _ext.HAS_EXT:
        raise RuntimeError(f"imaml_kernels: the native extension is not built ({_ext.EXT_ERROR})")
    if device.type == "cuda" and not _ext.HAS_CUDA_EXT:
        raise RuntimeError("imaml_kernels: the native extension was built without CUDA kernels")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"imaml_kernels: no native kernel for device {device}")


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream


# --------------------------------------------------------------------------- C++ / CUDA ops


@custom_op("imaml::cg_dots", mutates_args=("partials",))
def cg_dots(r: torch.Tensor, p: torch.Tensor, Ap: torch.Tensor, partials: torch.Tensor, chunk: int) -> None:
    """Per-block dot products (r.r, p.Ap, r.Ap, Ap.Ap) of ``[T, P]`` vectors into
    ``partials`` ``[T, ceil(P/chunk), 4]`` float64 (C++ on CPU tensors, CUDA on CUDA tensors)."""
    check_cg_dots(r, p, Ap, partials, chunk)
    _require_ext(r.device)
    T, P = r.shape
    args = (_dtype_code(r), r.data_ptr(), p.data_ptr(), Ap.data_ptr(), partials.data_ptr(), T, P, chunk)
    if r.device.type == "cuda":
        _ext._C.cg_dots_cuda(*args, _stream(r))
    else:
        _ext._C.cg_dots_cpu(*args)


@cg_dots.register_fake
def _(r, p, Ap, partials, chunk):
    check_cg_dots(r, p, Ap, partials, chunk)


@custom_op("imaml::cg_update", mutates_args=("x", "r", "p", "status_out", "iters"))
def cg_update(
    x: torch.Tensor,
    r: torch.Tensor,
    p: torch.Tensor,
    Ap: torch.Tensor,
    partials: torch.Tensor,
    status_in: torch.Tensor,
    status_out: torch.Tensor,
    iters: torch.Tensor,
    thresh: torch.Tensor,
    chunk: int,
) -> None:
    """Fused CG update for every task: from the summed partials compute per-task alpha, beta
    and status, then ``x += a p; r -= a Ap; p = r + b p`` in one pass (tasks that converged
    or broke down are left untouched)."""
    check_cg_update(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk)
    _require_ext(x.device)
    T, P = x.shape
    args = (
        _dtype_code(x),
        x.data_ptr(),
        r.data_ptr(),
        p.data_ptr(),
        Ap.data_ptr(),
        partials.data_ptr(),
        status_in.data_ptr(),
        status_out.data_ptr(),
        iters.data_ptr(),
        thresh.data_ptr(),
        T,
        P,
        chunk,
    )
    if x.device.type == "cuda":
        _ext._C.cg_update_cuda(*args, _stream(x))
    else:
        _ext._C.cg_update_cpu(*args)


@cg_update.register_fake
def _(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk):
    check_cg_update(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk)


# --------------------------------------------------------------------------- Triton ops


@triton_op("imaml::cg_dots_triton", mutates_args={"partials"})
def cg_dots_triton(r: torch.Tensor, p: torch.Tensor, Ap: torch.Tensor, partials: torch.Tensor, chunk: int) -> None:
    """Triton twin of :func:`cg_dots` (``chunk`` must be ``TRITON_CG_CHUNK``)."""
    from .triton import cg as k

    check_cg_dots(r, p, Ap, partials, chunk)
    _expect(chunk == k.CG_BLOCK, ValueError, f"chunk must be {k.CG_BLOCK} for the Triton kernels, got {chunk}")
    T, P = r.shape
    nb = partials.shape[1]
    wrap_triton(k._cg_dots_kernel)[(T, nb)](r, p, Ap, partials, P, nb, BLOCK=k.CG_BLOCK, num_warps=k.CG_NUM_WARPS)


@cg_dots_triton.register_fake
def _(r, p, Ap, partials, chunk):
    check_cg_dots(r, p, Ap, partials, chunk)


@triton_op("imaml::cg_update_triton", mutates_args={"x", "r", "p", "status_out", "iters"})
def cg_update_triton(
    x: torch.Tensor,
    r: torch.Tensor,
    p: torch.Tensor,
    Ap: torch.Tensor,
    partials: torch.Tensor,
    status_in: torch.Tensor,
    status_out: torch.Tensor,
    iters: torch.Tensor,
    thresh: torch.Tensor,
    chunk: int,
) -> None:
    """Triton twin of :func:`cg_update`."""
    from .triton import cg as k

    check_cg_update(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk)
    _expect(chunk == k.CG_BLOCK, ValueError, f"chunk must be {k.CG_BLOCK} for the Triton kernels, got {chunk}")
    T, P = x.shape
    nb = partials.shape[1]
    wrap_triton(k._cg_update_kernel)[(T, nb)](
        x, r, p, Ap, partials, status_in, status_out, iters, thresh, P, nb,
        BLOCK=k.CG_BLOCK, NB_POW2=max(1, 1 << (nb - 1).bit_length()), num_warps=k.CG_NUM_WARPS,
    )


@cg_update_triton.register_fake
def _(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk):
    check_cg_update(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk)
