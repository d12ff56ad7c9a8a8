"""Pure-PyTorch twin of the BatchNorm(+ReLU) family (:mod:`imaml_kernels.ops.batchnorm`).

Shapes: ``x [T, R, C]`` holds one task's BatchNorm rows (``R = N·H·W``, channels-last) per
task; statistics are per ``(task, channel)``, ``[T, C]``. ``relu_y`` is the stage's output when
a ReLU follows (its mask ``y > 0`` gates the cotangents), else ``None``.

The formulas (batch statistics, biased variance, ``r = 1/sqrt(var + eps)``):

- forward:   ``x̂ = (x − μ) r``, ``y = relu?(γ x̂ + β)``
- tangent:   ``a = mean(x̂ ẋ)``, ``ẋ̂ = r (ẋ − mean(ẋ) − x̂ a)``, ``ẏ = m (γ̇ x̂ + γ ẋ̂ + β̇)``
- backward:  ``g = m ḡ``, ``gγ = Σ g x̂``, ``gβ = Σ g``, ``gx = r (γg − mean(γg) − x̂ mean(γg x̂))``
- tangent of the backward (``ṙ = −r² a``): see :func:`bn_tbwd`.
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
