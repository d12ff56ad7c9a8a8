"""A ``DistributedDataParallel`` model as the implicit op's model argument.

DDP averages ordinary gradients across its ranks inside its reducer, which hooks the module's
forward and backward. The op calls the model functionally (no DDP forward) and computes θ's
gradient itself, so it does what DDP would: it calls the wrapped module, and averages the
meta-gradients it produces (θ's, the non-adapted parameters' cross term, λ's) across DDP's
process group in one all-reduce; :func:`~imaml_kernels.query_logits` does the same for the
non-adapted parameters' direct term. θ's names may carry DDP's ``module.`` prefix.

Example (one rank of ``torchrun --nproc_per_node 2``)::

    >>> model = DDP(net)                                   # gloo on CPUs, nccl on GPUs
    >>> theta = dict(model.named_parameters())             # "module.0.weight", ...
    >>> phi = ik.implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=ik.GD(16, 0.1))
    >>> F.cross_entropy(ik.query_logits(model, phi, xq).flatten(0, 1), yq.flatten()).backward()
    >>> opt.step()                                         # θ.grad: the mean over every rank's tasks
"""

from typing import Optional, Tuple

import torch

__all__ = ["unwrap", "all_reduce_mean", "AllReduceMean"]

PREFIX = "module."


def unwrap(model) -> Tuple[object, Optional[object]]:
    """``(module, process group)`` of a DDP model; ``(model, None)`` for anything else."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, model.process_group
    return model, None


def strip(name: str) -> str:
    """A parameter name of the DDP model as the wrapped module names it."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def all_reduce_mean(tensors, group):
    """The tensors averaged across ``group``'s ranks (one all-reduce of one flat buffer;
    ``None`` entries stay ``None``)."""
    import torch.distributed as dist

    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32) for t in present])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    out, off = [], 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[off:off + t.numel()].view(t.shape).to(t.dtype))
        off += t.numel()
    return out


class AllReduceMean(torch.autograd.Function):
    """Identity forward; the backward averages the gradient across ``group`` (what DDP's reducer
    does for a parameter used in the forward)."""

    @staticmethod
    def forward(ctx, group, t):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return None, all_reduce_mean([g.contiguous()], ctx.group)[0]
