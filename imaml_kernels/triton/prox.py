"""Triton kernel of the proximal gradient step of the fused inner loop, and its launcher."""

import triton
import triton.language as tl

from ._common import check, ident, split_f64

# Bytes per prox_step program (one task's parameters are split into such blocks): 2048
# float32 / 1024 float64 elements, 8 / 4 per thread at 8 warps. Not swept on a GPU.
PROX_BLOCK_BYTES = 8192
PROX_NUM_WARPS = 8


@triton.jit(do_not_specialize=("nb",))  # one compile for every block count
def _prox_step_kernel(
    phi_ptr,  # [T, P] task parameters, updated in place
    grad_ptr,  # [T, P] loss gradient at phi
    theta_ptr,  # [T, P] or [P] (theta_stride 0) proximal centre
    lam_ptr,  # [T] proximal weight per task, or per coordinate ([1, P] / [T, P]: LAM_VEC)
    P,  # parameters per task
    nb,  # blocks per task
    theta_stride,  # P, or 0 when theta is shared by all tasks
    lam_stride,  # per task: 1; per coordinate: 0 (a shared row) or P
    lr_hi,  # lr = lr_hi + lr_lo, both fp32-exact (module docstring)
    lr_lo,  # see lr_hi
    BLOCK: tl.constexpr,
    LAM_VEC: tl.constexpr,  # λ per coordinate
):
    # One grid axis, task-major (axis 0 takes 2**31 - 1 programs, axis 1 only 65,535: P above
    # 134M float32 would not launch there); int64: T * P exceeds 2**31 at large T.
    pid = tl.program_id(0).to(tl.int64)
    t = pid // nb
    b = pid % nb
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P  # the last block of a task is partial
    dt = phi_ptr.dtype.element_ty
    phi = tl.load(phi_ptr + t * P + offs, mask=mask, other=0.0)
    g = tl.load(grad_ptr + t * P + offs, mask=mask, other=0.0)
    th = tl.load(theta_ptr + t * theta_stride + offs, mask=mask, other=0.0)
    if LAM_VEC:
        lam = tl.load(lam_ptr + t * lam_stride + offs, mask=mask, other=0.0)
    else:
        lam = tl.load(lam_ptr + t * lam_stride)
    lr = (tl.zeros([1], dtype=dt) + lr_hi) + lr_lo
    tl.store(phi_ptr + t * P + offs, phi - lr * (g + lam * (phi - th)), mask=mask)


def prox_step(phi, grad, theta, lam, lr: float, wrap=ident):
    """In place: ``phi -= lr (grad + lam (phi - theta))``; ``theta`` is ``[T,P]`` or shared ``[P]``;
    ``lam`` is ``[T]`` (per task) or ``[1,P]`` / ``[T,P]`` (per coordinate)."""
    T, P = phi.shape
    check(phi, (T, P), grad=(grad, (T, P)), theta=(theta, tuple(theta.shape)), lam=(lam, tuple(lam.shape)))
    if tuple(lam.shape) not in ((T,), (1, P), (T, P)):
        raise ValueError(f"lam: shape {tuple(lam.shape)}, expected {(T,)}, {(1, P)} or {(T, P)}")
    if tuple(theta.shape) not in ((T, P), (P,)):
        raise ValueError(f"theta: shape {tuple(theta.shape)}, expected {(T, P)} or {(P,)}")
    if T * P == 0:
        return
    block = min(PROX_BLOCK_BYTES // phi.element_size(), triton.next_power_of_2(P))
    lr_hi, lr_lo = split_f64(lr)
    nb = triton.cdiv(P, block)
    vec = lam.dim() == 2
    lam_stride = (0 if lam.shape[0] == 1 else P) if vec else 1
    wrap(_prox_step_kernel)[(T * nb,)](
        phi, grad, theta, lam, P, nb, P if theta.dim() == 2 else 0, lam_stride, lr_hi, lr_lo,
        BLOCK=block, LAM_VEC=vec, num_warps=PROX_NUM_WARPS,
    )
