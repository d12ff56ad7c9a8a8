"""Pure-PyTorch twin of the softmax cross-entropy family (:mod:`imaml_kernels.ops.softmax_ce`).
"""

import torch


def softmax_ce(logits, y):
    """Mean cross-entropy per task and the softmax: ``logits [T,N,K]``, ``y [T,N]`` ->
    ``(loss [T], prob [T,N,K])``."""
    logp = torch.log_softmax(logits, -1)
    loss = -logp.gather(-1, y.long().unsqueeze(-1)).squeeze(-1).mean(1)
    return loss, logp.exp()


def softmax_ce_grad(prob, y):
    """``∂loss_t/∂logits = (p − onehot(y)) / N``: ``[T,N,K]``."""
    g = prob.clone()
    g.scatter_add_(-1, y.long().unsqueeze(-1), -torch.ones_like(g[..., :1]))
    return g / prob.shape[1]


def softmax_ce_tangent(prob, rlogits):
    """The tangent of :func:`softmax_ce_grad` along ``rlogits``: ``p ⊙ (ṡ − ⟨p, ṡ⟩) / N``."""
    return prob * (rlogits - (prob * rlogits).sum(-1, keepdim=True)) / prob.shape[1]
