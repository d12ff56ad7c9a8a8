"""The paper's networks and a small MLP, as ``nn.Module`` s usable with ``torch.func``, each
with the fused batched engine behind it (:mod:`imaml_kernels.engine`).

BatchNorm uses batch statistics (``track_running_stats=False``), as in the iMAML code: each
task normalises with its own batch, in training and at meta-test time.

Batched methods (T tasks, parameters in one flat ``[T, P]`` buffer in ``named_parameters()``
order; ``net.layout`` names the views)::

    >>> net = OmniglotConv(5)
    >>> params = net.flat_params().expand(32, -1).contiguous()      # [32, 113221]
    >>> loss, grad = net.loss_and_grad(params, x, y)                 # [32], [32, 113221]
    >>> hv = net.hvp(params, v, x, y)                                # [32, 113221]
    >>> phi = net.inner_loop(net.flat_params(), x, y, lam=2.0, steps=16, lr=0.1)
"""

from typing import Optional

import torch
from torch import nn

from .engine import BatchedNet, batched_net
from .layout import ParamLayout


class BatchedMethods:
    """``loss``/``loss_and_grad``/``hvp``/``inner_loop`` over a flat ``[T, P]`` buffer through
    the fused engine, for a network with an ``input_shape`` (one example's shape)."""

    input_shape: tuple

    def batched(self, backend: Optional[str] = None) -> BatchedNet:
        """The engine for this network's structure (parameter values are passed per call),
        parsed once and reused (:func:`~imaml_kernels.engine.batched_net`)."""
        return batched_net(self, self.input_shape, backend=backend)

    @property
    def layout(self) -> ParamLayout:
        """Names, shapes and offsets of the parameters in the flat buffer."""
        return ParamLayout.from_params(dict(self.named_parameters()), batched=False)

    def flat_params(self) -> torch.Tensor:
        """The module's current parameters as one ``[P]`` vector (a copy, no grad)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def loss(self, params, x, y, backend=None):
        """Mean cross-entropy per task ``[T]``; ``params [T, P]``, ``x [T, N, *input_shape]``,
        ``y [T, N]``."""
        return self.batched(backend).loss(params, x, y)

    def loss_and_grad(self, params, x, y, backend=None):
        """``(loss [T], grad [T, P])``."""
        return self.batched(backend).loss_and_grad(params, x, y)

    def hvp(self, params, v, x, y, backend=None):
        """``H_t v_t`` ``[T, P]``: the exact Hessian of the task loss (BatchNorm with batch
        statistics included) times ``v [T, P]``."""
        return self.batched(backend).hvp(params, v, x, y)

    def inner_loop(self, theta, x, y, *, lam, steps, lr, phi0=None, backend=None):
        """``steps`` proximal gradient steps for all tasks in one call -> ``φ [T, P]``."""
        return self.batched(backend).inner_loop(theta, x, y, lam=lam, steps=steps, lr=lr, phi0=phi0)


def _conv_block(cin, cout, *, stride, padding, pool):
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=padding), nn.BatchNorm2d(cout, track_running_stats=False), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


class OmniglotConv(BatchedMethods, nn.Sequential):
    """The paper's Omniglot network: 4 conv layers (3×3, 64 filters, stride 2, padding 1; a
    zero pad after the second), BatchNorm with batch statistics, ReLU, linear head.
    113,221 parameters for 5-way on 1×28×28 inputs.

    Input ``[N, 1, 28, 28]`` -> logits ``[N, way]``.
    """

    def __init__(self, way: int, channels: int = 64, in_channels: int = 1, image_size: int = 28):
        c = channels
        layers = _conv_block(in_channels, c, stride=2, padding=1, pool=False)
        layers += _conv_block(c, c, stride=2, padding=1, pool=False)
        layers.append(nn.ZeroPad2d((0, 1, 0, 1)))
        layers += _conv_block(c, c, stride=2, padding=1, pool=False)
        layers += _conv_block(c, c, stride=2, padding=1, pool=False)
        s = image_size
        for i in range(4):
            s = (s + 2 - 3) // 2 + 1
            if i == 1:
                s += 1
        layers += [nn.Flatten(), nn.Linear(c * s * s, way)]
        super().__init__(*layers)
        self.way = way
        self.input_shape = (3, image_size, image_size)
        self.input_shape = (in_channels, image_size, image_size)


class MiniImagenetConv(BatchedMethods, nn.Sequential):
    """The standard MiniImagenet network: 4 × (3×3 conv, 32 filters, BatchNorm, ReLU, 2×2
    max-pool), linear head. Input ``[N, 3, 84, 84]`` -> logits ``[N, way]``."""

    def __init__(self, way: int, channels: int = 32, image_size: int = 84):
        c = channels
        layers = _conv_block(3, c, stride=1, padding=1, pool=True)
        for _ in range(3):
            layers += _conv_block(c, c, stride=1, padding=1, pool=True)
        s = image_size
        for _ in range(4):
            s //= 2
        layers += [nn.Flatten(), nn.Linear(c * s * s, way)]
        super().__init__(*layers)
        self.way = way
        self.input_shape = (3, image_size, image_size)


class MLP(BatchedMethods, nn.Sequential):
    """``in -> hidden (tanh) -> ... -> out``; smooth, so Hessians are well defined everywhere."""

    def __init__(self, sizes, activation=nn.Tanh):
        layers = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), activation()]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        super().__init__(*layers)
        self.input_shape = (sizes[0],)


def released_init(model: nn.Module, gain: float = 1.73, bias_high: float = 0.05) -> nn.Module:
    """The initialisation of the authors' released code (aravindr93/imaml_dev
    ``make_conv_network``): every Conv2d and Linear weight ``xavier_uniform_(gain=1.73)``,
    every such bias ``U(0, 0.05)``; BatchNorm keeps γ = 1, β = 0. In place; returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight, gain=gain)
                if m.bias is not None:
                    nn.init.uniform_(m.bias, 0.0, bias_high)
    return model
