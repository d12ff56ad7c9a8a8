"""2×2 max-pool, stride 2, floor mode, channels-last: the forward with its argmax (uint8
``2·di + dj`` of the first maximum), the tangent (a gather at the argmax) and the adjoint (a
scatter to it).

Shapes: ``x [T, N, H, W, C]`` -> ``[T, N, H//2, W//2, C]``. Kernels: ``csrc/maxpool_cpu.cpp``
(C++), :mod:`imaml_kernels.triton.maxpool` (Triton); twin :mod:`imaml_kernels.reference.maxpool`.

Example::

    >>> k = dispatch.kernels(x.device, x.dtype)
    >>> y, idx = k.maxpool_fwd(x)
    >>> gx = k.maxpool_scatter(gy, idx, x.shape[2], x.shape[3])
"""

import torch
from torch import Tensor

from .. import reference as ref
from ._checks import check_tensor, dtype_code, expect, native
from ._registry import OpSpec, register, triton_launcher

# --------------------------------------------------------------------------- validation


def _check_idx(idx, shape, like):
    expect(isinstance(idx, Tensor) and idx.dtype == torch.uint8 and tuple(idx.shape) == tuple(shape) and idx.is_contiguous(),
           ValueError, f"idx must be a contiguous uint8 tensor of shape {tuple(shape)}")
    expect(idx.device == like.device, ValueError, f"idx must be on {like.device}, got {idx.device}")


def _pooled(x):
    T, N, H, W, C = x.shape
    return (T, N, H // 2, W // 2, C)


def _fwd_fake(x):
    check_tensor("x", x, dim=5)
    shape = _pooled(x)
    return x.new_empty(shape), torch.empty(shape, dtype=torch.uint8, device=x.device)


def _gather_fake(x, idx):
    check_tensor("x", x, dim=5)
    _check_idx(idx, _pooled(x), x)
    return x.new_empty(_pooled(x))


def _scatter_fake(gy, idx, H, W):
    check_tensor("gy", gy, dim=5)
    T, N, Ho, Wo, C = gy.shape
    expect(H // 2 == Ho and W // 2 == Wo, ValueError, f"H={H}, W={W} do not pool to {Ho}x{Wo}")
    _check_idx(idx, gy.shape, gy)
    return gy.new_empty(T, N, H, W, C)


# --------------------------------------------------------------------------- launchers


def _cpu_fwd(x, y, idx):
    native().maxpool_fwd_cpu(dtype_code(x), x.data_ptr(), y.data_ptr(), idx.data_ptr(), *x.shape)


def _cpu_gather(x, idx, y):
    native().maxpool_gather_cpu(dtype_code(x), x.data_ptr(), idx.data_ptr(), y.data_ptr(), *x.shape)


def _cpu_scatter(gy, idx, H, W, gx):
    T, N, _, _, C = gy.shape
    native().maxpool_scatter_cpu(dtype_code(gy), gy.data_ptr(), idx.data_ptr(), gx.data_ptr(), T, N, H, W, C)


# --------------------------------------------------------------------------- registrations

register(OpSpec("maxpool_fwd", "(Tensor x) -> (Tensor, Tensor)", _fwd_fake, ref.maxpool_fwd,
                cpu=_cpu_fwd, triton=triton_launcher("maxpool.maxpool_fwd")))
register(OpSpec("maxpool_gather", "(Tensor x, Tensor idx) -> Tensor", _gather_fake, ref.maxpool_gather,
                cpu=_cpu_gather, triton=triton_launcher("maxpool.maxpool_gather")))
register(OpSpec("maxpool_scatter", "(Tensor gy, Tensor idx, int H, int W) -> Tensor", _scatter_fake, ref.maxpool_scatter,
                cpu=_cpu_scatter, triton=triton_launcher("maxpool.maxpool_scatter")))
