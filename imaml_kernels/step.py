"""One iMAML meta-step on T tasks, all on the device and with no host synchronisation:

    inner solve per task (no graph)  ->  query logits  ->  per-task query loss
      ->  mean.backward() (the implicit op's linear solve)  ->  optimizer step

Example::

    >>> stats = meta_step(model, dict(model.named_parameters()), opt, (xs, ys, xq, yq),
    ...                   lam=2.0, inner=GD(16, 0.1), solve=CG(5))
    >>> dict(zip(STATS, stats.tolist()))                 # one read-back, when you want it
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .implicit import implicit_adapt
from .query import query_logits

__all__ = ["STATS", "meta_step"]

# Per-step statistics, in this order, as one device tensor (a single read-back per log).
STATS = ("loss", "acc", "inner_loss", "dropped", "cg_residual")


def meta_step(model, theta, optimizer, batch, *, lam, inner, solve, average_gradients: Optional[Callable] = None) -> torch.Tensor:
    """One meta-step on T tasks; returns the statistics ``[len(STATS)]`` (float32, on the device).

    Args:
        model: the network (θ are its parameters, ``theta = dict(model.named_parameters())``).
        optimizer: the outer optimizer over θ.
        batch: ``(x_s [T, N, ...], y_s [T, N], x_q [T, M, ...], y_q [T, M])``.
        lam, inner, solve: as in :func:`~imaml_kernels.implicit_adapt`.
        average_gradients: ``f(parameters)`` called between the backward and the step with every
            parameter the optimizer steps (a data-parallel run averages their gradients over its
            ranks there).
        lam may require grad (a learned λ, :mod:`imaml_kernels.lam`): the optimizer then steps
        it too, when it holds it.

    θ.grad becomes the mean over tasks of the implicit gradients (``solve`` applied to
    ``∇φ L_t^query(φ_t)``). Nothing here reads a tensor back to the host.
    """
    x_s, y_s, x_q, y_q = batch
    phi = implicit_adapt(model, theta, (x_s, y_s), lam=lam, inner=inner, solve=solve)
    logits = query_logits(model, phi, x_q)  # [T, M, way]
    # Per-task mean cross-entropy, then the mean over tasks: θ.grad = mean of the T
    # implicit gradients (the paper averages the meta-batch).
    loss_t = F.cross_entropy(logits.flatten(0, 1), y_q.flatten(), reduction="none").view(y_q.shape).mean(1)
    optimizer.zero_grad(set_to_none=True)
    loss_t.mean().backward()
    if average_gradients is not None:  # every parameter the optimizer steps (θ, and a learned λ)
        average_gradients([p for group in optimizer.param_groups for p in group["params"]])
    optimizer.step()
    with torch.no_grad():
        acc = (logits.argmax(-1) == y_q).float().mean()
        info = phi.info or {}
        zero = torch.zeros((), device=acc.device)
        if "dropped" in info:
            dropped = info["dropped"].float().sum()
            # The loss of the tasks kept (NaN when every task was dropped: 0/0).
            loss = torch.where(info["dropped"], 0.0, loss_t.detach()).sum() / (loss_t.shape[0] - dropped)
        else:
            dropped, loss = zero, loss_t.mean().detach()
        cg = info.get("cg")
        res = cg.residual.float().mean() if cg is not None else zero
        return torch.stack([loss, acc, phi.inner_loss.float().mean(), dropped, res.to(acc.device)])
