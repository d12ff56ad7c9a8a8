"""MINRES for T symmetric systems at once, indefinite ones included (Paige & Saunders 1975).

Where ``(I + H/λ)`` is indefinite (a non-convex task with λ small) CG meets negative curvature
and stops at a partial solve; MINRES minimises the residual over the same Krylov space and
needs only symmetry. It runs a fixed number of iterations with no host synchronisation: the
per-task scalars are ``[T]`` float64 tensors, and a task whose residual estimate falls below
``tol`` (or whose Krylov space is exhausted) stops updating through a mask. Each iteration is
the user's matvec and about a dozen elementwise passes over ``[T, P]`` (pure PyTorch: no
fused kernel, unlike :func:`~imaml_kernels.cg_solve`).

When to use it: damping (``CG(damping=1.0, lam_damping=10.0)``, the authors' system) keeps the
backward's system positive definite and CG cheap, at the price of solving a different system;
``solve=MINRES(...)`` solves the undamped ``(I + H/λ) x = g`` even where it is indefinite.

Example::

    >>> phi = ik.implicit_adapt(model, theta, (xs, ys), lam=0.1, inner=ik.GD(16, 0.1), solve=ik.MINRES(20))
    >>> x, info = ik.minres_solve(matvec, b, iters=30)           # info.residual: |r|/|b| estimates
"""

from typing import Callable

import torch

from .cg import CGInfo

__all__ = ["MINRES", "MINRESInfo", "minres_solve"]


# Its info is a CGInfo ([T] tensors: iterations, residual, converged, breakdown): residual is
# the relative residual estimate |b − A x| / |b| MINRES keeps (exact in exact arithmetic), and
# breakdown is always False (MINRES meets no curvature breakdown).
MINRESInfo = CGInfo


def _dot(a, b):
    return (a.double() * b.double()).sum(1)


def minres_solve(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, iters: int = 20, tol: float = 0.0):
    """Solve ``A_t x_t = b_t`` for T symmetric (possibly indefinite) systems: ``(x, info)``.

    Args:
        matvec: ``[T, P] -> [T, P]``, linear and per task, symmetric.
        b: ``[T, P]`` float32/float64.
        iters: iterations (a Python int); tol: relative residual at which a task stops.
    """
    if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"b must be a float32/float64 [T, P] tensor, got {getattr(b, 'shape', type(b).__name__)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    T, dt = b.shape[0], b.dtype
    f64 = dict(dtype=torch.float64, device=b.device)
    x = torch.zeros_like(b)
    beta1 = torch.linalg.vector_norm(b, dim=1, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    r1, r2, y = b.clone(), b.clone(), b.clone()
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    beta, oldb = beta1.clone(), torch.zeros(T, **f64)
    dbar, epsln, phibar = torch.zeros(T, **f64), torch.zeros(T, **f64), beta1.clone()
    cs, sn = torch.full((T,), -1.0, **f64), torch.zeros(T, **f64)
    count = torch.zeros(T, dtype=torch.int32, device=b.device)
    thresh = beta1 * float(tol)
    for k in range(iters):
        # Tasks still running: a Krylov space not exhausted and a residual above tol.
        active = (beta > tiny * beta1.clamp_min(1.0)) & (phibar > thresh) & (beta1 > 0)
        s = torch.where(active, 1.0 / torch.where(active, beta, 1.0), 0.0)
        v = y * s.to(dt)[:, None]
        y = matvec(v).to(dt)
        if k:
            y = y - (beta / torch.where(oldb > 0, oldb, 1.0)).to(dt)[:, None] * r1
        alfa = _dot(v, y)
        y = y - (alfa * s).to(dt)[:, None] * r2
        r1, r2 = r2, y
        oldb, beta = beta, torch.linalg.vector_norm(y, dim=1, dtype=torch.float64)
        # The QR factorisation of the Lanczos tridiagonal by one more plane rotation.
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln, dbar = sn * beta, -cs * beta
        gamma = torch.sqrt(gbar * gbar + beta * beta).clamp_min(tiny)
        cs_new, sn_new = gbar / gamma, beta / gamma
        phi = cs_new * phibar
        w1, w2 = w2, w
        w_new = (v - oldeps.to(dt)[:, None] * w1 - delta.to(dt)[:, None] * w2) * (1.0 / gamma).to(dt)[:, None]
        a = active[:, None]
        w = torch.where(a, w_new, w)
        x = torch.where(a, x + phi.to(dt)[:, None] * w_new, x)
        cs, sn = torch.where(active, cs_new, cs), torch.where(active, sn_new, sn)
        phibar = torch.where(active, sn_new * phibar, phibar)
        count += active.to(torch.int32)
    residual = torch.where(beta1 > 0, phibar / torch.where(beta1 > 0, beta1, 1.0), phibar)
    converged = residual <= tol
    return x, CGInfo(count, residual, converged, torch.zeros(T, dtype=torch.bool, device=b.device))


class MINRES:
    """The implicit backward's solve by :func:`minres_solve`: ``iters`` iterations on the
    (possibly indefinite) ``((1 + damping) I + H/(λ + lam_damping)) x = g`` (damping 0: the
    paper's system). Use where ``I + H/λ`` may be indefinite and damping is not wanted.

    Example::

        >>> phi = implicit_adapt(model, theta, (xs, ys), lam=0.2, inner=GD(16, 0.1), solve=MINRES(30))
    """

    def __init__(self, iters: int = 20, tol: float = 0.0, damping: float = 0.0, lam_damping: float = 0.0):
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"MINRES iters must be an int >= 1, got {iters!r}")
        for name, val in (("tol", tol), ("damping", damping), ("lam_damping", lam_damping)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= float(val) < float("inf"):
                raise ValueError(f"MINRES {name} must be a finite number >= 0, got {val!r}")
        self.iters, self.tol, self.damping, self.lam_damping = iters, float(tol), float(damping), float(lam_damping)

    def __repr__(self):
        return f"MINRES(iters={self.iters}, tol={self.tol}, damping={self.damping}, lam_damping={self.lam_damping})"

    def __call__(self, matvec, b):
        return minres_solve(matvec, b, iters=self.iters, tol=self.tol)
