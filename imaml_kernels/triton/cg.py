"""Triton kernels of the fused CG iteration: private kernels, then host launchers.

Layout as everywhere: ``[T, P]`` row-major, contiguous. One program per ``BLOCK`` elements of
one task, on one grid axis (``T * NB`` programs, task-major: axis 0 takes 2**31 - 1 where axes
1 and 2 take 65,535, which ``NB`` alone would pass at P above 268M); ``partials`` is
``[T, NB, 4]`` float64. The launchers
validate nothing beyond the block length (``chunk``): :mod:`imaml_kernels.ops.cg` checks every
argument.
"""

import triton
import triton.language as tl

from ._common import ident

# Elements per program: fixed (it is the partials' chunk, imaml_kernels.ops.cg). A program
# walks its block in CG_SUB-element steps (4 per thread at 8 warps), so the float64 products
# of cg_dots and the four vectors of cg_update stay under 128 registers in float64 too (the
# whole block at once took 122-142). Not swept on a GPU (none was available).
CG_BLOCK = 4096
CG_SUB = 1024
CG_NUM_WARPS = 8
CG_NB_BLOCK = 32  # partials per step of cg_update's reduction (P up to 131,072 in one step)


@triton.jit(do_not_specialize=("nb",))  # one compile for every block count
def _cg_dots_kernel(
    r_ptr,  # [T, P] residual
    p_ptr,  # [T, P] search direction
    ap_ptr,  # [T, P] A p
    partials_ptr,  # [T, NB, 4] float64 out: rr, pAp, rAp, ApAp per block
    n,  # P
    nb,  # NB
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,  # elements per step (BLOCK is a multiple)
):
    # int64 before offset arithmetic: T * P exceeds 2**31 at paper sizes x large T.
    pid = tl.program_id(0).to(tl.int64)
    t = pid // nb
    b = pid % nb
    base = t * n
    # float64 accumulation regardless of the data type (P is 1e5..1e6), per lane over the
    # steps, then one reduction: a fixed order, so the partials are deterministic.
    rr = tl.zeros([SUB], dtype=tl.float64)
    pap = tl.zeros([SUB], dtype=tl.float64)
    rap = tl.zeros([SUB], dtype=tl.float64)
    apap = tl.zeros([SUB], dtype=tl.float64)
    for k in range(0, BLOCK, SUB):
        offs = b * BLOCK + k + tl.arange(0, SUB)
        mask = offs < n  # the last block of a task is partial
        r = tl.load(r_ptr + base + offs, mask=mask, other=0.0).to(tl.float64)
        p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(tl.float64)
        ap = tl.load(ap_ptr + base + offs, mask=mask, other=0.0).to(tl.float64)
        rr += r * r
        pap += p * ap
        rap += r * ap
        apap += ap * ap
    out = partials_ptr + (t * nb + b) * 4
    tl.store(out + 0, tl.sum(rr, axis=0))
    tl.store(out + 1, tl.sum(pap, axis=0))
    tl.store(out + 2, tl.sum(rap, axis=0))
    tl.store(out + 3, tl.sum(apap, axis=0))


@triton.jit(do_not_specialize=("nb",))  # one compile for every block count
def _cg_update_kernel(
    x_ptr,  # [T, P] iterate, updated in place
    r_ptr,  # [T, P] residual, updated in place
    p_ptr,  # [T, P] direction, updated in place
    ap_ptr,  # [T, P] A p
    partials_ptr,  # [T, NB, 4] float64 from _cg_dots_kernel
    status_in_ptr,  # [T] int32 status before this step
    status_out_ptr,  # [T] int32 status after (written by block 0)
    iters_ptr,  # [T] int32 steps taken (incremented by block 0)
    thresh_ptr,  # [T] float64 tol^2 |b|^2
    n,  # P
    nb,  # NB
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,  # elements per step (BLOCK is a multiple)
    NB_BLOCK: tl.constexpr,  # partials summed per step
):
    pid = tl.program_id(0).to(tl.int64)
    t = pid // nb
    b = pid % nb
    # Every program re-reduces its task's partials (NB is small): deterministic, and
    # saves a launch compared with a separate scalar kernel. NB_BLOCK at a time, per lane, then
    # one reduction: a fixed order, and one compile for every P (a block of all NB partials
    # would be one specialisation per power of two, and spill at large P).
    rr = tl.zeros([NB_BLOCK], dtype=tl.float64)
    pap = tl.zeros([NB_BLOCK], dtype=tl.float64)
    rap = tl.zeros([NB_BLOCK], dtype=tl.float64)
    apap = tl.zeros([NB_BLOCK], dtype=tl.float64)
    for j0 in range(0, nb, NB_BLOCK):
        j = j0 + tl.arange(0, NB_BLOCK)
        jmask = j < nb
        row = partials_ptr + (t * nb + j) * 4
        rr += tl.load(row + 0, mask=jmask, other=0.0)
        pap += tl.load(row + 1, mask=jmask, other=0.0)
        rap += tl.load(row + 2, mask=jmask, other=0.0)
        apap += tl.load(row + 3, mask=jmask, other=0.0)
    rr = tl.sum(rr, axis=0)
    pap = tl.sum(pap, axis=0)
    rap = tl.sum(rap, axis=0)
    apap = tl.sum(apap, axis=0)
    status_in = tl.load(status_in_ptr + t)
    thresh = tl.load(thresh_ptr + t)

    # Same rules as cg_step in csrc/cg_common.h. x - x == 0 is false for NaN and inf.
    finite = (rr - rr == 0.0) & (pap - pap == 0.0) & (rap - rap == 0.0) & (apap - apap == 0.0)
    broken_in = status_in == 2
    converged = finite & (rr <= thresh)
    safe_pap = tl.where(pap > 0.0, pap, 1.0)
    safe_rr = tl.where(rr > 0.0, rr, 1.0)
    alpha = rr / safe_pap
    rr_new = rr - 2.0 * alpha * rap + alpha * alpha * apap
    # Cancellation's small negative to 0, NaN (inf - inf at huge alpha) kept, so beta is NaN and
    # the task breaks down as in cg_step: not tl.maximum, whose max.f64 would return 0 for NaN.
    rr_new = tl.where(rr_new < 0.0, 0.0, rr_new)
    beta = rr_new / safe_rr
    ok = finite & (pap > 0.0) & (rr > 0.0) & (alpha - alpha == 0.0) & (beta - beta == 0.0)
    update = (~broken_in) & (~converged) & ok
    status = tl.where(broken_in | ~(converged | ok), 2, tl.where(converged, 1, 0)).to(tl.int32)
    first = b == 0
    tl.store(status_out_ptr + t, status, mask=first)
    it = tl.load(iters_ptr + t)
    tl.store(iters_ptr + t, it + update.to(tl.int32), mask=first)

    base = t * n
    dt = x_ptr.dtype.element_ty
    a = alpha.to(dt)
    be = beta.to(dt)
    for k in range(0, BLOCK, SUB):
        offs = b * BLOCK + k + tl.arange(0, SUB)
        mask = (offs < n) & update
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
        r = tl.load(r_ptr + base + offs, mask=mask, other=0.0)
        p = tl.load(p_ptr + base + offs, mask=mask, other=0.0)
        ap = tl.load(ap_ptr + base + offs, mask=mask, other=0.0)
        r_new = r - a * ap
        tl.store(x_ptr + base + offs, x + a * p, mask=mask)
        tl.store(r_ptr + base + offs, r_new, mask=mask)
        tl.store(p_ptr + base + offs, r_new + be * p, mask=mask)


# --------------------------------------------------------------------------- host launchers


def _check_chunk(chunk):
    if chunk != CG_BLOCK:
        raise ValueError(f"chunk must be {CG_BLOCK} for the Triton kernels, got {chunk}")


def cg_dots(r, p, Ap, partials, chunk, wrap=ident):
    """Per-block dot products of ``[T, P]`` vectors into ``partials [T, ceil(P/CG_BLOCK), 4]``
    (``chunk``, the partials' block length, must be ``CG_BLOCK``)."""
    _check_chunk(chunk)
    T, P = r.shape
    nb = partials.shape[1]
    if T == 0:  # P = 0 still launches: the blocks write zero partials
        return
    wrap(_cg_dots_kernel)[(T * nb,)](r, p, Ap, partials, P, nb, BLOCK=CG_BLOCK, SUB=CG_SUB, num_warps=CG_NUM_WARPS)


def cg_update(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk, wrap=ident):
    """The fused CG update of every task from the partials of :func:`cg_dots` (``chunk`` as there)."""
    _check_chunk(chunk)
    T, P = x.shape
    nb = partials.shape[1]
    if T == 0:
        return
    wrap(_cg_update_kernel)[(T * nb,)](
        x, r, p, Ap, partials, status_in, status_out, iters, thresh, P, nb,
        BLOCK=CG_BLOCK, SUB=CG_SUB, NB_BLOCK=CG_NB_BLOCK, num_warps=CG_NUM_WARPS,
    )
