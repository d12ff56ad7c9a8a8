"""Which calls the fused engine runs: :func:`select_engine`."""

from typing import Optional

import torch

from .layers import UnsupportedModel
from .net import BatchedNet, batched_net

__all__ = ["select_engine"]


def select_engine(model, theta, x, loss=None, engine=None, backend=None) -> Optional[BatchedNet]:
    """The fused engine for this call, or ``None`` for the generic ``torch.func`` path.

    ``engine``: ``None`` (automatic: used when ``model`` is a supported network (an
    ``nn.Sequential`` or a traced module, :func:`~imaml_kernels.engine.net.parse`),
    the loss is the default cross-entropy, θ is ``model``'s float32/float64 parameters in
    order and the inputs fit), ``False`` (never), ``True`` (required: raises with the reason
    when it cannot run) or a :class:`~imaml_kernels.engine.BatchedNet`. ``backend`` steers the
    engine's stages (:func:`imaml_kernels.dispatch.kernels`); the net is parsed once per model
    and reused (:func:`~imaml_kernels.engine.batched_net`)."""
    if engine is False:
        return None
    if isinstance(engine, BatchedNet):
        return engine
    if engine not in (None, True):
        raise TypeError(f"engine must be None, True, False or a BatchedNet, got {type(engine).__name__}")
    try:
        if loss is not None:
            raise UnsupportedModel("a custom loss was given (the engine implements cross-entropy)")
        if not isinstance(model, torch.nn.Module):
            raise UnsupportedModel(f"model is a {type(model).__name__}, not an nn.Module")
        dtypes = {v.dtype for v in theta.values()}
        if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
            raise UnsupportedModel(f"theta dtypes {sorted(map(str, dtypes))}: the engine needs one of float32/float64")
        net = batched_net(model, tuple(x.shape[2:]), backend=backend)
        names = list(theta)
        if names != net.layout.names or any(tuple(theta[k].shape) != tuple(net.layout.shapes[k]) for k in names):
            raise UnsupportedModel("theta is not the model's named_parameters() in order")
        return net
    except UnsupportedModel as e:
        if engine is True:
            raise ValueError(f"engine=True but the fused engine cannot run this model: {e}") from None
        return None
