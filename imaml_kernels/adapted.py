"""The adapted parameters φ that :func:`~imaml_kernels.implicit_adapt` returns: a dict of
``[T, ...]`` tensors, a pytree, carrying the inner loss and (after the backward) the solve's
diagnostics.

Example::

    >>> phi = implicit_adapt(model, theta, (xs, ys), lam=2.0, inner=GD(16, 0.1))
    >>> phi.inner_loss                  # [T]
    >>> loss.backward(); phi.info["cg"].residual, phi.info["dropped"]
"""

from typing import Optional

import torch
import torch.utils._pytree as pytree

__all__ = ["AdaptedParams", "Diagnostics"]


class Diagnostics:
    """What the op learns about each task: the inner loss, and the backward's solve info."""

    __slots__ = ("inner_loss", "info", "plan", "inner")

    def __init__(self, inner_loss=None, info=None, plan=None, inner=None):
        self.inner_loss, self.info, self.plan, self.inner = inner_loss, info, plan, inner


class AdaptedParams(dict):
    """The adapted ``φ``: a dict ``{name: [T, ...]}`` and a pytree (it goes straight into
    ``torch.func.vmap``, ``functional_call`` and ``torch.utils._pytree.tree_map``; what those
    rebuild shares these diagnostics):

    - ``inner_loss``: ``[T]`` task loss at φ (NaN/inf marks a task whose inner loop failed);
    - ``info``: filled by the backward pass (``None`` before it, without a meta-gradient, and
      under ``torch.compile``): ``{"cg": info of the solve, "dropped": [T] bool}``, where
      ``dropped`` marks tasks whose contribution was zeroed (non-finite outer gradient,
      solution or inner loss). A task whose CG broke down (``info["cg"].breakdown``) keeps
      CG's last good iterate; ``info["cg"].diverged`` flags a residual that grew;
    - ``plan``: how the call ran (:mod:`imaml_kernels.plan`);
    - ``inner_info``: what the inner solver reported, e.g. tasks whose objective did not decrease.
    """

    def __init__(self, *args, _diag=None, **kw):
        super().__init__(*args, **kw)
        object.__setattr__(self, "_diag", _diag if _diag is not None else Diagnostics())

    @property
    def inner_loss(self) -> torch.Tensor:
        return self._diag.inner_loss

    @property
    def info(self) -> Optional[dict]:
        return self._diag.info

    @property
    def inner_info(self) -> Optional[dict]:
        """What the inner solver reported (``None`` if nothing): :class:`~imaml_kernels.NewtonCG`
        gives ``decreased`` ``[T]`` bool (the proximal objective went down) and ``fallbacks``
        ``[T]`` (its steps that fell back to steepest descent)."""
        return self._diag.inner

    @property
    def plan(self):
        """The :class:`~imaml_kernels.plan.Plan` the call ran (``print(phi.plan)`` says how)."""
        return self._diag.plan

    def __reduce__(self):
        return (dict, (dict(self),))


def _flatten_adapted(d):
    return list(d.values()), (list(d.keys()), d._diag)


def _unflatten_adapted(values, context):
    keys, diag = context
    return AdaptedParams(zip(keys, values), _diag=diag)


pytree.register_pytree_node(
    AdaptedParams, _flatten_adapted, _unflatten_adapted,
    serialized_type_name="imaml_kernels.AdaptedParams",
    flatten_with_keys_fn=lambda d: ([(pytree.MappingKey(k), v) for k, v in d.items()], (list(d.keys()), d._diag)),
)
