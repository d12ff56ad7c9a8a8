"""BatchNorm with batch statistics, optionally followed by ReLU: forward, backward, tangent
forward and tangent backward, each one fused pass per direction.

Shapes: ``x [T, R, C]`` (``R = N·H·W`` channels-last rows of one task), statistics per
``(task, channel)`` ``[T, C]``; ``relu_y`` is the stage's output when a ReLU follows (its mask
gates the cotangents), else ``None``. Formulas: :mod:`imaml_kernels.reference.batchnorm`.
Kernels: ``csrc/batchnorm_cpu.cpp`` (C++), :mod:`imaml_kernels.triton.batchnorm` (Triton).

Example::

    >>> y, xhat, rstd = bn_fwd(x, gamma, beta, 1e-5, True)        # x [T,R,C], gamma [T,C]
    >>> gx, ggamma, gbeta = bn_bwd(gy, xhat, rstd, gamma, y)
"""

from torch import Tensor

from .. import reference as ref
from ..dispatch import kernels
from ._checks import addr, check_shape, check_tensor, dtype_code, native
from ._registry import OpSpec, register

# --------------------------------------------------------------------------- validation


def _check(full, stat, relu_y, like):
    T, _, C = like.shape
    for name, t in full:
        check_tensor(name, t, dim=3, like=like)
    for name, t in stat:
        check_shape(name, t, (T, C), like)
    if relu_y is not None:
        check_tensor("relu_y", relu_y, dim=3, like=like)


def _stats(x):
    return x.new_empty(x.shape[0], x.shape[2])


def _fwd_fake(x, gamma, beta, eps, relu):
    check_tensor("x", x, dim=3)
    _check([], [("gamma", gamma), ("beta", beta)], None, x)
    return x.new_empty(x.shape), x.new_empty(x.shape), _stats(x)


def _bwd_fake(gy, xhat, rstd, gamma, relu_y):
    check_tensor("gy", gy, dim=3)
    _check([("xhat", xhat)], [("rstd", rstd), ("gamma", gamma)], relu_y, gy)
    return gy.new_empty(gy.shape), _stats(gy), _stats(gy)


def _tfwd_fake(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y):
    check_tensor("rx", rx, dim=3)
    _check([("xhat", xhat)], [("rstd", rstd), ("gamma", gamma), ("rgamma", rgamma), ("rbeta", rbeta)], relu_y, rx)
    return rx.new_empty(rx.shape), rx.new_empty(rx.shape), _stats(rx)


def _tbwd_fake(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y):
    check_tensor("gy", gy, dim=3)
    _check([("rgy", rgy), ("xhat", xhat), ("rxhat", rxhat)], [("rstd", rstd), ("a", a), ("gamma", gamma), ("rgamma", rgamma)], relu_y, gy)
    return gy.new_empty(gy.shape), _stats(gy), _stats(gy)


# --------------------------------------------------------------------------- launchers


def _cpu_fwd(x, gamma, beta, eps, relu, y, xhat, rstd):
    native().bn_fwd_cpu(dtype_code(x), x.data_ptr(), gamma.data_ptr(), beta.data_ptr(), y.data_ptr(), xhat.data_ptr(),
                        rstd.data_ptr(), *x.shape, eps, relu)


def _cpu_bwd(gy, xhat, rstd, gamma, relu_y, gx, ggamma, gbeta):
    native().bn_bwd_cpu(dtype_code(gy), gy.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), gamma.data_ptr(), addr(relu_y),
                        gx.data_ptr(), ggamma.data_ptr(), gbeta.data_ptr(), *gy.shape)


def _cpu_tfwd(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y, ry, rxhat, a):
    native().bn_tfwd_cpu(dtype_code(rx), rx.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), gamma.data_ptr(), rgamma.data_ptr(),
                         rbeta.data_ptr(), addr(relu_y), ry.data_ptr(), rxhat.data_ptr(), a.data_ptr(), *rx.shape)


def _cpu_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rgx, rggamma, rgbeta):
    native().bn_tbwd_cpu(dtype_code(gy), gy.data_ptr(), rgy.data_ptr(), xhat.data_ptr(), rxhat.data_ptr(), rstd.data_ptr(),
                         a.data_ptr(), gamma.data_ptr(), rgamma.data_ptr(), addr(relu_y), rgx.data_ptr(), rggamma.data_ptr(),
                         rgbeta.data_ptr(), *gy.shape)


def _triton(name):
    def launch(*args, wrap):
        from ..triton import batchnorm

        getattr(batchnorm, name)(*args, wrap=wrap)

    return launch


def _triton_fwd(x, gamma, beta, eps, relu, y, xhat, rstd, wrap):
    from ..triton import batchnorm

    batchnorm.bn_fwd(x, gamma, beta, y, xhat, rstd, eps, relu, wrap=wrap)


# --------------------------------------------------------------------------- registrations

register(OpSpec(
    "bn_fwd", "(Tensor x, Tensor gamma, Tensor beta, float eps, bool relu) -> (Tensor, Tensor, Tensor)",
    _fwd_fake, ref.bn_fwd, cpu=_cpu_fwd, triton=_triton_fwd,
))
register(OpSpec(
    "bn_bwd", "(Tensor gy, Tensor xhat, Tensor rstd, Tensor gamma, Tensor? relu_y) -> (Tensor, Tensor, Tensor)",
    _bwd_fake, ref.bn_bwd, cpu=_cpu_bwd, triton=_triton("bn_bwd"),
))
register(OpSpec(
    "bn_tfwd",
    "(Tensor rx, Tensor xhat, Tensor rstd, Tensor gamma, Tensor rgamma, Tensor rbeta, Tensor? relu_y) -> (Tensor, Tensor, Tensor)",
    _tfwd_fake, ref.bn_tfwd, cpu=_cpu_tfwd, triton=_triton("bn_tfwd"),
))
register(OpSpec(
    "bn_tbwd",
    "(Tensor gy, Tensor rgy, Tensor xhat, Tensor rxhat, Tensor rstd, Tensor a, Tensor gamma, Tensor rgamma, Tensor? relu_y)"
    " -> (Tensor, Tensor, Tensor)",
    _tbwd_fake, ref.bn_tbwd, cpu=_cpu_tbwd, triton=_triton("bn_tbwd"),
))

# --------------------------------------------------------------------------- public functions


def bn_fwd(x: Tensor, gamma: Tensor, beta: Tensor, eps: float, relu: bool, backend=None):
    """BatchNorm (batch statistics) [+ ReLU]: ``x [T,R,C]``, ``gamma, beta [T,C]`` -> ``(y, xhat [T,R,C], rstd [T,C])``."""
    return kernels(x.device, x.dtype, backend).bn_fwd(x, gamma, beta, float(eps), bool(relu))


def bn_bwd(gy, xhat, rstd, gamma, relu_y, backend=None):
    """-> ``(gx [T,R,C], ggamma [T,C], gbeta [T,C])``."""
    return kernels(gy.device, gy.dtype, backend).bn_bwd(gy, xhat, rstd, gamma, relu_y)


def bn_tfwd(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y, backend=None):
    """Tangent forward -> ``(ry, rxhat [T,R,C], a [T,C])`` with ``a = mean(x̂ ẋ)``."""
    return kernels(rx.device, rx.dtype, backend).bn_tfwd(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y)


def bn_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, backend=None):
    """Tangent backward -> ``(rgx [T,R,C], rggamma [T,C], rgbeta [T,C])``."""
    return kernels(gy.device, gy.dtype, backend).bn_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y)
