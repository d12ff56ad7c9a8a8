"""The convolution's data movement on channels-last activations: ``im2col`` with the zero
padding fused, and its adjoint ``col2im`` (a gather, no atomics). The convolution itself is
a batched GEMM over tasks (:mod:`imaml_kernels.engine.layers`).

Shapes: ``x [T, N, H, W, C]`` <-> patches ``[T, N, Ho, Wo, k, k, C]``. Kernels:
``csrc/conv_cpu.cpp`` (C++), :mod:`imaml_kernels.triton.conv` (Triton); twin
:mod:`imaml_kernels.reference.conv`.

Example::

    >>> k = dispatch.kernels(x.device, x.dtype)
    >>> cols = k.im2col(x, Ho, Wo, 3, 2, 1, 1)          # k=3, stride 2, padding 1
    >>> gx = k.col2im(gcols, H, W, 2, 1, 1)
"""

from .. import reference as ref
from ._checks import check_tensor, dtype_code, expect, native
from ._registry import OpSpec, register, triton_launcher

# --------------------------------------------------------------------------- validation


def _im2col_fake(x, Ho, Wo, k, s, ph, pw):
    check_tensor("x", x, dim=5)
    expect(k >= 1 and s >= 1 and ph >= 0 and pw >= 0 and Ho >= 1 and Wo >= 1, ValueError,
           f"bad geometry Ho={Ho} Wo={Wo} k={k} s={s} ph={ph} pw={pw}")
    T, N, _, _, C = x.shape
    return x.new_empty(T, N, Ho, Wo, k, k, C)


def _col2im_fake(gcols, H, W, s, ph, pw):
    check_tensor("gcols", gcols, dim=7)
    expect(gcols.shape[4] == gcols.shape[5], ValueError, f"gcols must be [T, N, Ho, Wo, k, k, C], got {tuple(gcols.shape)}")
    expect(s >= 1 and ph >= 0 and pw >= 0 and H >= 1 and W >= 1, ValueError, f"bad geometry H={H} W={W} s={s} ph={ph} pw={pw}")
    T, N, _, _, _, _, C = gcols.shape
    return gcols.new_empty(T, N, H, W, C)


# --------------------------------------------------------------------------- launchers


def _cpu_im2col(x, Ho, Wo, k, s, ph, pw, cols):
    native().im2col_cpu(dtype_code(x), x.data_ptr(), cols.data_ptr(), *x.shape, Ho, Wo, k, s, ph, pw)


def _cpu_col2im(gcols, H, W, s, ph, pw, gx):
    T, N, Ho, Wo, k, _, C = gcols.shape
    native().col2im_cpu(dtype_code(gcols), gcols.data_ptr(), gx.data_ptr(), T, N, H, W, C, Ho, Wo, k, s, ph, pw)


# --------------------------------------------------------------------------- registrations

register(OpSpec("im2col", "(Tensor x, int Ho, int Wo, int k, int s, int ph, int pw) -> Tensor", _im2col_fake, ref.im2col,
                cpu=_cpu_im2col, triton=triton_launcher("conv.im2col")))
register(OpSpec("col2im", "(Tensor gcols, int H, int W, int s, int ph, int pw) -> Tensor", _col2im_fake, ref.col2im,
                cpu=_cpu_col2im, triton=triton_launcher("conv.col2im")))
