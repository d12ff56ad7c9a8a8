"""The models of ``python -m bench models``: networks of the kinds users bring, built with fixed
seeds, and random tasks of the right shapes (timing does not depend on the data).

- ``resnet12``: ResNet-12 style, 4 residual blocks of 16-32-64-128 channels (each: conv3x3 ->
  BatchNorm (batch statistics) -> LeakyReLU(0.1) twice, conv3x3 -> BatchNorm, plus a 1x1-conv
  + BatchNorm shortcut, then LeakyReLU(0.1) and max-pool 2), global average pool, linear head;
  32x32 RGB, T=4, 5-way 1-shot, 3 query per class, GD(10, 0.05);
- ``mlp``: 784-1800-1800-5 with ReLU (a plain ``nn.Sequential``); T=8, 5-way 5-shot, 5 query
  per class, GD(5, 0.1);
- ``transformer``: Linear(8, 32) token embedding, ``nn.TransformerEncoderLayer`` (d_model 32,
  4 heads, feed-forward 64, batch_first, dropout 0), mean over the 12 tokens, Linear(32, 5);
  T=8, 5-way 1-shot, 1 query per class, GD(10, 0.1);
- ``paper-cnn``: the paper's Omniglot network (:class:`imaml_kernels.nets.OmniglotConv`),
  1x28x28, T=8, 5-way 1-shot, 1 query per class, GD(16, 0.1).

``cases(tiny=True)`` gives the same networks at toy widths and sizes (tests, smoke runs).
"""

import dataclasses
from typing import Callable, Tuple

import torch
from torch import nn

from imaml_kernels.nets import OmniglotConv


class ResBlock(nn.Module):
    """ResNet-12's block: three 3x3 convolutions with BatchNorm (batch statistics), the 1x1
    shortcut, LeakyReLU(0.1), max-pool 2."""

    def __init__(self, cin, cout):
        super().__init__()

        def bn(c):
            return nn.BatchNorm2d(c, track_running_stats=False)

        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), bn(cout), nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), bn(cout), nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), bn(cout),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), bn(cout))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x):
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    def __init__(self, way=5, channels=(16, 32, 64, 128), in_channels=3):
        super().__init__()
        cins = (in_channels, *channels[:-1])
        self.blocks = nn.Sequential(*(ResBlock(a, b) for a, b in zip(cins, channels)))
        self.head = nn.Linear(channels[-1], way)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


class TokenTransformer(nn.Module):
    """Sequences ``[N, tokens, features]`` -> logits: embedding, one encoder layer, mean pool, head."""

    def __init__(self, way=5, features=8, d_model=32, heads=4, ff=64):
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        self.encoder = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d_model, way)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


@dataclasses.dataclass(frozen=True)
class Case:
    """A model and its meta-batch: ``build()`` the network; ``input_shape`` one example's;
    T tasks of ``way``-way ``shot``-shot with ``query`` query examples per class; GD(steps, lr)."""

    title: str
    build: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    T: int
    way: int
    shot: int
    query: int
    steps: int
    lr: float

    def describe(self):
        return (f"{self.title}: T={self.T}, {self.way}-way {self.shot}-shot, {self.query} query per class, "
                f"inputs {'x'.join(map(str, self.input_shape))}, GD({self.steps}, {self.lr})")


def cases(tiny=False):
    """``{name: Case}`` at the benchmark's sizes, or at toy sizes with ``tiny``."""
    if tiny:
        return {
            "resnet12": Case("ResNet-12 (tiny: 4-8-16-32 channels)", lambda: ResNet12(5, (4, 8, 16, 32)), (3, 16, 16), 2, 5, 1, 1, 2, 0.05),
            "mlp": Case("MLP 20-8-8-5 (tiny)", lambda: mlp((20, 8, 8, 5)), (20,), 2, 5, 1, 1, 2, 0.1),
            "transformer": Case("Transformer (tiny: d_model 8, 2 heads)", lambda: TokenTransformer(5, 3, 8, 2, 16), (4, 3), 2, 5, 1, 1, 2, 0.1),
            "paper-cnn": Case("OmniglotConv(5) (tiny: 4 channels)", lambda: OmniglotConv(5, channels=4), (1, 28, 28), 2, 5, 1, 1, 2, 0.1),
        }
    return {
        "resnet12": Case("ResNet-12 (16-32-64-128)", lambda: ResNet12(5), (3, 32, 32), 4, 5, 1, 3, 10, 0.05),
        "mlp": Case("MLP 784-1800-1800-5", lambda: mlp((784, 1800, 1800, 5)), (784,), 8, 5, 5, 5, 5, 0.1),
        "transformer": Case("Transformer (d_model 32, 4 heads, 12 tokens)", lambda: TokenTransformer(), (12, 8), 8, 5, 1, 1, 10, 0.1),
        "paper-cnn": Case("OmniglotConv(5), the paper's CNN", lambda: OmniglotConv(5), (1, 28, 28), 8, 5, 1, 1, 16, 0.1),
    }


def build(case, device="cpu", dtype=torch.float32, seed=0):
    """The case's network (seeded), on ``device`` in ``dtype``, in training mode."""
    torch.manual_seed(seed)
    return case.build().to(device=device, dtype=dtype).train()


def make_tasks(case, device="cpu", dtype=torch.float32, seed=0):
    """``(x_s [T, way·shot, ...], y_s, x_q [T, way·query, ...], y_q)``: uniform random inputs,
    labels 0..way-1 in order."""
    g = torch.Generator().manual_seed(seed)
    T, way = case.T, case.way
    xs = torch.rand(T, way * case.shot, *case.input_shape, generator=g, dtype=torch.float64)
    xq = torch.rand(T, way * case.query, *case.input_shape, generator=g, dtype=torch.float64)
    ys = torch.arange(way).repeat_interleave(case.shot).expand(T, -1).contiguous()
    yq = torch.arange(way).repeat_interleave(case.query).expand(T, -1).contiguous()
    return xs.to(device, dtype), ys.to(device), xq.to(device, dtype), yq.to(device)
