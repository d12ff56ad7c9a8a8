"""Atomic checkpoints for the trainer.

A checkpoint is one ``torch.save`` dict::

    {"version": 1, "step": int, "config": dict, "model": state_dict, "optimizer": state_dict,
     "sampler": TaskSampler.state_dict(), "torch_rng": ByteTensor, "cuda_rng": ByteTensor | None}

It is written with :func:`imaml_kernels._atomic.atomic_write` (a temporary file in the target
folder, flushed to disk, then moved over the target with ``os.replace``): a crash mid-write
leaves the previous checkpoint intact, never a truncated one.

History (:func:`save_checkpoint` with ``keep``): ``ckpt.pt`` is the latest, ``ckpt.1.pt`` the
one before, ... ``ckpt.<keep-1>.pt``. A new checkpoint is written in full (fsynced) under a
temporary name first; then each older one moves down a place (``os.replace``), the latest is
hard-linked to ``ckpt.1.pt`` and the new one renamed to ``ckpt.pt``: at every instant each
name holds a whole checkpoint and ``ckpt.pt`` is present (without hard links, as on some
network file systems, the latest is renamed instead, and a crash in that instant leaves
``ckpt.1.pt`` the latest).

:func:`find_checkpoint` reads a run folder's latest good checkpoint: the first of ``ckpt.pt``,
``ckpt.1.pt``, ... that loads (``weights_only``), is finite and has a valid configuration;
the ones it skips are named, with why, in :func:`fallback_warning`.

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

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .._atomic import atomic_write

CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "ckpt.pt"
DAMAGED_SUFFIX = ".damaged"  # a checkpoint that could not be read, set aside by --resume


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not one of ours."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], *, keep: int | None = None) -> Path:
    """Write ``state`` (plus the format version) to ``path`` atomically; returns the path.

    ``keep`` (None: ``path`` alone is written): the number of checkpoints kept, this one
    included; the ones it replaces move down the history (``ckpt.pt`` -> ``ckpt.1.pt`` -> ...,
    see the module's docstring) and those past ``keep`` are removed.
    """
    path = Path(path)
    staged = path if keep is None or keep <= 1 else path.with_name(f".{path.name}.next.tmp")
    with atomic_write(staged) as f:
        torch.save({"version": CHECKPOINT_VERSION, **state}, f)
    if staged != path:
        try:
            _shift_history(path, keep)
            os.replace(staged, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise
    if keep is not None:
        for old in checkpoint_history(path)[keep:]:
            old.unlink(missing_ok=True)
    return path


def history_path(path: str | os.PathLike, i: int) -> Path:
    """The ``i``-th checkpoint before the latest ``path``: ``ckpt.pt`` -> ``ckpt.<i>.pt`` (0: ``path``)."""
    path = Path(path)
    return path if i == 0 else path.with_name(f"{path.stem}.{i}{path.suffix}")


def checkpoint_history(path: str | os.PathLike) -> list[Path]:
    """The checkpoints present of the history whose latest is ``path``, latest first."""
    path = Path(path)
    pattern = re.compile(rf"{re.escape(path.stem)}\.(\d+){re.escape(path.suffix)}")
    older = []
    if path.parent.is_dir():
        older = sorted((int(m.group(1)), p) for p in path.parent.iterdir()
                       if (m := pattern.fullmatch(p.name)) and int(m.group(1)) > 0)
    return ([path] if path.is_file() else []) + [p for _, p in older if p.is_file()]


def _shift_history(path: Path, keep: int) -> None:
    """Move every kept checkpoint down a place (oldest first), the latest by a hard link."""
    for i in range(keep - 1, 1, -1):
        if history_path(path, i - 1).is_file():
            os.replace(history_path(path, i - 1), history_path(path, i))
    if not path.is_file():
        return
    first = history_path(path, 1)
    link = first.with_name(f".{first.name}.link.tmp")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
    except OSError:  # no hard links here: move it (ckpt.pt is missing until the new one lands)
        os.replace(path, first)
        return
    try:
        os.replace(link, first)
    except BaseException:
        link.unlink(missing_ok=True)
        raise


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


@dataclass
class Found:
    """What :func:`find_checkpoint` read: the checkpoint ``state`` from ``path``, and the newer
    ones it skipped, ``[(path, why)]``."""

    state: dict[str, Any]
    path: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def find_checkpoint(
    source: str | os.PathLike, map_location: str | torch.device = "cpu",
    check: Callable[[dict[str, Any], Path], Any] | None = None,
) -> Found:
    """The checkpoint ``source`` names: a file is read as it is; a run folder gives its latest
    good one, the first of ``ckpt.pt``, ``ckpt.1.pt``, ... that :func:`load_checkpoint` reads
    (``weights_only``, finite) and that passes :func:`checkpoint_config` and ``check(state,
    path)`` (which raises :class:`CheckpointError` to refuse it).

    Raises:
        CheckpointError: ``no checkpoint at <folder>/ckpt.pt`` (none there), the file's own
            error, or every checkpoint of the folder refused (each named, with why).
    """
    source = Path(source)
    candidates = checkpoint_history(source / CHECKPOINT_NAME) if source.is_dir() else [source]
    if not candidates:
        raise CheckpointError(f"no checkpoint at {source / CHECKPOINT_NAME}")
    skipped = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location)
            checkpoint_config(state, path)
            if check is not None:
                check(state, path)
        except CheckpointError as exc:
            if len(candidates) == 1:
                raise
            skipped.append((path, _why(exc, path)))
            continue
        return Found(state, path, skipped)
    raise CheckpointError(f"no readable checkpoint in {source}: " + "; ".join(f"{p.name}: {why}" for p, why in skipped))


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged checkpoint out of the history (``ckpt.pt`` -> ``ckpt.pt.damaged``,
    replacing an older one), so that the next checkpoints do not rotate it in."""
    path = Path(path)
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    os.replace(path, aside)
    return aside


def _why(exc: Exception, path: Path) -> str:
    """A :class:`CheckpointError`'s message on one line, without the leading ``<path>: ``,
    cut to 160 characters (torch's unpickling errors run to a paragraph)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    text = text.removeprefix(f"{path}: ")
    return text if len(text) <= 160 else text[:157] + "..."


def fallback_warning(found: Found, doing: str = "using") -> str | None:
    """One line naming each checkpoint :func:`find_checkpoint` skipped and why, and the one
    read in their place (None when none was skipped)."""
    if not found.skipped:
        return None
    bad = "; ".join(f"{p}: {why}" for p, why in found.skipped)
    return f"{bad}; {doing} {found.path} (step {found.state['step']}), the latest good checkpoint, instead"


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
