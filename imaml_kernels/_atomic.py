"""Atomic file writes: the one helper behind checkpoints, metrics, JSON results, plots and data.

A file is written to a fresh temporary file in the destination folder (created exclusively by
``tempfile.mkstemp``, so a file or symlink planted under a predictable name is never opened),
flushed and fsynced, then moved over the target with ``os.replace``: readers see the old file
or the new one, never a truncated one, and a failure leaves the target untouched and no
temporary file behind.

Example::

    >>> with atomic_write("runs/x/ckpt.pt") as f:
    ...     torch.save(state, f)
    >>> write_text("runs/x/eval.json", "{}\\n")
    PosixPath('runs/x/eval.json')
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "folder_problem", "write_bytes", "write_text"]


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why no file could be written into ``folder`` (made if missing), or ``None``: its nearest
    existing ancestor is not a folder, or this process cannot write there."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"the folder {probe} is not writable"
    return None


def _umask() -> int:
    """The process umask (Linux reports it read-only; elsewhere set and restore it)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a new file that replaces ``path`` when the ``with`` block ends without an error.

    Args:
        path: the target; its folder is created if missing.
        mode: ``"wb"`` (binary) or ``"w"`` (text, UTF-8).

    The temporary file is ``.<name>.<random>.tmp`` beside the target (same file system, so the
    rename is atomic; hidden, so a crash leaves nothing a listing of the folder picks up). It
    gets the permissions of a file made by ``open()`` (0o666 less the umask), not mkstemp's 0o600.
    On any exception, in the block or while writing, it is removed and the target is unchanged.

    Example::

        >>> with atomic_write(out / "curves.png") as f:
        ...     fig.savefig(f, format="png")
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        f = os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {}))
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            # fsync before the rename: otherwise a power loss can leave the new name
            # pointing at blocks that never reached the disk.
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``Path(path)``."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``Path(path)``."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)
