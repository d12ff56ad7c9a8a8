"""Models that are not a plain ``nn.Sequential`` (a ResNet's blocks, a ``forward`` with
functional calls) read through their ``torch.fx`` trace as the engine's item list: chains of
``(name, module)`` items, forks summed back together as :class:`~.layers.Branches`, for
:func:`~.net.parse`.

What the trace may hold, each node fed by the one before it:

- a call of a submodule the engine implements (``Conv2d``, ``BatchNorm2d``, ``ReLU``,
  ``LeakyReLU``, ``Tanh``, ``MaxPool2d(2)``, ``ZeroPad2d``, ``Flatten``, ``Linear``,
  ``AdaptiveAvgPool2d(1)``), each called once;
- ``relu``, ``leaky_relu``, ``tanh``, ``flatten(x, 1)``, ``max_pool2d(x, 2)``,
  ``adaptive_avg_pool2d(x, 1)`` and ``x.mean((2, 3))`` (a global average pool), as functions or
  methods;
- a residual block: one value used by two chains (one may be empty: the identity shortcut)
  that end in one ``+``; the chains themselves hold no further fork.

Anything else (a parameter used outside its module, a shape read, a second input, control
flow the tracer cannot follow) raises :class:`~.layers.UnsupportedModel` with the node's name,
and the generic ``torch.func`` path runs the model.
"""

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import Branches, GlobalMean, UnsupportedModel

__all__ = ["traced_items"]

_ADDS = {operator.add, operator.iadd, torch.add}
_RELU = {F.relu, torch.relu, "relu", "relu_"}
_TANH = {torch.tanh, F.tanh, "tanh"}


def traced_items(model: nn.Module):
    """``model``'s forward as the engine's items (see the module docstring)."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # anything the tracer cannot follow
        raise UnsupportedModel(f"{type(model).__name__} is not an nn.Sequential and torch.fx cannot trace it "
                               f"({type(e).__name__}: {e})") from None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModel(f"{type(model).__name__}.forward takes {len(inputs)} inputs; the engine feeds one")
    attrs = [n.target for n in nodes if n.op == "get_attr"]
    if attrs:
        raise UnsupportedModel(f"the forward reads {attrs[0]} outside its module's call")
    walker = _Walker(dict(model.named_modules()))
    items, last = walker.chain(inputs[0], stop=None)
    users = list(last.users)
    if len(users) != 1 or users[0].op != "output" or users[0].args[0] is not last:
        raise UnsupportedModel("the forward must return the last layer's output alone")
    return items


def _is_add(node):
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _arg(node, i, name, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class _Walker:
    def __init__(self, modules):
        self.modules = modules
        self.called = set()

    def chain(self, cur, stop):
        """The items from ``cur``'s value on, up to the node ``stop`` (a residual sum, not
        included) or, with ``stop=None``, to the forward's end; and the chain's last node."""
        items = []
        while True:
            users = list(cur.users)
            if len(users) == 1:
                nxt = users[0]
                if nxt is stop or nxt.op == "output":
                    return items, cur
                if _is_add(nxt):
                    raise UnsupportedModel(f"{nxt.name}: a sum that does not close a residual block")
                items.append(self.item(nxt, cur))
                cur = nxt
            elif len(users) == 2 and stop is None:
                join = {self._join(u) for u in users}
                if len(join) != 1 or None in join:
                    raise UnsupportedModel(f"the two uses of {cur.name} ({users[0].name}, {users[1].name}) do not "
                                           f"meet in one sum")
                join = join.pop()
                sides = []
                for u in users:
                    if u is join:
                        sides.append([])  # the identity shortcut
                    else:
                        side, end = self.chain_from(u, cur, join)
                        sides.append(side)
                items.append((join.name, Branches(*sides)))
                cur = join
            else:
                raise UnsupportedModel(f"{cur.name} is used {len(users)} times (the engine follows chains and residual "
                                       f"blocks of two chains)")

    def chain_from(self, first, cur, join):
        item = self.item(first, cur)
        rest, end = self.chain(first, join)
        return [item, *rest], end

    @staticmethod
    def _join(node):
        """The sum a use leads to along single uses, or ``None``."""
        while not _is_add(node):
            users = list(node.users)
            if len(users) != 1:
                return None
            node = users[0]
        return node

    def item(self, node, cur):
        """The ``(name, module)`` item of ``node``, whose tensor input must be ``cur`` alone."""
        if not node.args or node.args[0] is not cur or any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
            raise UnsupportedModel(f"{node.name}: the engine's layers take the previous layer's output alone")
        if node.op == "call_module":
            if node.target in self.called:
                raise UnsupportedModel(f"{node.target} is called twice (shared weights)")
            self.called.add(node.target)
            if len(node.args) != 1 or node.kwargs:
                raise UnsupportedModel(f"{node.target} is called with extra arguments")
            return node.target, self.modules[node.target]
        target = node.target
        if node.op not in ("call_function", "call_method"):
            raise UnsupportedModel(f"{node.name}: {node.op} {target}")
        if target in _RELU:
            return node.name, nn.ReLU()
        if target in (F.leaky_relu, "leaky_relu"):
            return node.name, nn.LeakyReLU(_arg(node, 1, "negative_slope", 0.01))
        if target in _TANH:
            return node.name, nn.Tanh()
        if target in (torch.flatten, "flatten"):
            return node.name, nn.Flatten(_arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if target in (F.max_pool2d, torch.max_pool2d):
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            a = [_arg(node, i + 1, n, d) for i, (n, d) in enumerate(zip(names, (None, None, 0, 1, False, False)))]
            if a[5] or set(node.kwargs) - set(names):
                raise UnsupportedModel(f"{node.name}: only max_pool2d(x, 2)")
            return node.name, nn.MaxPool2d(*a[:4], ceil_mode=a[4])  # parse() checks it is MaxPool2d(2)
        if target is F.adaptive_avg_pool2d:
            return node.name, nn.AdaptiveAvgPool2d(_arg(node, 1, "output_size", None))
        if target in (torch.mean, "mean"):
            dims = _arg(node, 1, "dim", None)
            keep = _arg(node, 2, "keepdim", False)
            if isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3] and not (set(node.kwargs) - {"dim", "keepdim"}):
                return node.name, (nn.AdaptiveAvgPool2d(1) if keep else GlobalMean())
        name = getattr(target, "__name__", target)
        raise UnsupportedModel(f"{node.name}: {name} is not implemented by the engine")
