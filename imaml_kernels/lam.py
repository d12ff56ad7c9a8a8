"""λ, the proximal strength, in every form the op takes, and the sources of its gradient.

``implicit_adapt(..., lam=...)`` takes

- a Python number: one λ for every task (no gradient, no cost);
- a scalar tensor, a ``[T]`` tensor or a list of T numbers: λ per task;
- a mapping ``{name or prefix: λ}`` (a number or a scalar tensor each): λ per parameter
  group, e.g. per layer. A key matches the parameter of that name, or the parameters under it
  (``"0"`` matches ``"0.weight"`` and ``"0.bias"``); the longest key wins, and ``""`` matches
  every parameter no other key does. Every adapted parameter needs a λ.

Inside the op λ has one form (:func:`resolve`): a float, a ``[T]`` tensor, or a
:class:`PerCoordinate` (a ``[P]`` vector in θ's order), detached; the tensors that require grad
become the sources the backward differentiates (:class:`Lam`).

The gradient (see :mod:`imaml_kernels.implicit`): φ* solves ``∇L̂(φ) + Λ(φ − θ) = 0``, so
``dφ*/dλ_g = −(H + Λ)⁻¹ E_g (φ* − θ)`` and ``dL/dλ_g = −Σ_{i ∈ g} y_i (φ* − θ)_i`` with
``y = (H + Λ)⁻¹ ∇φ L``. With the damped solve ``((1+c) I + H/(λ+d)) x = g`` the backward
replaces ``(H + Λ)⁻¹`` by ``(H + Λ')⁻¹``, ``Λ' = (1+c)(Λ + d)``, in θ's gradient
(``x = (Λ + d) y``), in ψ's cross term and in λ's gradient alike: with c = d = 0 all three
are exact.
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ["Lam", "PerCoordinate", "resolve"]


class PerCoordinate:
    """λ per coordinate, constant over each parameter: ``vector [P]`` in θ's order (detached).

    ``groups``: the group of each parameter (``{name: group index}``), ``count``: the number of
    groups."""

    def __init__(self, vector: torch.Tensor, layout, groups: dict, count: int):
        self.vector, self.layout, self.groups, self.count = vector, layout, groups, count

    def row(self, like: torch.Tensor) -> torch.Tensor:
        """``[1, P]`` of ``like``'s dtype: against a flat ``[T, P]`` in θ's order."""
        return self.vector.to(like.dtype).unsqueeze(0)

    def param(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """``[1, *shape]`` of parameter ``name``: against its ``[T, *shape]`` tensor."""
        lo = self.layout.offsets[name]
        return self.vector[lo:lo + self.layout.numels[name]].to(like.dtype).view(1, *self.layout.shapes[name])

    def group_sums(self, per_coordinate: torch.Tensor) -> torch.Tensor:
        """``[count]``: the sum of a ``[P]`` vector over each group's coordinates."""
        out = per_coordinate.new_zeros(self.count)
        for name, g in self.groups.items():
            lo = self.layout.offsets[name]
            out[g] += per_coordinate[lo:lo + self.layout.numels[name]].sum()
        return out


class Lam(NamedTuple):
    """λ resolved for one call: ``value`` (a float, a ``[T]`` tensor or a :class:`PerCoordinate`)
    and, where λ requires grad, its ``sources``: for ``kind="task"`` the scalar or ``[T]``
    tensor (its gradient: the per-task sensitivity, summed for a scalar); for ``"groups"`` the
    groups' scalar tensors that require grad, ``index`` naming each one's group."""

    value: object
    kind: Optional[str] = None
    sources: Tuple[torch.Tensor, ...] = ()
    index: Tuple[int, ...] = ()

    def grads(self, per_task: Optional[torch.Tensor], per_coordinate: Optional[torch.Tensor]):
        """The sources' gradients from ``dL/dλ`` per task ``[T]`` or per coordinate ``[P]``
        (summed over the tasks)."""
        if self.kind == "task":
            (src,) = self.sources
            g = per_task if src.dim() else per_task.sum()
            return (g.to(src.dtype).reshape(src.shape),)
        sums = self.value.group_sums(per_coordinate)
        return tuple(sums[i].to(s.dtype).reshape(s.shape) for i, s in zip(self.index, self.sources))


def _check_positive(values, host_checks):
    if values.device.type == "cpu" and host_checks and not bool(((values > 0) & torch.isfinite(values)).all()):
        raise ValueError("lam must be finite and > 0 for every task and group")


def _number(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{what} must be a number, a [T] tensor, a list of T numbers or a mapping {{name or prefix: λ}}, "
                        f"got {type(v).__name__}")
    v = float(v)
    if not 0 < v < math.inf:
        raise ValueError(f"{what} must be finite and > 0, got {v}")
    return v


def _group_of(name, keys):
    """The longest key that is ``name``, a prefix of it at a ``.`` boundary, or ``""``."""
    hits = [k for k in keys if k == "" or k == name or name.startswith(k if k.endswith(".") else k + ".")]
    return max(hits, key=len) if hits else None


def _per_group(lam, layout, device, dtype, host_checks):
    keys = list(lam)
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"lam's keys must be parameter names or prefixes (str), got {k!r}")
    groups, used = {}, []
    for name in layout.names:
        key = _group_of(name, keys)
        if key is None:
            raise ValueError(f"lam has no λ for the parameter {name!r} (add its name, a prefix of it, or '' for the rest)")
        if key not in used:
            used.append(key)
        groups[name] = used.index(key)
    values, sources, index = [], [], []
    for i, key in enumerate(used):
        v = lam[key]
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"lam[{key!r}] must be a number or a scalar tensor, got shape {list(v.shape)}")
            if v.requires_grad and torch.is_grad_enabled():
                sources.append(v)
                index.append(i)
            values.append(v.detach().reshape(()).to(device, dtype))
        else:
            values.append(torch.tensor(_number(v, f"lam[{key!r}]"), device=device, dtype=dtype))
    per_group = torch.stack(values)
    _check_positive(per_group, host_checks)
    vector = torch.cat([per_group[groups[n]].expand(layout.numels[n]) for n in layout.names])
    value = PerCoordinate(vector, layout, groups, len(used))
    return Lam(value, "groups" if sources else None, tuple(sources), tuple(index))


def resolve(lam, T: int, device, layout, dtype=torch.float32, host_checks: bool = True) -> Lam:
    """λ in its one form (see the module docstring), on ``device``; ``layout``: θ's
    :class:`~imaml_kernels.ParamLayout` (for a mapping); ``dtype``: a mapping's vector dtype."""
    if isinstance(lam, dict):
        return _per_group(lam, layout, device, dtype, host_checks)
    if isinstance(lam, (list, tuple)):
        try:
            lam = torch.tensor([float(v) for v in lam])
        except (TypeError, ValueError):
            raise TypeError(f"lam must be a number, a [T] tensor or a list of T numbers, got {lam!r}") from None
    if isinstance(lam, torch.Tensor):
        src = lam
        if lam.dim() == 0:
            lam = lam.expand(T)
        if tuple(lam.shape) != (T,):
            raise ValueError(f"lam must be a scalar or a [T] tensor with T={T}, got shape {list(lam.shape)}")
        if not lam.is_floating_point():
            lam = lam.double()
        # Checking values of a device tensor would sync with the host: only CPU tensors are checked.
        _check_positive(lam, host_checks)
        value = lam.detach().to(device, torch.float64 if lam.dtype == torch.float64 else torch.float32)
        needs = src.requires_grad and torch.is_grad_enabled()
        return Lam(value, "task" if needs else None, (src,) if needs else ())
    return Lam(_number(lam, "lam"))
