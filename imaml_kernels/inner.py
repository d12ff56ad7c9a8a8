"""Inner solvers for the proximal objective ``L̂_t(φ) + (λ_t/2)‖φ − θ‖²``, all tasks at once.

Each solver is a callable ``solver(objective, phi0) -> phi`` where ``objective`` is a
:class:`imaml_kernels.objective.ProximalObjective` and ``phi0``/``phi`` are dicts of
``[T, ...]`` tensors. Solvers build no autograd graph and never synchronise with the host.
"""

import math

import torch

from .cg import cg_solve


def _count(v, least=0):
    return not isinstance(v, bool) and isinstance(v, int) and v >= least


def _positive(v):
    return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v < math.inf
from .lam import PerCoordinate
from .objective import lam_like, proximal_term


class GD:
    """``steps`` of gradient descent with step size ``lr`` (the paper: 16 steps, lr 0.1 for
    Omniglot 5-way).

    Example::

        >>> phi = implicit_adapt(model, theta, (x, y), lam=2.0, inner=GD(16, 0.1))
    """

    def __init__(self, steps: int, lr: float):
        if not (_count(steps) and _positive(lr)):
            raise ValueError(f"GD needs steps >= 0 and lr > 0 (an int and a finite number), got steps={steps!r}, lr={lr!r}")
        self.steps, self.lr = steps, lr

    def __repr__(self):
        return f"GD(steps={self.steps}, lr={self.lr})"

    def __call__(self, objective, phi0):
        # The objective runs the loop: fused on one flat [T, P] buffer with the engine.
        return objective.descend(phi0, self.steps, self.lr)


class SGDThenPullBack:
    """The inner procedure of the authors' released code (aravindr93/imaml_dev): ``steps``
    plain gradient steps on the task loss alone, ``φ ← φ − lr ∇L̂_t(φ)`` (no proximal term),
    then one proximal "pull-back" step ``φ ← φ − lr λ_t (φ − θ)``. Fused through the engine
    like :class:`GD` (one loop on a flat ``[T, P]`` buffer, no host synchronisation).

    It moves φ much further from θ than :class:`GD`'s proximal steps at the same λ and lr
    (on a real Omniglot 5w1s task, λ=2, lr 0.1, 16 steps: ‖φ − θ‖ ≈ 2.3 against 0.24); the
    implicit meta-gradient is still taken at the φ it returns. ``pull_back=False`` leaves
    out the last step: plain SGD on the task loss, the released evaluation
    (``measure_accuracy.py --lam 0``). The released command line
    for Omniglot 5w1s: ``SGDThenPullBack(16, 0.1)`` with ``lam=2.0`` and
    ``solve=CG(5, damping=1.0, lam_damping=10.0)``.

    Example::

        >>> phi = implicit_adapt(model, theta, (x, y), lam=2.0, inner=SGDThenPullBack(16, 0.1),
        ...                      solve=CG(iters=5, damping=1.0, lam_damping=10.0))
    """

    def __init__(self, steps: int, lr: float, pull_back: bool = True):
        if not (_count(steps) and _positive(lr)):
            raise ValueError(f"SGDThenPullBack needs an int steps >= 0 and lr > 0, got steps={steps!r}, lr={lr!r}")
        self.steps, self.lr, self.pull_back = steps, lr, bool(pull_back)

    def __repr__(self):
        extra = "" if self.pull_back else ", pull_back=False"
        return f"SGDThenPullBack(steps={self.steps}, lr={self.lr}{extra})"

    def __call__(self, objective, phi0):
        return objective.descend(phi0, self.steps, self.lr, proximal=False, pull_back=self.pull_back)


class SGD:
    """Gradient descent with heavy-ball momentum: ``buf = m buf + g; φ -= lr buf``."""

    def __init__(self, steps: int, lr: float, momentum: float = 0.9):
        if not (_count(steps) and _positive(lr) and isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"SGD needs steps >= 0, lr > 0, 0 <= momentum < 1 (an int, finite numbers); got {steps!r}, {lr!r}, {momentum!r}")
        self.steps, self.lr, self.momentum = steps, lr, momentum

    def __repr__(self):
        return f"SGD(steps={self.steps}, lr={self.lr}, momentum={self.momentum})"

    def __call__(self, objective, phi0):
        phi = {k: v.clone() for k, v in phi0.items()}
        buf = {k: torch.zeros_like(v) for k, v in phi.items()}
        for _ in range(self.steps):
            g = objective.grad(phi)
            for k in phi:
                buf[k].mul_(self.momentum).add_(g[k])
                phi[k].sub_(self.lr * buf[k])
        return phi


class Adam:
    """Adam (bias-corrected) on every task's proximal objective."""

    def __init__(self, steps: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        if not (_count(steps) and _positive(lr)):
            raise ValueError(f"Adam needs steps >= 0 and lr > 0 (an int and a finite number), got steps={steps!r}, lr={lr!r}")
        self.steps, self.lr, self.betas, self.eps = steps, lr, betas, eps

    def __repr__(self):
        return f"Adam(steps={self.steps}, lr={self.lr})"

    def __call__(self, objective, phi0):
        b1, b2 = self.betas
        phi = {k: v.clone() for k, v in phi0.items()}
        m = {k: torch.zeros_like(v) for k, v in phi.items()}
        s = {k: torch.zeros_like(v) for k, v in phi.items()}
        for i in range(1, self.steps + 1):
            g = objective.grad(phi)
            c1, c2 = 1 - b1**i, 1 - b2**i
            for k in phi:
                m[k].mul_(b1).add_(g[k], alpha=1 - b1)
                s[k].mul_(b2).addcmul_(g[k], g[k], value=1 - b2)
                phi[k].sub_(self.lr * (m[k] / c1) / ((s[k] / c2).sqrt() + self.eps))
        return phi


class NewtonCG:
    """Hessian-free Newton: each step solves ``(H_t + λ_t I) d_t = −∇_t`` with ``cg_iters``
    iterations of the multi-task CG solver, then takes a per-task backtracking (Armijo) line
    search over ``{1, 1/2, …}``, all tasks at once with no host synchronisation. A task whose
    line search finds no decrease does not move on that step.

    Where ``H_t + λ_t I`` is indefinite (a non-convex task, λ small) CG can meet negative
    curvature at its first iteration and return no direction; such a task, or one whose
    direction is not a descent direction, takes the steepest-descent direction ``−∇_t/λ_t``
    instead (truncated-Newton practice). The solver reports in ``objective.report``
    (``phi.inner_info``): ``decreased`` ``[T]`` bool, whether the proximal objective went
    down at all over the solve, and ``fallbacks`` ``[T]`` int32, the steps that fell back.

    This is the paper's best ("Hessian-Free") inner solver.
    """

    def __init__(self, steps: int, cg_iters: int = 5, ls_steps: int = 4, c1: float = 1e-4, backend=None):
        if not (_count(steps) and _count(cg_iters, 1) and _count(ls_steps, 1) and _positive(c1) and c1 < 1):
            raise ValueError(f"NewtonCG needs steps >= 0, cg_iters >= 1, ls_steps >= 1 (ints) and 0 < c1 < 1; "
                             f"got {steps!r}, {cg_iters!r}, {ls_steps!r}, c1={c1!r}")
        self.steps, self.cg_iters, self.ls_steps, self.c1, self.backend = steps, cg_iters, ls_steps, c1, backend

    def __repr__(self):
        return f"NewtonCG(steps={self.steps}, cg_iters={self.cg_iters}, ls_steps={self.ls_steps})"

    def __call__(self, objective, phi0):
        layout = objective.layout
        phi = layout.flatten(phi0).clone()
        start, fallbacks = None, torch.zeros(phi.shape[0], dtype=torch.int32, device=phi.device)
        for _ in range(self.steps):
            # One linearisation per Newton step: with the fused engine every CG product
            # reuses its primal pass; the solve runs in the linearisation's work order.
            lin = objective.linearize(phi)
            pv, pg = proximal_term(phi, objective.theta_flat, objective.lam)
            f0, g = lin.loss + pv, lin.grad + pg
            lam = lam_like(objective.lam, g)
            if isinstance(objective.lam, PerCoordinate):
                lam = lin.to_work(lam.expand_as(g))  # per coordinate: into the work order
            d, info = cg_solve(lambda v: lin.hvp(v) + lam * v, lin.to_work(-g), iters=self.cg_iters, backend=self.backend)
            d = lin.from_work(d)
            slope = (g * d).sum(1)  # < 0 for a descent direction
            # No direction (negative curvature at CG's first iteration) or no descent: steepest descent.
            fall = (info.iterations == 0) | ~(slope < 0)
            d = torch.where(fall[:, None], -g / lam_like(objective.lam, g), d)
            slope = torch.where(fall, (g * d).sum(1), slope)
            fallbacks += fall.to(torch.int32)
            start = f0 if start is None else start
            # Armijo, with the rounding error of f itself allowed: near the minimum the
            # decrease of a full Newton step falls below what f can resolve, and a strict
            # test would stall the task short of convergence.
            slack = 8 * torch.finfo(f0.dtype).eps * f0.abs()
            step = torch.zeros_like(f0)
            for i in range(self.ls_steps):
                t = 0.5**i
                ft = objective.value(layout.unflatten(phi + t * d))
                ok = torch.isfinite(ft) & (ft <= f0 + self.c1 * t * slope + slack) & (step == 0) & (slope < 0)
                step = torch.where(ok, torch.full_like(step, t), step)
            phi = phi + step.to(phi.dtype)[:, None] * d
        if start is not None:
            objective.report = {"decreased": objective.value(layout.unflatten(phi)) < start, "fallbacks": fallbacks}
        return layout.unflatten(phi)


HessianFree = NewtonCG
