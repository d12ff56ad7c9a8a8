"""BatchNorm with batch statistics, optionally followed by ReLU: forward, backward, tangent
forward and tangent backward, each one fused pass per direction.

Shapes: ``x [T, R, C]`` (``R = N·H·W`` channels-last rows of one task); the statistics
``rstd``, ``a`` are contiguous ``[T, C]``; ``relu_y`` is the stage's output when a ReLU follows
(its mask gates the cotangents), else ``None``. The parameter-like ``[T, C]`` arrays (``gamma``,
``beta``, their tangents ``rgamma``, ``rbeta`` and gradients ``ggamma``, ``gbeta``, ``rggamma``,
``rgbeta``) are rows of one shared row stride: views into a flat ``[T, P]`` parameter buffer
are read in place, and the backward ops write their parameter gradients into such views (no
copies). Formulas: :mod:`imaml_kernels.reference.batchnorm`. Kernels:
``csrc/batchnorm_cpu.cpp`` (C++), :mod:`imaml_kernels.triton.batchnorm` (Triton).

``col2im_bn_bwd`` is the backward whose cotangent is the input cotangent of the convolution
the BatchNorm feeds, given as that convolution's patch cotangent: on the GPU the col2im is
fused into the backward's loads (one launch fewer per layer and step).

Example::

    >>> k = dispatch.kernels(x.device, x.dtype)                   # or dispatch.op("bn_fwd", "cpu")
    >>> y, xhat, rstd = k.bn_fwd(x, gamma, beta, 1e-5, True)      # x [T,R,C], gamma [T,C]
    >>> gx = k.bn_bwd(gy, xhat, rstd, gamma, y, ggamma, gbeta)    # ggamma, gbeta [T,C]: written
"""

from torch import Tensor

from .. import reference as ref
from ._checks import addr, check_shape, check_tensor, dtype_code, expect, native
from ._registry import OpSpec, register, triton_launcher

# --------------------------------------------------------------------------- validation


def _param_stride(params, like):
    """The one row stride of the parameter-like ``[T, C]`` arguments (``C`` when contiguous)."""
    T, _, C = like.shape
    strides = []  # a list: under dynamic shapes strides are SymInts (unhashable)
    for name, t in params:
        expect(isinstance(t, Tensor), TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
        expect(tuple(t.shape) == (T, C), ValueError, f"{name} must have shape {(T, C)}, got {tuple(t.shape)}")
        expect(t.dtype == like.dtype, TypeError, f"{name} must have dtype {like.dtype}, got {t.dtype}")
        expect(t.device == like.device, ValueError, f"{name} must be on {like.device}, got {t.device}")
        expect(C <= 1 or t.stride(1) == 1, ValueError, f"{name} must have unit stride along the channels")
        if T > 1:
            strides.append(t.stride(0))
    expect(all(s == strides[0] for s in strides), ValueError,
           f"the [T, C] parameter arrays must share one row stride, got {strides}")
    ps = strides[0] if strides else C
    expect(ps >= C, ValueError, f"parameter row stride {ps} is below C = {C}")
    return ps


def _check(full, stats, params, relu_y, like):
    T, _, C = like.shape
    for name, t in full:
        check_tensor(name, t, dim=3, like=like)
    for name, t in stats:
        check_shape(name, t, (T, C), like)
    if relu_y is not None:
        check_tensor("relu_y", relu_y, dim=3, like=like)
    return _param_stride(params, like)


def _stats(x):
    return x.new_empty(x.shape[0], x.shape[2])


def _fwd_fake(x, gamma, beta, eps, relu):
    check_tensor("x", x, dim=3)
    _check([], [], [("gamma", gamma), ("beta", beta)], None, x)
    return x.new_empty(x.shape), x.new_empty(x.shape), _stats(x)


def _bwd_fake(gy, xhat, rstd, gamma, relu_y, ggamma, gbeta):
    check_tensor("gy", gy, dim=3)
    _check([("xhat", xhat)], [("rstd", rstd)], [("gamma", gamma), ("ggamma", ggamma), ("gbeta", gbeta)], relu_y, gy)
    return gy.new_empty(gy.shape)


def _tfwd_fake(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y):
    check_tensor("rx", rx, dim=3)
    _check([("xhat", xhat)], [("rstd", rstd)], [("gamma", gamma), ("rgamma", rgamma), ("rbeta", rbeta)], relu_y, rx)
    return rx.new_empty(rx.shape), rx.new_empty(rx.shape), _stats(rx)


def _tbwd_fake(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rggamma, rgbeta):
    check_tensor("gy", gy, dim=3)
    _check([("rgy", rgy), ("xhat", xhat), ("rxhat", rxhat)], [("rstd", rstd), ("a", a)],
           [("gamma", gamma), ("rgamma", rgamma), ("rggamma", rggamma), ("rgbeta", rgbeta)], relu_y, gy)
    return gy.new_empty(gy.shape)


def _check_patches(name, gcols, like, H, W, s, ph, pw):
    """``gcols`` is the patch cotangent ``[T, N, Ho, Wo, k, k, C]`` of ``like [T, R, C]``'s rows
    with ``R = N H W``."""
    check_tensor(name, gcols, dim=7)
    T, R, C = like.shape
    expect(gcols.shape[0] == T and gcols.shape[4] == gcols.shape[5] and gcols.shape[6] == C, ValueError,
           f"{name} must be [T={T}, N, Ho, Wo, k, k, C={C}], got {tuple(gcols.shape)}")
    expect(gcols.shape[1] * H * W == R, ValueError, f"{name}'s N={gcols.shape[1]} times H*W={H * W} must equal R={R}")
    expect(s >= 1 and ph >= 0 and pw >= 0, ValueError, f"bad geometry s={s} ph={ph} pw={pw}")
    expect(gcols.dtype == like.dtype and gcols.device == like.device, TypeError, f"{name} must match the rows' dtype and device")


def _cols_fake(gcols, H, W, s, ph, pw, xhat, rstd, gamma, relu_y, ggamma, gbeta):
    check_tensor("xhat", xhat, dim=3)
    _check_patches("gcols", gcols, xhat, H, W, s, ph, pw)
    _check([], [("rstd", rstd)], [("gamma", gamma), ("ggamma", ggamma), ("gbeta", gbeta)], relu_y, xhat)
    return xhat.new_empty(xhat.shape)


def _tcols_fake(gy, rgcols, H, W, s, ph, pw, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rggamma, rgbeta):
    check_tensor("gy", gy, dim=3)
    _check_patches("rgcols", rgcols, gy, H, W, s, ph, pw)
    _check([("xhat", xhat), ("rxhat", rxhat)], [("rstd", rstd), ("a", a)],
           [("gamma", gamma), ("rgamma", rgamma), ("rggamma", rggamma), ("rgbeta", rgbeta)], relu_y, gy)
    return gy.new_empty(gy.shape)


# --------------------------------------------------------------------------- launchers


def _ps(x, gamma):
    """The parameter row stride; the fake, run first, checked that every array shares it."""
    return gamma.stride(0) if x.shape[0] > 1 else x.shape[2]


def _cpu_fwd(x, gamma, beta, eps, relu, y, xhat, rstd):
    native().bn_fwd_cpu(dtype_code(x), x.data_ptr(), gamma.data_ptr(), beta.data_ptr(), y.data_ptr(), xhat.data_ptr(),
                        rstd.data_ptr(), *x.shape, eps, relu, _ps(x, gamma))


def _cpu_bwd(gy, xhat, rstd, gamma, relu_y, ggamma, gbeta, gx):
    native().bn_bwd_cpu(dtype_code(gy), gy.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), gamma.data_ptr(), addr(relu_y),
                        gx.data_ptr(), ggamma.data_ptr(), gbeta.data_ptr(), *gy.shape, _ps(gy, gamma))


def _cpu_tfwd(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y, ry, rxhat, a):
    native().bn_tfwd_cpu(dtype_code(rx), rx.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), gamma.data_ptr(), rgamma.data_ptr(),
                         rbeta.data_ptr(), addr(relu_y), ry.data_ptr(), rxhat.data_ptr(), a.data_ptr(), *rx.shape, _ps(rx, gamma))


def _cpu_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rggamma, rgbeta, rgx):
    native().bn_tbwd_cpu(dtype_code(gy), gy.data_ptr(), rgy.data_ptr(), xhat.data_ptr(), rxhat.data_ptr(), rstd.data_ptr(),
                         a.data_ptr(), gamma.data_ptr(), rgamma.data_ptr(), addr(relu_y), rgx.data_ptr(), rggamma.data_ptr(),
                         rgbeta.data_ptr(), *gy.shape, _ps(gy, gamma))


def _cpu_col2im_rows(gcols, H, W, s, ph, pw, like):
    """The C++ col2im of the patch cotangent ``gcols`` into new ``[T, R, C]`` rows like ``like``.
    On the CPU launches cost nothing: the gathering ops are col2im, then the backward (the
    Triton kernels fuse them)."""
    T, N, Ho, Wo, k, _, C = gcols.shape
    rows = like.new_empty(like.shape)
    native().col2im_cpu(dtype_code(gcols), gcols.data_ptr(), rows.data_ptr(), T, N, H, W, C, Ho, Wo, k, s, ph, pw)
    return rows


def _cpu_cols(gcols, H, W, s, ph, pw, xhat, rstd, gamma, relu_y, ggamma, gbeta, gx):
    _cpu_bwd(_cpu_col2im_rows(gcols, H, W, s, ph, pw, xhat), xhat, rstd, gamma, relu_y, ggamma, gbeta, gx)


def _ref_cols(gcols, H, W, s, ph, pw, xhat, rstd, gamma, relu_y, ggamma, gbeta):
    gy = ref.col2im(gcols, H, W, s, ph, pw).reshape(xhat.shape)
    return _ref_bwd(gy, xhat, rstd, gamma, relu_y, ggamma, gbeta)


def _cpu_tcols(gy, rgcols, H, W, s, ph, pw, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rggamma, rgbeta, rgx):
    rgy = _cpu_col2im_rows(rgcols, H, W, s, ph, pw, gy)
    _cpu_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rggamma, rgbeta, rgx)


def _ref_tcols(gy, rgcols, H, W, s, ph, pw, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rggamma, rgbeta):
    rgy = ref.col2im(rgcols, H, W, s, ph, pw).reshape(gy.shape)
    return _ref_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rggamma, rgbeta)


def _ref_bwd(gy, xhat, rstd, gamma, relu_y, ggamma, gbeta):
    gx, gg, gb = ref.bn_bwd(gy, xhat, rstd, gamma, relu_y)
    ggamma.copy_(gg)
    gbeta.copy_(gb)
    return gx


def _ref_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rggamma, rgbeta):
    rgx, rgg, rgb = ref.bn_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y)
    rggamma.copy_(rgg)
    rgbeta.copy_(rgb)
    return rgx


# --------------------------------------------------------------------------- registrations

# The parameter-like [T, C] arrays the ops read: passed as given (views into [T, P] buffers
# are read in place with their row stride); the written ones are never copied anyway.
_PARAMS = ("gamma", "beta", "rgamma", "rbeta")

register(OpSpec(
    "bn_fwd", "(Tensor x, Tensor gamma, Tensor beta, float eps, bool relu) -> (Tensor, Tensor, Tensor)",
    _fwd_fake, ref.bn_fwd, cpu=_cpu_fwd, triton=triton_launcher("batchnorm.bn_fwd"), views=_PARAMS,
))
register(OpSpec(
    "bn_bwd", "(Tensor gy, Tensor xhat, Tensor rstd, Tensor gamma, Tensor? relu_y, Tensor(a!) ggamma, Tensor(b!) gbeta) -> Tensor",
    _bwd_fake, _ref_bwd, cpu=_cpu_bwd, triton=triton_launcher("batchnorm.bn_bwd"), mutates=("ggamma", "gbeta"),
    views=_PARAMS,
))
register(OpSpec(
    "col2im_bn_bwd",
    "(Tensor gcols, int H, int W, int s, int ph, int pw, Tensor xhat, Tensor rstd, Tensor gamma, Tensor? relu_y,"
    " Tensor(a!) ggamma, Tensor(b!) gbeta) -> Tensor",
    _cols_fake, _ref_cols, cpu=_cpu_cols, triton=triton_launcher("batchnorm.col2im_bn_bwd"), mutates=("ggamma", "gbeta"),
    views=_PARAMS,
))
register(OpSpec(
    "bn_tfwd",
    "(Tensor rx, Tensor xhat, Tensor rstd, Tensor gamma, Tensor rgamma, Tensor rbeta, Tensor? relu_y) -> (Tensor, Tensor, Tensor)",
    _tfwd_fake, ref.bn_tfwd, cpu=_cpu_tfwd, triton=triton_launcher("batchnorm.bn_tfwd"), views=_PARAMS,
))
register(OpSpec(
    "bn_tbwd",
    "(Tensor gy, Tensor rgy, Tensor xhat, Tensor rxhat, Tensor rstd, Tensor a, Tensor gamma, Tensor rgamma, Tensor? relu_y,"
    " Tensor(a!) rggamma, Tensor(b!) rgbeta) -> Tensor",
    _tbwd_fake, _ref_tbwd, cpu=_cpu_tbwd, triton=triton_launcher("batchnorm.bn_tbwd"), mutates=("rggamma", "rgbeta"),
    views=_PARAMS,
))
register(OpSpec(
    "col2im_bn_tbwd",
    "(Tensor gy, Tensor rgcols, int H, int W, int s, int ph, int pw, Tensor xhat, Tensor rxhat, Tensor rstd, Tensor a,"
    " Tensor gamma, Tensor rgamma, Tensor? relu_y, Tensor(a!) rggamma, Tensor(b!) rgbeta) -> Tensor",
    _tcols_fake, _ref_tcols, cpu=_cpu_tcols, triton=triton_launcher("batchnorm.col2im_bn_tbwd"),
    mutates=("rggamma", "rgbeta"), views=_PARAMS,
))
