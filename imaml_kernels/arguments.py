"""Argument checks and options of the implicit op (:mod:`imaml_kernels.implicit`): each
check raises a one-line ``TypeError``/``ValueError`` naming the argument, what was expected
and what came.
"""

import dataclasses
import difflib
from typing import Any, Callable, Optional

import torch
from torch.func import functional_call

from .cg import CG

__all__ = ["Options"]


@dataclasses.dataclass(frozen=True)
class Options:
    """The options :func:`~imaml_kernels.implicit_adapt` and
    :func:`~imaml_kernels.implicit_meta_grad` share (their docstrings say what each does).
    ``solve`` is resolved: ``cg_iters``/``cg_tol`` only feed it."""

    solve: Optional[Callable] = None
    cg_iters: Optional[int] = None
    cg_tol: Optional[float] = None
    first_order: bool = False
    loss: Optional[Callable] = None
    chunk: Optional[int] = None
    workers: Optional[int] = None
    max_memory: Optional[int] = None
    hvp_mode: str = "auto"
    compile: bool = False
    randomness: str = "error"
    backend: Optional[str] = None
    engine: Any = None

    @classmethod
    def make(cls, **options) -> "Options":
        for k in options:
            if k not in _OPTION_NAMES:
                close = difflib.get_close_matches(k, _OPTION_NAMES, n=2)
                raise TypeError(f"unknown option {k!r}" + (f"; did you mean {close}?" if close else f"; the options are {list(_OPTION_NAMES)}"))
        get = options.get
        if get("randomness", "error") not in ("error", "different", "same"):
            raise ValueError(f"randomness must be 'error', 'different' or 'same', got {get('randomness')!r}")
        w = get("workers")
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"workers must be None or a positive int, got {w!r}")
        solve = resolve_solve(get("solve"), get("cg_iters"), get("cg_tol"), get("backend"), get("first_order", False))
        return cls(**{**options, "solve": solve})


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))  # at import: dynamo cannot trace fields()


def host_checks_allowed():
    # Value checks that read tensors back (a sync) are skipped while compiling or capturing.
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_theta(theta):
    if not isinstance(theta, dict) or not theta:
        raise TypeError(f"theta must be a non-empty dict {{name: tensor}} of meta-parameters, got {type(theta).__name__}")
    for k, v in theta.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"theta[{k!r}] must be a tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"theta[{k!r}] must be a floating-point tensor, got {v.dtype}")


def check_support(support, name="support"):
    if not isinstance(support, (tuple, list)) or len(support) != 2 or not all(isinstance(t, torch.Tensor) for t in support):
        raise TypeError(f"{name} must be a pair (x, y) of tensors with a leading task dim T, got {type(support).__name__}")
    x, y = support
    for which, t in (("x", x), ("y", y)):
        if t.dim() < 2:
            raise ValueError(
                f"{name} {which} must be [T, N, ...] (tasks, examples, ...), got shape {list(t.shape)}; "
                f"for one task add the task dim: {which}[None]"
            )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name} x has T={x.shape[0]} tasks but y has T={y.shape[0]}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{name} x has N={x.shape[1]} examples per task but y has N={y.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no tasks (T=0)")
    if x.shape[1] == 0:
        raise ValueError(f"the {name} set is empty (N=0 examples per task): every task needs at least one {name} example")
    return x.shape[0]


def check_model_params(model, theta):
    """θ's names against the model's parameters; returns ψ: the model's parameters that
    require grad and are not in θ (meta-learned, not adapted)."""
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable f(params, x), got {type(model).__name__}")
        return {}
    named = dict(model.named_parameters())
    for k, v in theta.items():
        if k not in named:
            close = difflib.get_close_matches(k, list(named), n=3, cutoff=0.3)
            hint = f"; close matches: {close}" if close else f"; the model has {list(named)[:6]}"
            raise ValueError(f"theta[{k!r}] is not a parameter of the model (names as in model.named_parameters()){hint}")
        if tuple(v.shape) != tuple(named[k].shape):
            raise ValueError(f"theta[{k!r}] has shape {list(v.shape)} but the model's parameter has {list(named[k].shape)}")
    return {k: p for k, p in named.items() if k not in theta and p.requires_grad}


def check_dtypes(model, theta, x):
    if isinstance(model, torch.nn.Module) and x.is_floating_point():
        dtypes = {v.dtype for v in theta.values()}
        if len(dtypes) == 1 and x.dtype not in dtypes:
            (dt,) = dtypes
            raise TypeError(f"support x is {x.dtype} but the parameters are {dt}: cast one to the other (e.g. x.to({dt}))")


def check_labels(model, theta, x, y, loss):
    """Class labels of the default cross-entropy in range (CPU labels only: no sync)."""
    if loss is not None or y.is_floating_point() or y.device.type != "cpu" or not host_checks_allowed():
        return
    if y.dtype == torch.bool or y.numel() == 0:
        raise TypeError(f"support y must hold integer class labels for the default cross-entropy, got {y.dtype}")
    with torch.no_grad():
        params = {k: v.detach() for k, v in theta.items()}
        out = functional_call(model, params, (x[0, :1],)) if isinstance(model, torch.nn.Module) else model(params, x[0, :1])
    classes = out.shape[-1]
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise ValueError(f"support y holds labels in [{lo}, {hi}] but the model has {classes} outputs (labels must be in [0, {classes - 1}])")


def check_inner(inner):
    if isinstance(inner, type):
        raise TypeError(f"inner must be a solver instance such as GD(16, 0.1), got the class {inner.__name__}")
    if not callable(inner):
        raise TypeError(f"inner must be a solver callable(objective, phi0) -> phi, got {type(inner).__name__}")


def resolve_solve(solve, cg_iters, cg_tol, backend, first_order):
    if solve is not None and (cg_iters is not None or cg_tol is not None):
        raise ValueError("give either solve=CG(iters, tol, ...) or the shorthands cg_iters/cg_tol, not both")
    if solve is None:
        solve = CG(iters=5 if cg_iters is None else cg_iters, tol=0.0 if cg_tol is None else cg_tol, backend=backend)
    if isinstance(solve, type):
        raise TypeError(f"solve must be a solver instance such as CG(5), got the class {solve.__name__}")
    if not callable(solve):
        raise TypeError(f"solve must be CG(...) or a callable solve(matvec, b) -> (x, info), got {type(solve).__name__}")
    if isinstance(solve, CG) and solve.iters == 0 and not first_order:
        raise ValueError("cg_iters=0 solves nothing (the meta-gradient would be zero): use first_order=True to skip the solve")
    return solve


def check_phi(phi, theta, T):
    names = list(theta)
    if not isinstance(phi, dict) or set(phi) != set(names):
        got = sorted(phi) if isinstance(phi, dict) else type(phi).__name__
        raise TypeError(f"the inner solver must return a dict with the keys of theta {names}, got {got}")
    for k in names:
        want = (T, *theta[k].shape)
        if not isinstance(phi[k], torch.Tensor) or tuple(phi[k].shape) != want:
            got = list(phi[k].shape) if isinstance(phi[k], torch.Tensor) else type(phi[k]).__name__
            raise ValueError(f"the inner solver returned phi[{k!r}] of shape {got}, expected {list(want)} (T={T} tasks)")
