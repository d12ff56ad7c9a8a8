"""Atomic checkpoints for the trainer.

A checkpoint is one ``torch.save`` dict::

    {"version": 1, "step": int, "config": dict, "model": state_dict, "optimizer": state_dict,
     "sampler": TaskSampler.state_dict(), "torch_rng": ByteTensor, "cuda_rng": ByteTensor | None}

It is written with :func:`imaml_kernels._atomic.atomic_write` (a temporary file in the target
folder, flushed to disk, then moved over the target with ``os.replace``): a crash mid-write
leaves the previous checkpoint intact, never a truncated one.

Example::

    >>> save_checkpoint("runs/x/ckpt.pt", state)
    >>> state = load_checkpoint("runs/x/ckpt.pt")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_write

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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing file, unreadable file, or a dict without our keys.
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
    return state
