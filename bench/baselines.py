"""Baselines written the way public iMAML/MAML code does it, for side-by-side benchmarks.

- :func:`serial_imaml_meta_grad`: a Python loop over tasks, SGD inner steps with
  ``loss.backward()``, a double-backward HVP graph rebuilt in every CG iteration, and a
  host-synchronised residual check (``.item()``) every CG iteration.
- :func:`maml_meta_grad`: fully unrolled MAML: backprop through every inner step
  (``create_graph``), so memory grows with the number of inner steps.
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


def serial_imaml_meta_grad(model, theta, tasks, *, lam, inner_steps, inner_lr, cg_iters, cg_tol=1e-10):
    """Sum over tasks of (I + H/λ)^-1 ∇φ L_query, one task at a time. ``tasks`` is
    ``(x_s, y_s, x_q, y_q)`` with leading T; returns a dict shaped like ``theta``."""
    x_s, y_s, x_q, y_q = tasks
    names = list(theta)
    meta = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(x_s.shape[0]):
        fast = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
        opt = torch.optim.SGD(fast.values(), lr=inner_lr)
        for _ in range(inner_steps):
            opt.zero_grad()
            loss = F.cross_entropy(functional_call(model, fast, (x_s[t],)), y_s[t])
            prox = sum(((fast[k] - theta[k].detach()) ** 2).sum() for k in names)
            (loss + 0.5 * lam * prox).backward()
            opt.step()
        params = [fast[k] for k in names]
        g = torch.autograd.grad(F.cross_entropy(functional_call(model, fast, (x_q[t],)), y_q[t]), params)

        def matvec(v):
            loss = F.cross_entropy(functional_call(model, fast, (x_s[t],)), y_s[t])
            grads = torch.autograd.grad(loss, params, create_graph=True)  # rebuilt every call
            hv = torch.autograd.grad(grads, params, v)
            return [vi + hvi / lam for vi, hvi in zip(v, hv)]

        dot = lambda a, b: sum((ai * bi).sum() for ai, bi in zip(a, b))  # noqa: E731
        x = [torch.zeros_like(gi) for gi in g]
        r = [gi.clone() for gi in g]
        p = [gi.clone() for gi in g]
        rr = dot(r, r)
        for _ in range(cg_iters):
            Ap = matvec(p)
            alpha = rr / dot(p, Ap)
            x = [xi + alpha * pi for xi, pi in zip(x, p)]
            r = [ri - alpha * ai for ri, ai in zip(r, Ap)]
            rr_new = dot(r, r)
            if rr_new.item() < cg_tol:  # the per-iteration host sync of public code
                break
            p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p)]
            rr = rr_new
        for k, xi in zip(names, x):
            meta[k] += xi
    return meta


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
