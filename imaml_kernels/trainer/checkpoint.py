"""Atomic checkpoints for the trainer.

A checkpoint is one ``torch.save`` dict::

    {"version": 1, "step": int, "config": dict, "model": state_dict, "optimizer": state_dict,
     "sampler": TaskSampler.state_dict(), "torch_rng": ByteTensor, "cuda_rng": ByteTensor | None}

It is written with :func:`imaml_kernels._atomic.atomic_write` (a temporary file in the target
folder, flushed to disk, then moved over the target with ``os.replace``): a crash mid-write
leaves the previous checkpoint intact, never a truncated one.

:func:`load_checkpoint` checks the structure (and, by default, that the model state is finite:
a diverged run's checkpoint is refused); :func:`checkpoint_config` checks its configuration and
:func:`check_model_state` loads its model state into a network; each failure is one
:class:`CheckpointError` line naming the file.

Example::

    >>> save_checkpoint("runs/x/ckpt.pt", state)
    >>> state = load_checkpoint("runs/x/ckpt.pt")
    >>> cfg = checkpoint_config(state, "runs/x/ckpt.pt")
    >>> check_model_state(build_model(cfg), state["model"], "runs/x/ckpt.pt")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .._atomic import atomic_write

CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "ckpt.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not one of ours."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format version) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_write(path) as f:
        torch.save({"version": CHECKPOINT_VERSION, **state}, f)
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder holding ``ckpt.pt``."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, check_finite: bool = True
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: a checkpoint file, or a run folder holding ``ckpt.pt``.
        map_location: where its tensors go (``torch.load``'s argument).
        check_finite: refuse a checkpoint whose model state holds a NaN or an infinity (a run
            that diverged); False reads it anyway (to inspect it).

    Raises:
        CheckpointError: missing file, unreadable file, a dict without our keys or of another
            version, a ``config`` that is not a dict, a ``model`` that is not a dict of
            tensors, or (``check_finite``) non-finite model values. One line, naming ``path``.
    """
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        # weights_only: the checkpoint holds tensors and plain values only, so nothing in
        # a downloaded file can run code on load.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in ("version", "step", "config", "model") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not an imaml-train checkpoint (missing {', '.join(missing)})")
    if state["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state['version']!r}, expected {CHECKPOINT_VERSION}")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: its step is {_short(step)}, not a non-negative integer")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: its config is {_kind(state['config'])}, not a dict")
    model = state["model"]
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: its model state is {_kind(model)}, not a dict of tensors")
    for name, value in model.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: its model state is not a dict of tensors ({_short(name)}: {_kind(value)})"
            )
    if check_finite:
        bad = first_nonfinite(model)
        if bad is not None:
            raise CheckpointError(
                f"{path}: holds non-finite parameters ({bad}): the run diverged; "
                f"resume or evaluate an earlier checkpoint"
            )
    return state


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first name whose floating (or complex) tensor holds a NaN or an infinity, else None."""
    for name, t in tensors.items():
        floating = isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
        if floating and not bool(torch.isfinite(t).all()):
            return name
    return None


def checkpoint_config(state: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's configuration, complete and valid, as a new dict.

    Every key of :data:`imaml_kernels.trainer.presets.DEFAULTS` must be present (the model, the
    samplers and the solvers are built from them) and pass
    :func:`~imaml_kernels.trainer.presets.check_config`.

    Raises:
        CheckpointError: ``<path>: its config lacks 'way'`` (every missing key is named), or
            ``<path>: its config is invalid (...)``.
    """
    from .presets import ADDED_KEYS, DEFAULTS, check_config

    cfg = state.get("config") if isinstance(state, Mapping) else None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: its config is {_kind(cfg)}, not a dict")
    cfg = {**ADDED_KEYS, **cfg}  # an older checkpoint ran with these values
    missing = [k for k in DEFAULTS if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: its config lacks {', '.join(repr(k) for k in missing)}")
    for k, default in DEFAULTS.items():
        v = cfg[k]
        is_int = isinstance(v, int) and not isinstance(v, bool)
        if default is None:  # query, channels: None or an int
            ok, kind = v is None or is_int, "None or an int"
        elif isinstance(default, float):
            ok, kind = is_int or isinstance(v, float), "a number"
        elif isinstance(default, int):
            ok, kind = is_int, "an int"
        else:
            ok, kind = isinstance(v, type(default)), f"a {type(default).__name__}"
        if not ok:
            raise CheckpointError(f"{path}: its config is invalid ({k} is {_short(v)}, expected {kind})")
    cfg = dict(cfg)
    if cfg["query"] is None:
        cfg["query"] = cfg["shot"]
    try:
        check_config(cfg)
    except (ValueError, TypeError) as exc:  # ConfigError: a value out of range
        raise CheckpointError(f"{path}: its config is invalid ({exc})") from exc
    return cfg


def check_model_state(model: torch.nn.Module, model_state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load a checkpoint's ``model`` state into ``model`` (strict), or raise one line.

    Missing or unexpected keys and shape mismatches (the multi-line ``RuntimeError`` of
    ``load_state_dict``) become one :class:`CheckpointError`::

        <path>: its model does not match its config (missing: [...], unexpected: [...], size mismatch: [...])

    Example::

        >>> state = load_checkpoint(path)
        >>> model = build_model(checkpoint_config(state, path))
        >>> check_model_state(model, state["model"], path)   # then model.to(device)
    """
    if not isinstance(model_state, Mapping):
        raise CheckpointError(f"{path}: its model state is {_kind(model_state)}, not a dict of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in model_state]
    unexpected = [k for k in model_state if k not in own]
    shapes = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
        for k, v in model_state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    parts = [f"{label}: {_names(items, limit)}" for label, items, limit in
             (("missing", missing, 6), ("unexpected", unexpected, 6), ("size mismatch", shapes, 3)) if items]
    if parts:
        raise CheckpointError(f"{path}: its model does not match its config ({', '.join(parts)})")
    try:
        model.load_state_dict(model_state)
    except (RuntimeError, TypeError, ValueError) as exc:
        detail = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        raise CheckpointError(f"{path}: its model does not match its config ({detail})") from exc


def _names(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}, ... {len(items) - limit} more]" if len(items) > limit else f"[{shown}]"


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
