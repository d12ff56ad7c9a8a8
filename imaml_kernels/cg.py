"""Multi-task conjugate gradient: T independent SPD systems solved at once."""

from typing import Callable, NamedTuple, Optional

import torch

from .dispatch import kernels
from .ops.cg import cg_partials
from .reference.cg import CG_BREAKDOWN


class CGInfo(NamedTuple):
    """Per-task outcome of :func:`cg_solve`; every field is a ``[T]`` tensor (no host sync).

    - ``iterations``: int32, CG steps the task took (it stops at convergence or breakdown);
    - ``residual``: float64, final relative residual ``|r| / |b|`` (0 where ``b`` is 0);
    - ``converged``: bool, ``residual <= tol`` (always False for a broken-down task);
    - ``breakdown``: bool, ``p.Ap <= 0`` or a non-finite value was met; the task kept its
      last good iterate;
    - ``diverged`` (a property, computed when read: no launch otherwise): bool, the residual
      grew: the final ``|r|`` exceeds ``|b|`` (the residual of ``x = 0``) or is not finite,
      without a breakdown being met. CG on a symmetric positive-definite system never ends
      there; a nonsymmetric or indefinite ``matvec`` can.
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    breakdown: torch.Tensor

    @property
    def diverged(self) -> torch.Tensor:
        return ~self.breakdown & ~(self.residual <= 1.0)  # NaN-safe: a non-finite residual counts


def _checked_matvec(matvec, v, b):
    out = matvec(v)
    if not isinstance(out, torch.Tensor) or out.shape != b.shape or out.dtype != b.dtype or out.device != b.device:
        got = (tuple(out.shape), out.dtype, out.device) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"matvec must map [T, P] to [T, P] ({tuple(b.shape)}, {b.dtype}, {b.device}); got {got}")
    # The kernels mutate p; an Ap aliasing p (identity matvec) must be a copy.
    if out is v or not out.is_contiguous():
        out = out.contiguous() if out is not v else out.clone()
    return out


ROW_BLOCK = 1024  # elements per partial norm of row_norms


def row_norms(t: torch.Tensor) -> torch.Tensor:
    """``‖t_i‖₂`` of each row of ``t [T, P]`` in float64, one pass over ``t``.

    A float64 ``t``, or one off the CPU, is reduced in float64. A float32 row on the CPU is cut into blocks of
    :data:`ROW_BLOCK` elements, each block's norm is taken in float32 and the blocks' squares
    are summed in float64 (relative error about 1e-8 here, below the float32 data's own): a float64
    accumulator over float32 elements ran 35-70x slower on the CPU for long rows (11 against
    0.15-0.2 ms for [1, 4.7M] or [8, 583k], Zen 5, 2 threads; 0.14 against 0.48 ms at
    [32, 113k]), and a solve takes two norms per chunk of tasks."""
    T, P = t.shape
    m = P // ROW_BLOCK
    if t.dtype == torch.float64 or m < 1 or t.stride(1) != 1 or t.device.type != "cpu":  # a GPU reduces it in one launch
        return torch.linalg.vector_norm(t, dim=-1, dtype=torch.float64)
    head = t[:, : m * ROW_BLOCK].view(T, m, ROW_BLOCK)
    sq = torch.linalg.vector_norm(head, dim=-1).double().square().sum(-1)
    if m * ROW_BLOCK < P:
        sq = sq + torch.linalg.vector_norm(t[:, m * ROW_BLOCK :], dim=-1, dtype=torch.float64).square()
    return sq.sqrt()


def cg_solve(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    iters: int = 5,
    tol: float = 0.0,
    x0: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    overwrite_b: bool = False,
):
    """Solve ``A_t x_t = b_t`` for T symmetric positive-definite systems at once.

    A fixed number of iterations with no host synchronisation; a task whose relative
    residual ``|r|/|b| <= tol`` stops updating through a per-task mask, and a task that meets
    negative curvature or a non-finite value keeps its last good iterate and is flagged.
    Each iteration is the user's ``matvec`` plus two fused kernels (dot products; update).

    Args:
        matvec: callable ``[T, P] -> [T, P]`` applying every task's ``A_t`` (in iMAML,
            ``v -> v + H v / lam``). Must be linear and per-task.
        b: ``[T, P]`` float32/float64 right-hand sides.
        iters: number of CG iterations (a Python int; the loop is unrolled under compile).
        tol: relative residual at which a task stops.
        x0: optional ``[T, P]`` initial guess (one extra matvec).
        backend: ``"cuda" | "triton" | "cpu" | "reference"`` or ``None`` (automatic,
            see :mod:`imaml_kernels.dispatch`).
        overwrite_b: ``b`` (contiguous) may serve as the residual's buffer, and is then
            overwritten: one ``[T, P]`` buffer fewer, for a caller that owns ``b``.

    Returns:
        ``(x, info)``: ``x`` ``[T, P]`` of ``b``'s dtype and a :class:`CGInfo`.

    Example::

        >>> A = torch.eye(3).expand(4, 3, 3) * 2.0
        >>> x, info = cg_solve(lambda v: torch.einsum("tij,tj->ti", A, v), torch.ones(4, 3))
        >>> x[0]  # tensor([0.5000, 0.5000, 0.5000])
    """
    if not isinstance(b, torch.Tensor) or b.dim() != 2:
        raise ValueError(f"b must be a [T, P] tensor, got {getattr(b, 'shape', type(b).__name__)}")
    if b.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"b must be float32 or float64, got {b.dtype}")
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    if not tol >= 0.0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if x0 is not None and (x0.shape != b.shape or x0.dtype != b.dtype or x0.device != b.device):
        raise ValueError(f"x0 must match b ({tuple(b.shape)}, {b.dtype}, {b.device}), got {tuple(x0.shape)}, {x0.dtype}, {x0.device}")

    kern = kernels(b.device, b.dtype, backend)  # resolved once for the whole solve
    own = overwrite_b and b.is_contiguous() and not torch.compiler.is_compiling()
    b = b.contiguous()
    T = b.shape[0]
    if x0 is None:
        x = torch.zeros_like(b)
        r = b if own else b.clone()
    else:
        x = x0.clone(memory_format=torch.contiguous_format)
        r = b - _checked_matvec(matvec, x, b)
    p = r.clone()
    # Norms in float64 straight from b's dtype (one pass; a float64 copy first, then a
    # square, then a sum, took 10x longer on the CPU). Before the iterations: r may be b.
    b_norm = row_norms(b)
    partials, chunk = cg_partials(b, kern.backend)
    thresh = (b_norm * float(tol)).square()
    # Ping-pong status buffers: blocks of the update kernel read one while block 0 writes the other.
    status = [torch.zeros(T, dtype=torch.int32, device=b.device) for _ in range(2)]
    count = torch.zeros(T, dtype=torch.int32, device=b.device)
    for k in range(iters):
        Ap = _checked_matvec(matvec, p, b)
        kern.cg_dots(r, p, Ap, partials, chunk)
        kern.cg_update(x, r, p, Ap, partials, status[k % 2], status[(k + 1) % 2], count, thresh, chunk)
    final = status[iters % 2]
    r_norm = row_norms(r)
    residual = torch.where(b_norm > 0, r_norm / torch.where(b_norm > 0, b_norm, 1.0), r_norm)
    breakdown = final == CG_BREAKDOWN
    converged = ~breakdown & (residual <= tol)
    return x, CGInfo(count, residual, converged, breakdown)


class CG:
    """The linear solve of the implicit backward: ``iters`` CG iterations of
    :func:`cg_solve` on ``((1 + damping) I + H/(λ + lam_damping)) x = g``.

    ``CG()`` is the paper's ``(I + H/λ) x = g``; ``CG(damping=1.0, lam_damping=10.0)`` is the
    damped system of the authors' released code. Any callable ``solve(matvec, b) -> (x, info)``
    can stand in its place (:func:`~imaml_kernels.implicit_adapt`'s ``solve``); one that has
    ``damping``/``lam_damping`` attributes is handed the damped operator, like this one.

    Example::

        >>> phi = implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=GD(16, 0.1),
        ...                      solve=CG(iters=5, damping=1.0, lam_damping=10.0))
    """

    def __init__(self, iters: int = 5, tol: float = 0.0, damping: float = 0.0, lam_damping: float = 0.0, backend: Optional[str] = None):
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"CG iters must be an int >= 0, got {iters!r}")
        for name, val in (("tol", tol), ("damping", damping), ("lam_damping", lam_damping)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= float(val) < float("inf"):
                raise ValueError(f"CG {name} must be a finite number >= 0, got {val!r}")
        self.iters, self.tol, self.backend = iters, float(tol), backend
        self.damping, self.lam_damping = float(damping), float(lam_damping)

    def __repr__(self):
        return (f"CG(iters={self.iters}, tol={self.tol}, damping={self.damping}, "
                f"lam_damping={self.lam_damping}, backend={self.backend!r})")

    def __call__(self, matvec, b, overwrite_b=False):
        return cg_solve(matvec, b, iters=self.iters, tol=self.tol, backend=self.backend, overwrite_b=overwrite_b)
