"""The two meta-steps ``bench launches`` counts, built on fake CUDA tensors: the trainer's own
fused ``meta_step`` (:func:`fused_step`) and a per-task loop in the style of public iMAML code
(:func:`per_task_meta_step`, :func:`baseline_step`).

This is the one module of ``bench.launches`` that imports the trainer (presets, builders,
``backward_solve``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preset_config(shape, **overrides):
    """The preset `shape` with the overrides that are not None (`imaml_kernels.trainer.presets`)."""
    from imaml_kernels.trainer.presets import resolve_config

    return resolve_config(shape, {k: v for k, v in overrides.items() if v is not None})


def _fake_cuda_model(cfg):
    """The preset's network, initialised on the CPU (seed 0), as fake CUDA parameters."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from imaml_kernels.trainer.builders import build_model

    with unset_fake_temporarily():  # a real module first: fake CPU parameters would be swapped, not replaced
        torch.manual_seed(0)
        model = build_model(cfg)
    return model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda"))


def _fake_batch(cfg):
    T, way = cfg["meta_batch"], cfg["way"]
    xs = torch.randn(T, way * cfg["shot"], 1, 28, 28, device="cuda")
    xq = torch.randn(T, way * cfg["query"], 1, 28, 28, device="cuda")
    ys = torch.randint(0, way, (T, way * cfg["shot"]), device="cuda")
    yq = torch.randint(0, way, (T, way * cfg["query"]), device="cuda")
    return xs, ys, xq, yq


def _optimizer(model, cfg):
    # foreach=True: the default torch.optim picks for real CUDA parameters (it falls back to
    # the per-parameter loop for fake ones). Not capturable: the step counters stay on the
    # host, as in the trainer.
    return torch.optim.Adam(model.parameters(), lr=cfg["outer_lr"], foreach=True)


def fused_step(cfg):
    """``step()``: one call of the trainer's ``meta_step`` on the preset's shapes."""
    from imaml_kernels.step import meta_step
    from imaml_kernels.trainer.builders import build_backward_solve, build_solver

    model = _fake_cuda_model(cfg)
    theta = dict(model.named_parameters())
    opt, solver, batch = _optimizer(model, cfg), build_solver(cfg), _fake_batch(cfg)
    solve = build_backward_solve(cfg)
    return lambda: meta_step(model, theta, opt, batch, lam=cfg["lam"], inner=solver, solve=solve)


def per_task_meta_step(model, optimizer, batch, cfg, residual_tol=1e-10):
    """One meta-step the way public iMAML code writes it (aravindr93/imaml_dev: ``Learner``,
    ``utils.cg_solve``), on the same damped system as the trainer:

    for each task: copy θ into the fast weights; ``inner_steps`` proximal GD steps, each a
    forward, ``torch.autograd.grad`` and a per-parameter update; the query gradient, flattened;
    CG from x = 0 on ``A v = (1+c) v + H v / (λ+d)``, every product a fresh double backward
    through the support loss on a flat vector, with the residual test ``r·r < tol`` read back
    every iteration; ``meta_grad += x / T``. Then the flat meta-gradient is copied into
    ``p.grad`` and the outer optimizer steps.
    """
    from torch.func import functional_call

    xs, ys, xq, yq = batch
    names, params = zip(*model.named_parameters())
    lam, lr, c, d = cfg["lam"], cfg["inner_lr"], cfg["cg_damping"], cfg["lam_damping"]
    w0 = torch.cat([p.detach().view(-1) for p in params])  # get_params()
    sizes = [p.numel() for p in params]
    T = xs.shape[0]
    meta_grad = torch.zeros_like(w0)

    def loss_at(fast, x, y):
        return F.cross_entropy(functional_call(model, dict(zip(names, fast)), (x,)), y)

    def flat(gs):
        return torch.cat([g.contiguous().view(-1) for g in gs])

    for t in range(T):
        fast = [p.detach().clone().requires_grad_() for p in params]  # set_params(w_k.clone())
        for _ in range(cfg["inner_steps"]):
            reg, off = 0.0, 0
            for p, n in zip(fast, sizes):  # regularization_loss(w_0, lam)
                reg = reg + 0.5 * lam * torch.sum((p.view(-1) - w0[off:off + n]) ** 2)
                off += n
            grads = torch.autograd.grad(loss_at(fast, xs[t], ys[t]) + reg, fast)
            with torch.no_grad():
                for p, g in zip(fast, grads):
                    p.add_(g, alpha=-lr)
        b = flat(torch.autograd.grad(loss_at(fast, xq[t], yq[t]), fast))

        def matvec(v, fast=fast, t=t):  # Learner.matrix_evaluator / hessian_vector_product
            g1 = flat(torch.autograd.grad(loss_at(fast, xs[t], ys[t]), fast, create_graph=True))
            hv = flat(torch.autograd.grad(torch.sum(g1 * v), fast))
            return (1.0 + c) * v + hv / (lam + d)

        x = torch.zeros_like(b)  # utils.cg_solve(f_Ax, b, cg_iters, x_init=None)
        r = b - matvec(x)
        p = r.clone()
        for _ in range(cfg["cg_iters"]):
            rdotr = r.dot(r)
            Ap = matvec(p)
            alpha = rdotr / p.dot(Ap)
            x = x + alpha * p
            r = r - alpha * Ap
            newrdotr = r.dot(r)
            p = r + (newrdotr / rdotr) * p
            if newrdotr.item() < residual_tol:  # imaml_dev: `if newrdotr < residual_tol`; a host sync
                break
        meta_grad += x.detach() / T
    off = 0
    for p, n in zip(params, sizes):  # outer_step_with_grad(meta_grad, flat_grad=True)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(meta_grad[off:off + n].view_as(p))
        off += n
    optimizer.step()


def baseline_step(cfg):
    """``step()``: one :func:`per_task_meta_step` on the preset's shapes."""
    model = _fake_cuda_model(cfg)
    opt, batch = _optimizer(model, cfg), _fake_batch(cfg)
    return lambda: per_task_meta_step(model, opt, batch, cfg)


STEPS = {"fused": fused_step, "baseline": baseline_step}
