"""Model, sampler and solver builders: what a run configuration turns into.

Shared by the trainer (:mod:`imaml_kernels.train`), the evaluation
(:mod:`imaml_kernels.evaluate`) and the benchmarks, so that each builds exactly the same
network, task samplers and inner solver from a configuration of
:func:`imaml_kernels.presets.resolve_config`.

Example::

    >>> cfg = resolve_config("omniglot-5w1s", {})
    >>> model = build_model(cfg)
    >>> train_sampler, test_sampler = build_samplers(cfg, "cpu")
    >>> solver = build_solver(cfg)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .inner import GD, NewtonCG
from .nets import MiniImagenetConv, OmniglotConv

__all__ = ["DataError", "build_model", "build_samplers", "build_solver"]


class DataError(RuntimeError):
    """Data that is missing or cannot be used (the loader's message, verbatim)."""


def build_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The paper's network for ``cfg["dataset"]`` (BatchNorm with batch statistics)."""
    kw = {} if cfg.get("channels") is None else {"channels": int(cfg["channels"])}
    if cfg["dataset"] == "omniglot":
        return OmniglotConv(cfg["way"], **kw)
    return MiniImagenetConv(cfg["way"], **kw)


def build_samplers(cfg: Mapping[str, Any], device, data_root=None):
    """``(train_sampler, test_sampler)`` for the configuration, on ``device``.

    Raises:
        DataError: the data is missing or unusable, or the split cannot supply the tasks
            (the loader's or the sampler's message, which says what to do).
    """
    from .data import miniimagenet_samplers, omniglot_samplers

    args = (cfg["way"], cfg["shot"], cfg["query"])
    try:
        if cfg["dataset"] == "omniglot":
            return omniglot_samplers(*args, root=data_root, device=device, seed=cfg["seed"])
        # uint8 on the device: a quarter of the memory; the sampler scales on gather.
        s = miniimagenet_samplers(
            *args, root=data_root, splits=("train", "test"), dtype=torch.uint8, device=device, seed=cfg["seed"]
        )
        return s["train"], s["test"]
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(str(exc)) from exc


def build_solver(cfg: Mapping[str, Any]):
    """The inner solver: ``GD(inner_steps, inner_lr)`` or ``NewtonCG(hf_steps, hf_cg_iters)``."""
    if cfg["inner"] == "hf":
        return NewtonCG(cfg["hf_steps"], cg_iters=cfg["hf_cg_iters"])
    return GD(cfg["inner_steps"], cfg["inner_lr"])
