"""The query forward: the adapted network run on every task's query set at once.

Example::

    >>> phi = implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=GD(16, 0.1))
    >>> logits = query_logits(model, phi, xq)            # [T, M, classes]
    >>> F.cross_entropy(logits.flatten(0, 1), yq.flatten()).backward()
"""

from typing import Mapping

import torch
from torch.func import functional_call, vmap

from . import parallel
from .engine import functional_logits, select_engine
from .objective import batch_stats_only, differentiable_attention, randomness_checked

__all__ = ["query_logits"]


def query_logits(model: torch.nn.Module, phi: Mapping[str, torch.Tensor], x_q: torch.Tensor, engine=None,
                 randomness: str = "error") -> torch.Tensor:
    """Logits ``[T, M, classes]`` of the adapted ``phi`` (dict of ``[T, ...]``) on ``x_q [T, M, ...]``,
    differentiable in ``phi``: through the fused engine when it supports the model
    (``engine`` as in :func:`~imaml_kernels.implicit_adapt`), else ``vmap`` of ``functional_call``
    (parameters missing from ``phi`` are the model's own).

    The policy, as in :func:`~imaml_kernels.implicit_adapt`: BatchNorm uses each task's batch
    statistics in training mode and leaves its running buffers untouched (in eval mode it uses
    them, frozen); attention runs differentiably (math backend, no inference fast path: an
    eval-mode ``TransformerEncoderLayer`` works); ``randomness`` says how dropout draws across
    the tasks: ``"error"`` (torch's vmap default: a model that draws raises), ``"different"``
    (each task its own masks) or ``"same"``. A ``DistributedDataParallel`` model: see
    :mod:`imaml_kernels.parallel`.
    """
    if not isinstance(x_q, torch.Tensor) or x_q.dim() < 2 or x_q.shape[1] == 0:
        raise ValueError(f"the query set x_q must be [T, M, ...] with M >= 1 examples per task, got "
                         f"{list(x_q.shape) if isinstance(x_q, torch.Tensor) else type(x_q).__name__}")
    model, group = parallel.unwrap(model)
    phi = {parallel.strip(k): v for k, v in phi.items()} if group is not None else dict(phi)
    net = select_engine(model, {k: v[0] for k, v in phi.items()}, x_q, engine=engine)
    if net is not None:
        return functional_logits(net, phi, x_q)
    # A DDP model: its parameters used as they are (not adapted) get their gradient averaged
    # across the ranks, as DDP's reducer would (θ's comes averaged from the implicit op).
    own = {}
    if group is not None and isinstance(model, torch.nn.Module):
        own = {k: parallel.AllReduceMean.apply(group, p) for k, p in model.named_parameters() if k not in phi and p.requires_grad}
    with batch_stats_only(model), differentiable_attention():
        return randomness_checked(
            lambda: vmap(lambda p, x: functional_call(model, {**p, **own}, (x,)), randomness=randomness)(phi, x_q))
