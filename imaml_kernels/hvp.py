"""Batched Hessian-vector products for any model under ``vmap``: forward-over-reverse, or
reverse-over-reverse for models with an op that has no forward-mode derivative."""

from typing import Callable, Optional

import torch
from torch.func import grad, jvp, vmap

from .layout import ParamLayout

HVP_MODES = ("fwdrev", "revrev")


def _check_same_structure(params, v):
    if isinstance(params, torch.Tensor):
        if not isinstance(v, torch.Tensor) or v.shape != params.shape:
            raise ValueError(f"v must be a tensor of shape {list(params.shape)}, got {getattr(v, 'shape', type(v).__name__)}")
        return
    if not isinstance(v, dict) or set(v) != set(params):
        raise ValueError(f"v must be a dict with the keys of params {sorted(params)}, got {sorted(v) if isinstance(v, dict) else type(v).__name__}")
    for k in params:
        if v[k].shape != params[k].shape:
            raise ValueError(f"v[{k!r}] must have shape {list(params[k].shape)}, got {list(v[k].shape)}")


def batched_hvp(
    loss_fn: Callable,
    params,
    v,
    *batch,
    chunk: Optional[int] = None,
    layout: Optional[ParamLayout] = None,
    mode: str = "fwdrev",
    randomness: str = "error",
):
    """``H_t v_t`` for T tasks at once, ``H_t`` the Hessian of ``loss_fn(params_t, *batch_t)``.

    ``mode="fwdrev"`` (forward-over-reverse, ``jvp`` of ``grad``): one forward and one
    backward pass with tangents, no double-backward graph. ``mode="revrev"``
    (reverse-over-reverse, ``grad`` of ``<grad, v>``): a double backward, for models or losses
    with an op that has no forward-mode derivative (``F.mse_loss``, ``F.huber_loss``, fused
    attention kernels). Both give the same product.

    Args:
        loss_fn: ``loss_fn(params_t, *batch_t) -> scalar`` for one task (``params_t`` a dict of
            per-task tensors, or a flat ``[P]`` tensor / dict through ``layout``).
        params: dict of ``[T, ...]`` tensors, or a flat ``[T, P]`` tensor.
        v: same structure and shapes as ``params``.
        *batch: tensors with leading ``T`` (e.g. ``x [T, N, ...]``, ``y [T, N]``).
        chunk: process at most this many tasks at once (bounds memory); ``None`` = all.
        layout: with a flat ``params``, a :class:`ParamLayout` so that ``loss_fn`` receives
            dicts of per-task views; without it ``loss_fn`` receives the flat ``[P]`` vector.
        mode: ``"fwdrev"`` or ``"revrev"``.
        randomness: how random ops (dropout) draw across the tasks: ``"error"``, ``"different"``
            or ``"same"`` (``torch.func.vmap``'s).

    Returns:
        ``H v`` with the structure of ``v``.

    Example::

        >>> loss = lambda p, x, y: ((x @ p["w"] - y) ** 2).mean()
        >>> Hv = batched_hvp(loss, {"w": w}, {"w": v}, x, y)   # w, v: [T, D]; x: [T, N, D]
    """
    if mode not in HVP_MODES:
        raise ValueError(f"mode must be one of {HVP_MODES}, got {mode!r}")
    _check_same_structure(params, v)
    T = (params if isinstance(params, torch.Tensor) else next(iter(params.values()))).shape[0]
    for i, b in enumerate(batch):
        if isinstance(b, torch.Tensor) and b.shape[0] != T:
            raise ValueError(f"batch[{i}] has leading size {b.shape[0]}, expected T={T} (the tasks of params)")

    if isinstance(params, torch.Tensor) and layout is not None:
        if layout.numel != params.shape[1]:
            raise ValueError(f"layout has P={layout.numel}, params has P={params.shape[1]}")
        inner = lambda p, *b: loss_fn(_unflat1(layout, p), *b)  # noqa: E731
    else:
        inner = loss_fn

    if mode == "fwdrev":

        def one(p, t, *b):
            return jvp(lambda q: grad(inner)(q, *b), (p,), (t,))[1]

    else:

        def one(p, t, *b):
            return grad(lambda q: _dot(grad(inner)(q, *b), t))(p)

    return vmap(one, chunk_size=chunk, randomness=randomness)(params, v, *batch)


def _dot(a, b):
    if isinstance(a, torch.Tensor):
        return (a * b).sum()
    return sum((a[k] * b[k]).sum() for k in a)


def _unflat1(layout, p):
    return {k: p[layout.offsets[k] : layout.offsets[k] + layout.numels[k]].view(layout.shapes[k]) for k in layout.names}
