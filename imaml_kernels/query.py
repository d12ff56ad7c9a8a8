"""The query forward: the adapted network run on every task's query set at once.

Example::

    >>> phi = implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=GD(16, 0.1))
    >>> logits = query_logits(model, phi, xq)            # [T, M, classes]
    >>> F.cross_entropy(logits.flatten(0, 1), yq.flatten()).backward()
"""

from typing import Mapping

import torch
from torch.func import functional_call, vmap

from .engine import functional_logits, select_engine

__all__ = ["query_logits"]


def query_logits(model: torch.nn.Module, phi: Mapping[str, torch.Tensor], x_q: torch.Tensor, engine=None) -> torch.Tensor:
    """Logits ``[T, M, classes]`` of the adapted ``phi`` (dict of ``[T, ...]``) on ``x_q [T, M, ...]``,
    differentiable in ``phi``: through the fused engine when it supports the model
    (``engine`` as in :func:`~imaml_kernels.implicit_adapt`), else ``vmap`` of ``functional_call``."""
    net = select_engine(model, {k: v[0] for k, v in phi.items()}, x_q, engine=engine)
    if net is not None:
        return functional_logits(net, dict(phi), x_q)
    return vmap(lambda p, x: functional_call(model, p, (x,)))(dict(phi), x_q)
