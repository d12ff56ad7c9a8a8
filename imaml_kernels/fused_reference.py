"""Pure-PyTorch twins of the engine's fused elementwise stages (:mod:`imaml_kernels.fused`).

Shapes: ``x [T, R, C]`` holds one task's BatchNorm rows (``R = N·H·W``, channels-last) per
task; statistics are per ``(task, channel)``, ``[T, C]``. ``relu_y`` is the stage's output when
a ReLU follows (its mask ``y > 0`` gates the cotangents), else ``None``.

The formulas (batch statistics, biased variance, ``r = 1/sqrt(var + eps)``):

- forward:   ``x̂ = (x − μ) r``, ``y = relu?(γ x̂ + β)``
- tangent:   ``a = mean(x̂ ẋ)``, ``ẋ̂ = r (ẋ − mean(ẋ) − x̂ a)``, ``ẏ = m (γ̇ x̂ + γ ẋ̂ + β̇)``
- backward:  ``g = m ḡ``, ``gγ = Σ g x̂``, ``gβ = Σ g``, ``gx = r (γg − mean(γg) − x̂ mean(γg x̂))``
- tangent of the backward (``ṙ = −r² a``): see :func:`bn_tbwd`.

References never import kernels.
"""

import torch


def _mask(t, relu_y):
    return t if relu_y is None else t * (relu_y > 0)


def bn_fwd(x, gamma, beta, eps: float, relu: bool):
    """-> ``(y [T,R,C], xhat [T,R,C], rstd [T,C])``."""
    mu = x.mean(1, keepdim=True)
    xc = x - mu
    var = (xc * xc).mean(1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = xc * rstd
    y = xhat * gamma.unsqueeze(1) + beta.unsqueeze(1)
    if relu:
        y = torch.relu(y)
    return y, xhat, rstd.squeeze(1)


def bn_bwd(gy, xhat, rstd, gamma, relu_y):
    """-> ``(gx [T,R,C], ggamma [T,C], gbeta [T,C])``."""
    g = _mask(gy, relu_y)
    ggamma = (g * xhat).sum(1)
    gbeta = g.sum(1)
    gxh = g * gamma.unsqueeze(1)
    gx = rstd.unsqueeze(1) * (gxh - gxh.mean(1, keepdim=True) - xhat * (gxh * xhat).mean(1, keepdim=True))
    return gx, ggamma, gbeta


def bn_tfwd(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y):
    """-> ``(ry [T,R,C], rxhat [T,R,C], a [T,C])`` with ``a = mean(x̂ ẋ)``."""
    a = (xhat * rx).mean(1, keepdim=True)
    rxhat = rstd.unsqueeze(1) * (rx - rx.mean(1, keepdim=True) - xhat * a)
    ry = rgamma.unsqueeze(1) * xhat + gamma.unsqueeze(1) * rxhat + rbeta.unsqueeze(1)
    return _mask(ry, relu_y), rxhat, a.squeeze(1)


def bn_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y):
    """The tangent of :func:`bn_bwd` along ``(ẋ, γ̇)`` (with ``ẋ̂``, ``a`` from :func:`bn_tfwd`)
    and the cotangent's tangent ``rgy``. -> ``(rgx [T,R,C], rggamma [T,C], rgbeta [T,C])``."""
    g, rg = _mask(gy, relu_y), _mask(rgy, relu_y)
    r = rstd.unsqueeze(1)
    gam, rgam = gamma.unsqueeze(1), rgamma.unsqueeze(1)
    gxh = g * gam
    rgxh = rg * gam + g * rgam
    m1 = gxh.mean(1, keepdim=True)
    m2 = (gxh * xhat).mean(1, keepdim=True)
    gx = r * (gxh - m1 - xhat * m2)
    dm2 = (rgxh * xhat).mean(1, keepdim=True) + (gxh * rxhat).mean(1, keepdim=True)
    rgx = -r * a.unsqueeze(1) * gx + r * (rgxh - rgxh.mean(1, keepdim=True) - rxhat * m2 - xhat * dm2)
    rggamma = (rg * xhat + g * rxhat).sum(1)
    rgbeta = rg.sum(1)
    return rgx, rggamma, rgbeta


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


def prox_step(phi, grad, theta, lam, lr: float):
    """In place: ``φ ← φ − lr (g + λ (φ − θ))``; ``phi, grad, theta [T,P]``, ``lam [T,1]``."""
    phi.sub_(lr * (grad + lam * (phi - theta)))
    return phi


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


def im2col(x, Ho, Wo, k, s, ph, pw):
    """Pad, then one strided copy (the twin of :func:`imaml_kernels.fused.im2col`)."""
    T, N, H, W, C = x.shape
    Hp, Wp = max(H + 2 * ph, s * (Ho - 1) + k), max(W + 2 * pw, s * (Wo - 1) + k)
    xp = x.new_zeros(T, N, Hp, Wp, C)
    xp[:, :, ph : ph + H, pw : pw + W] = x
    sT, sN, sH, sW, sC = xp.stride()
    v = xp.as_strided((T, N, Ho, Wo, k, k, C), (sT, sN, s * sH, s * sW, sH, sW, sC))
    return v.contiguous()


def col2im(gcols, H, W, s, ph, pw):
    """Scatter-add form of :func:`imaml_kernels.fused.col2im` (9 strided adds for a 3×3 kernel)."""
    T, N, Ho, Wo, k, _, C = gcols.shape
    Hp, Wp = max(H + 2 * ph, s * (Ho - 1) + k), max(W + 2 * pw, s * (Wo - 1) + k)
    gx = gcols.new_zeros(T, N, Hp, Wp, C)
    for i in range(k):
        for j in range(k):
            gx[:, :, i : i + s * (Ho - 1) + 1 : s, j : j + s * (Wo - 1) + 1 : s, :] += gcols[:, :, :, :, i, j, :]
    return gx[:, :, ph : ph + H, pw : pw + W, :]
