"""Pure-PyTorch twin of the 2×2 max-pool family (:mod:`imaml_kernels.ops.maxpool`), channels-last.
"""

import torch


def _windows(x):
    # [T, N, H, W, C] -> [T, N, H//2, W//2, C, 4] in (di, dj) row-major window order.
    T, N, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    v = x[:, :, : 2 * Ho, : 2 * Wo].reshape(T, N, Ho, 2, Wo, 2, C)
    return v.permute(0, 1, 2, 4, 6, 3, 5).reshape(T, N, Ho, Wo, C, 4)


def maxpool_fwd(x):
    """2×2 max-pool, stride 2, floor mode, channels-last: ``x [T,N,H,W,C]`` ->
    ``(y, idx)`` ``[T,N,H//2,W//2,C]`` with ``idx`` uint8 ``2·di + dj`` of the first maximum."""
    w = _windows(x)
    idx = w.argmax(-1, keepdim=True)
    return w.gather(-1, idx).squeeze(-1), idx.squeeze(-1).to(torch.uint8)


def maxpool_gather(x, idx):
    """The tangent: ``x`` at the forward's argmax."""
    return _windows(x).gather(-1, idx.long().unsqueeze(-1)).squeeze(-1)


def maxpool_scatter(gy, idx, H: int, W: int):
    """The adjoint: ``gx [T,N,H,W,C]`` holding ``gy`` at the argmax, 0 elsewhere."""
    T, N, Ho, Wo, C = gy.shape
    z = gy.new_zeros(T, N, Ho, Wo, C, 4)
    z.scatter_(-1, idx.long().unsqueeze(-1), gy.unsqueeze(-1))
    out = gy.new_zeros(T, N, H, W, C)
    out[:, :, : 2 * Ho, : 2 * Wo] = z.view(T, N, Ho, Wo, C, 2, 2).permute(0, 1, 2, 5, 3, 6, 4).reshape(T, N, 2 * Ho, 2 * Wo, C)
    return out
