"""The paper's networks and a small MLP, as ``nn.Module`` s usable with ``torch.func``.

BatchNorm uses batch statistics (``track_running_stats=False``), as in the iMAML code: each
task normalises with its own batch, in training and at meta-test time.
"""

import torch
from torch import nn


def _conv_block(cin, cout, *, stride, padding, pool):
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=padding), nn.BatchNorm2d(cout, track_running_stats=False), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


class OmniglotConv(nn.Sequential):
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


class MiniImagenetConv(nn.Sequential):
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


class MLP(nn.Sequential):
    """``in -> hidden (tanh) -> ... -> out``; smooth, so Hessians are well defined everywhere."""

    def __init__(self, sizes, activation=nn.Tanh):
        layers = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), activation()]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        super().__init__(*layers)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
