"""Pure-PyTorch twin of the CG family (:mod:`imaml_kernels.ops.cg`) and a textbook
multi-task CG (the float64 ground truth of :func:`imaml_kernels.cg_solve`).

Shapes: flat vectors are ``[T, P]``.
"""

import torch

# Status codes shared with csrc/cg_common.h.
CG_ACTIVE, CG_CONVERGED, CG_BREAKDOWN = 0, 1, 2
CG_DOTS = 4  # rr, pAp, rAp, ApAp


def cg_dots(r, p, Ap, partials, chunk):
    """Reference of ``imaml::cg_dots``: per-block dot products into ``partials``.

    Args:
        r, p, Ap: ``[T, P]`` float tensors.
        partials: ``[T, NB, 4]`` float64 output, ``NB = ceil(P / chunk)``; filled with
            (r.r, p.Ap, r.Ap, Ap.Ap) per block of ``chunk`` elements.
        chunk: block length.
    """
    T, P = r.shape
    nb = partials.shape[1]
    pad = nb * chunk - P

    def blocks(a, b):
        # float64 before the product, as the kernels do (a float32 r*r underflows near convergence).
        prod = torch.nn.functional.pad(a.to(torch.float64) * b.to(torch.float64), (0, pad))
        return prod.view(T, nb, chunk).sum(-1)

    partials.copy_(torch.stack([blocks(r, r), blocks(p, Ap), blocks(r, Ap), blocks(Ap, Ap)], -1))


def cg_step(sums, thresh, status_in):
    """Per-task CG scalars from summed dots ``sums`` ``[T, 4]`` (float64).

    Returns ``(alpha, beta, status, update)``, each ``[T]``; mirrors ``cg_step`` in csrc/cg_common.h.
    """
    rr, pAp, rAp, ApAp = sums.unbind(-1)
    finite = torch.isfinite(sums).all(-1)
    broken_in = status_in == CG_BREAKDOWN
    converged = finite & (rr <= thresh)
    alpha = rr / pAp
    rr_new = (rr - 2.0 * alpha * rAp + alpha * alpha * ApAp).clamp_min(0.0)
    beta = rr_new / rr
    ok = finite & (pAp > 0) & torch.isfinite(alpha) & torch.isfinite(beta)
    update = ~broken_in & ~converged & ok
    status = torch.where(
        broken_in | ~(converged | ok),
        CG_BREAKDOWN,
        torch.where(converged, CG_CONVERGED, CG_ACTIVE),
    ).to(torch.int32)
    zero = torch.zeros_like(alpha)
    return torch.where(update, alpha, zero), torch.where(update, beta, zero), status, update


def cg_update(x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk):
    """Reference of ``imaml::cg_update``: ``x += a p; r -= a Ap; p = r + b p`` per task.

    Args:
        x, r, p: ``[T, P]``, updated in place (only for tasks that take a step).
        Ap: ``[T, P]``, the user's matvec of ``p``.
        partials: ``[T, NB, 4]`` float64 from :func:`cg_dots`.
        status_in: ``[T]`` int32 status before the step; ``status_out``: ``[T]`` int32, written.
        iters: ``[T]`` int32, incremented for tasks that took a step.
        thresh: ``[T]`` float64, ``tol**2 * |b|**2``.
        chunk: unused (block length of ``partials``), kept for the common signature.
    """
    alpha, beta, status, update = cg_step(partials.sum(1), thresh, status_in)
    a = alpha.to(x.dtype)[:, None]
    b = beta.to(x.dtype)[:, None]
    u = update[:, None]
    r_new = r - a * Ap
    x.copy_(torch.where(u, x + a * p, x))
    p.copy_(torch.where(u, r_new + b * p, p))
    r.copy_(torch.where(u, r_new, r))
    status_out.copy_(status)
    iters.add_(update.to(torch.int32))


def cg_solve(matvec, b, *, iters=5, tol=0.0, x0=None):
    """Plain eager multi-task CG with the same masking and breakdown rules as the kernels.

    A self-contained textbook formulation (no partials, no fused passes) used as the
    float64 ground truth in tests. Returns ``(x, iterations, status)``.
    """
    T = b.shape[0]
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    thresh = (tol * tol) * (b.to(torch.float64) ** 2).sum(-1)
    status = torch.zeros(T, dtype=torch.int32, device=b.device)
    count = torch.zeros(T, dtype=torch.int32, device=b.device)
    for _ in range(iters):
        Ap = matvec(p)
        sums = torch.stack(
            [(u.to(torch.float64) * w.to(torch.float64)).sum(-1) for u, w in ((r, r), (p, Ap), (r, Ap), (Ap, Ap))],
            -1,
        )
        alpha, beta, status, update = cg_step(sums, thresh, status)
        a, bt, u = alpha.to(b.dtype)[:, None], beta.to(b.dtype)[:, None], update[:, None]
        r_new = r - a * Ap
        x = torch.where(u, x + a * p, x)
        p = torch.where(u, r_new + bt * p, p)
        r = torch.where(u, r_new, r)
        count = count + update.to(torch.int32)
    return x, count, status
