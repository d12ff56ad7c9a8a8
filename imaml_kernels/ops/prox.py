"""The proximal gradient step of the fused inner loop, in place:
``φ ← φ − lr (∇L̂(φ) + λ (φ − θ))`` for every task.

Shapes: ``phi, grad [T, P]``, ``theta [P]`` (shared) or ``[T, P]``; ``lam [T]`` (λ per task), or
``[1, P]`` / ``[T, P]`` (λ per coordinate: a row shared by the tasks, or one per task). Kernels:
``csrc/prox_cpu.cpp`` (C++), :mod:`imaml_kernels.triton.prox` (Triton); twin
:mod:`imaml_kernels.reference.prox`.

Example::

    >>> dispatch.kernels(phi.device, phi.dtype).prox_step(phi, grad, theta, lam, 0.1)   # phi in place
"""

from .. import reference as ref
from ._checks import check_tensor, dtype_code, expect, native
from ._registry import OpSpec, register, triton_launcher


def _check(phi, grad, theta, lam, lr):
    check_tensor("phi", phi, dim=2)
    check_tensor("grad", grad, dim=2, like=phi)
    check_tensor("theta", theta)
    expect((theta.dim() == 1 and theta.shape[0] == phi.shape[1]) or theta.shape == phi.shape,
           ValueError, f"theta must be [P] or [T, P] with P={phi.shape[1]}, got {tuple(theta.shape)}")
    expect(theta.dtype == phi.dtype and theta.device == phi.device, ValueError, "theta must match phi's dtype and device")
    check_tensor("lam", lam)
    T, P = phi.shape
    expect(tuple(lam.shape) in ((T,), (1, P), (T, P)) and lam.dtype == phi.dtype and lam.device == phi.device,
           ValueError, f"lam must be [{T}] (per task) or [1, {P}] / [{T}, {P}] (per coordinate) of dtype {phi.dtype} "
           f"on {phi.device}, got {tuple(lam.shape)} {lam.dtype}")


def lam_layout(phi, lam):
    """``(task stride, per coordinate)`` of ``lam`` for the kernels."""
    if lam.dim() == 1:
        return 1, False
    return (0 if lam.shape[0] == 1 else phi.shape[1]), True


def _cpu(phi, grad, theta, lam, lr):
    T, P = phi.shape
    native().prox_step_cpu(dtype_code(phi), phi.data_ptr(), grad.data_ptr(), theta.data_ptr(), 0 if theta.dim() == 1 else P,
                           lam.data_ptr(), *lam_layout(phi, lam), lr, T, P)


def _ref(phi, grad, theta, lam, lr):
    ref.prox_step(phi, grad, theta if theta.dim() == 2 else theta.unsqueeze(0), lam.unsqueeze(1) if lam.dim() == 1 else lam, lr)


register(OpSpec("prox_step", "(Tensor(a!) phi, Tensor grad, Tensor theta, Tensor lam, float lr) -> ()", _check, _ref,
                cpu=_cpu, triton=triton_launcher("prox.prox_step"), mutates=("phi",)))

