"""Baselines written the way public iMAML/MAML code does it, for side-by-side benchmarks.

- :func:`serial_imaml_meta_grad`: the algorithm of the authors' released learner
  (aravindr93/imaml_dev ``Learner``): a Python loop over tasks on one model whose parameters
  are loaded per task, SGD-style inner steps from ``autograd.grad``, the query gradient, and
  CG on the task's double-backward HVP of a flat vector, with the residual read back by the
  host every iteration. It is written to be as fast as that learner or faster (measured
  side by side in ``python -m bench meta-step --official DIR``): the proximal term's gradient
  ``λ(φ − θ)`` is added in closed form, parameter updates are ``torch._foreach`` ops, and the
  first-order graph of the support loss is built once per task and reused by every HVP of
  its CG solve (the learner rebuilds it for each product). With ``cg_tol=None`` and a
  ``loss`` it is also the hand-written per-task loop of ``python -m bench models``, on any
  model: a plain CG of a fixed number of iterations, no read-back.
- :func:`maml_meta_grad`: fully unrolled MAML: backprop through every inner step
  (``create_graph``), so memory grows with the number of inner steps.
"""

import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


def serial_imaml_meta_grad(model, theta, tasks, *, lam, inner_steps, inner_lr, cg_iters, cg_tol=1e-10, loss=F.cross_entropy):
    """Sum over tasks of ``(I + H/λ)^-1 ∇φ L_query``, one task at a time, with ``inner_steps``
    proximal GD steps ``φ ← φ − lr (∇L̂(φ) + λ(φ − θ))`` from θ (the engine's inner loop).

    Any ``nn.Module`` and any ``loss(out, y) -> scalar`` of one task (default cross-entropy):
    ``tasks`` is ``(x_s, y_s, x_q, y_q)`` with leading T; returns a dict shaped like ``theta``.
    ``cg_tol``: CG stops once ``|r|² < cg_tol``, a host read-back every iteration as in the
    public code (also with 0, which runs every iteration); ``None``: a plain CG of
    ``cg_iters`` iterations that never reads back (the hand-written loop of ``bench models``).
    """
    x_s, y_s, x_q, y_q = tasks
    names = list(theta)
    fast = copy.deepcopy(model)  # one working copy, its parameters overwritten per task
    own = dict(fast.named_parameters())
    params = [own[k] for k in names]
    for p in fast.parameters():
        p.requires_grad_(any(p is q for q in params))
    anchor = [theta[k].detach() for k in names]
    meta = [torch.zeros_like(a) for a in anchor]
    for t in range(x_s.shape[0]):
        with torch.no_grad():
            torch._foreach_copy_(params, anchor)
        for _ in range(inner_steps):
            g = torch.autograd.grad(loss(fast(x_s[t]), y_s[t]), params)
            with torch.no_grad():  # φ ← φ − lr (g + λ (φ − θ))
                step = torch._foreach_sub(params, anchor)
                torch._foreach_mul_(step, lam)
                torch._foreach_add_(step, g)
                torch._foreach_add_(params, step, alpha=-inner_lr)
        b = _flat(torch.autograd.grad(loss(fast(x_q[t]), y_q[t]), params))
        # The support loss's gradient graph, built once; each HVP differentiates it again.
        flat_gs = _flat(torch.autograd.grad(loss(fast(x_s[t]), y_s[t]), params, create_graph=True))
        with torch.no_grad():
            x = _cg(_damped_hvp(flat_gs, params, lam), b, cg_iters, cg_tol)
            torch._foreach_add_(meta, [c.view_as(m) for c, m in zip(x.split([m.numel() for m in meta]), meta)])
        del flat_gs  # this task's graph goes before the next one's is built
    return dict(zip(names, meta))


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _damped_hvp(flat_grad, params, lam):
    """``v -> v + H v / λ`` by double backward through ``flat_grad`` (built with ``create_graph``)."""

    def matvec(v):
        return v + _flat(torch.autograd.grad(flat_grad, params, v, retain_graph=True)) / lam

    return matvec


def _cg(matvec, b, iters, tol=None):
    """``iters`` CG iterations on ``matvec(x) = b`` from 0; with ``tol``, a host read-back of
    ``|r|²`` every iteration and a stop below it (as public code does)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r.dot(r)
    for _ in range(iters):
        Ap = matvec(p)
        alpha = rr / p.dot(Ap)
        x.add_(alpha * p)
        r.sub_(alpha * Ap)
        rr_new = r.dot(r)
        if tol is not None and rr_new.item() < tol:  # the per-iteration host sync of public code
            break
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
    return x


def maml_meta_grad(model, theta, tasks, *, inner_steps, inner_lr):
    """Unrolled MAML meta-gradient (sum over tasks), all tasks batched with vmap; the inner
    loop's graph is kept for the backward pass, so memory grows linearly with the steps."""
    x_s, y_s, x_q, y_q = tasks
    T = x_s.shape[0]
    loss = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)  # noqa: E731
    phi = {k: v.unsqueeze(0).expand(T, *v.shape) for k, v in theta.items()}
    for _ in range(inner_steps):
        g = vmap(grad(loss))(phi, x_s, y_s)
        phi = {k: phi[k] - inner_lr * g[k] for k in phi}
    outer = vmap(loss)(phi, x_q, y_q).sum()
    grads = torch.autograd.grad(outer, list(theta.values()))
    return dict(zip(theta, grads))
