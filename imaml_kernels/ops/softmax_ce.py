"""Softmax cross-entropy, the mean over a task's examples: loss, softmax and gradient in one
pass, and the tangent of the gradient.

Shapes: ``logits [T, N, K]``, labels ``y [T, N]`` int64 in ``[0, K)``. Formulas:
:mod:`imaml_kernels.reference.softmax_ce`. Kernels: ``csrc/softmax_ce_cpu.cpp`` (C++),
:mod:`imaml_kernels.triton.softmax_ce` (Triton).

Example::

    >>> k = dispatch.kernels(logits.device, logits.dtype)
    >>> loss, prob, grad = k.softmax_ce(logits, y)          # [T], [T,N,K], [T,N,K]
    >>> rg = k.softmax_ce_tangent(prob, rlogits)             # [T,N,K]
    >>> loss, prob, grad = k.softmax_ce_bias(logits, y, gb)  # and gb [T,K] = grad.sum(1), in place
"""

import torch
from torch import Tensor

from .. import reference as ref
from ._checks import check_tensor, dtype_code, expect, native
from ._registry import OpSpec, register, triton_launcher

# --------------------------------------------------------------------------- validation


def _check_labels(y, logits):
    expect(isinstance(y, Tensor) and y.dtype == torch.int64, TypeError, "y must be an int64 tensor of class labels")
    expect(tuple(y.shape) == tuple(logits.shape[:2]), ValueError, f"y must have shape {tuple(logits.shape[:2])}, got {tuple(y.shape)}")
    expect(y.is_contiguous() and y.device == logits.device, ValueError, "y must be contiguous and on the logits' device")


def _ce_fake(logits, y):
    check_tensor("logits", logits, dim=3)
    _check_labels(y, logits)
    return logits.new_empty(logits.shape[0]), torch.empty_like(logits), torch.empty_like(logits)


def _bias_fake(logits, y, gbias):
    res = _ce_fake(logits, y)
    T, _, K = logits.shape
    expect(isinstance(gbias, Tensor) and tuple(gbias.shape) == (T, K), ValueError, f"gbias must have shape {(T, K)}")
    expect(gbias.dtype == logits.dtype and gbias.device == logits.device, TypeError, "gbias must match the logits' dtype and device")
    expect(K <= 1 or gbias.stride(1) == 1, ValueError, "gbias must have unit stride along the classes")
    expect(T <= 1 or gbias.stride(0) >= K, ValueError, "gbias' rows must not overlap")
    return res


def _tangent_fake(prob, rlogits):
    check_tensor("prob", prob, dim=3)
    check_tensor("rlogits", rlogits, dim=3, like=prob)
    return torch.empty_like(prob)


# --------------------------------------------------------------------------- launchers


def _cpu_ce(logits, y, loss, prob, grad):
    native().softmax_ce_cpu(dtype_code(logits), logits.data_ptr(), y.data_ptr(), loss.data_ptr(), prob.data_ptr(),
                            grad.data_ptr(), *logits.shape)


def _cpu_bias(logits, y, gbias, loss, prob, grad):
    T, _, K = logits.shape
    native().softmax_ce_cpu(dtype_code(logits), logits.data_ptr(), y.data_ptr(), loss.data_ptr(), prob.data_ptr(),
                            grad.data_ptr(), *logits.shape, gbias.data_ptr(), gbias.stride(0) if T > 1 else K)


def _ref_bias(logits, y, gbias):
    loss, prob, grad = _ref_ce(logits, y)
    gbias.copy_(grad.sum(1))
    return loss, prob, grad


def _cpu_tangent(prob, rlogits, rg):
    native().softmax_ce_tangent_cpu(dtype_code(prob), prob.data_ptr(), rlogits.data_ptr(), rg.data_ptr(), *prob.shape)


def _ref_ce(logits, y):
    loss, prob = ref.softmax_ce(logits, y)
    return loss, prob, ref.softmax_ce_grad(prob, y)


# --------------------------------------------------------------------------- registrations

_LABELS = (("y", torch.int64),)  # labels of any integer dtype are taken as int64

register(OpSpec("softmax_ce", "(Tensor logits, Tensor y) -> (Tensor, Tensor, Tensor)", _ce_fake, _ref_ce,
                cpu=_cpu_ce, triton=triton_launcher("softmax_ce.softmax_ce"), casts=_LABELS))
register(OpSpec("softmax_ce_bias", "(Tensor logits, Tensor y, Tensor(a!) gbias) -> (Tensor, Tensor, Tensor)", _bias_fake,
                _ref_bias, cpu=_cpu_bias, triton=triton_launcher("softmax_ce.softmax_ce_bias"), mutates=("gbias",),
                casts=_LABELS))
register(OpSpec("softmax_ce_tangent", "(Tensor prob, Tensor rlogits) -> Tensor", _tangent_fake, ref.softmax_ce_tangent,
                cpu=_cpu_tangent, triton=triton_launcher("softmax_ce.softmax_ce_tangent")))
