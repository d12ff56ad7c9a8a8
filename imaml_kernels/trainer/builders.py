"""Model, sampler and solver builders: what a run configuration turns into.

Shared by the training loop (:mod:`imaml_kernels.trainer.loop`), the evaluation
(:mod:`imaml_kernels.trainer.evaluate`) and the benchmarks, so that each builds exactly the same
network, task samplers, inner solver and backward solve from a configuration of
:func:`imaml_kernels.trainer.presets.resolve_config`.

Example::

    >>> cfg = resolve_config("omniglot-5w1s", {})
    >>> model = build_model(cfg)
    >>> train_sampler, test_sampler = build_samplers(cfg, "cpu")
    >>> solver = build_solver(cfg)
    >>> solve = build_backward_solve(cfg)
    >>> optimizer = build_optimizer(cfg, model.parameters())
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..cg import CG
from ..inner import GD, NewtonCG, SGDThenPullBack
from ..nets import MiniImagenetConv, OmniglotConv, released_init

__all__ = ["DataError", "build_backward_solve", "build_model", "build_optimizer", "build_samplers", "build_solver"]


class DataError(RuntimeError):
    """Data that is missing or cannot be used (the loader's message, verbatim)."""


def build_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The paper's network for ``cfg["dataset"]`` (BatchNorm with batch statistics), with
    PyTorch's initialisation or, for ``init="released"``, the authors' released one
    (:func:`~imaml_kernels.nets.released_init`); drawn from the global RNG."""
    kw = {} if cfg.get("channels") is None else {"channels": int(cfg["channels"])}
    model = OmniglotConv(cfg["way"], **kw) if cfg["dataset"] == "omniglot" else MiniImagenetConv(cfg["way"], **kw)
    if cfg.get("init", "torch") == "released":
        released_init(model)
    return model


def build_samplers(cfg: Mapping[str, Any], device, data_root=None):
    """``(train_sampler, test_sampler)`` for the configuration, on ``device``.

    Raises:
        DataError: the data is missing or unusable, or the split cannot supply the tasks
            (the loader's or the sampler's message, which says what to do).
    """
    from ..data import miniimagenet_samplers, omniglot_samplers

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
    """The inner solver: ``GD(inner_steps, inner_lr)``, ``NewtonCG(hf_steps, hf_cg_iters)`` or
    ``SGDThenPullBack(inner_steps, inner_lr)`` (``inner`` = gd, hf, sgd-pullback)."""
    if cfg["inner"] == "hf":
        return NewtonCG(cfg["hf_steps"], cg_iters=cfg["hf_cg_iters"])
    if cfg["inner"] == "sgd-pullback":
        return SGDThenPullBack(int(cfg["inner_steps"]), cfg["inner_lr"])
    return GD(cfg["inner_steps"], cfg["inner_lr"])


def build_backward_solve(cfg: Mapping[str, Any], backend=None) -> CG:
    """The backward's linear solve of a run: ``((1+c) I + H/(λ+d)) x = g`` with
    ``cg_iters`` CG iterations, c = ``cg_damping`` and d = ``lam_damping`` (the authors'
    released code: c = 1, d = 10; c = d = 0: the paper's ``(I + H/λ) x = g``)."""
    return CG(cfg["cg_iters"], damping=cfg["cg_damping"], lam_damping=cfg["lam_damping"], backend=backend)


def build_optimizer(cfg: Mapping[str, Any], params) -> torch.optim.Adam:
    """The outer optimizer of a run: Adam with step size ``outer_lr`` (the schedule sets it per
    step: :func:`~imaml_kernels.trainer.presets.outer_lr_at`) and ε ``adam_eps`` (1e-8, PyTorch's,
    unless the configuration says otherwise; the authors' released Learner: 1e-3)."""
    return torch.optim.Adam(params, lr=cfg["outer_lr"], eps=float(cfg.get("adam_eps", 1e-8)))
