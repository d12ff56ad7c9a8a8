"""What both command lines (``imaml-train``, ``imaml-eval``) check and print the same way:
an error folded onto one line, and the ``--device`` check."""

from __future__ import annotations

import torch

from .presets import ConfigError

__all__ = ["check_device", "one_line"]


def one_line(exc: BaseException) -> str:
    """An error message folded onto one line (loaders write multi-line hints)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def check_device(spec: str) -> torch.device:
    """``torch.device(spec)``, present on this machine; ``ConfigError`` (one line) otherwise."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"--device {spec}: not a torch device ({one_line(exc)})") from exc
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if device.type == "mps":  # torch.mps has no is_available; the backend flag does
        is_available = torch.backends.mps.is_available
    if not callable(is_available) or not is_available():
        name = "CUDA" if device.type == "cuda" else device.type
        raise ConfigError(f"--device {spec}: {name} is not available on this machine")
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise ConfigError(f"--device {spec}: this machine has {count()} {device.type} device(s)")
    return device
