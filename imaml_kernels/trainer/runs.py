"""The run folder of ``imaml-train``: who owns it, what it holds, and its metrics log.

Guarantees (the README's "Runs and failures"):

- a folder belongs to one run: a new run refuses a folder that holds one (``--resume`` it or
  ``--overwrite`` it), and a lock (``.lock``, an advisory ``flock`` the kernel drops when the
  process dies) keeps a second trainer out while one writes;
- temporary files left by killed writers (``.<name>.<random>.tmp``) are removed at start;
- the metrics log is written a whole row at a time (one ``write`` per row on an append-only
  descriptor) as strict JSON (``null`` for a non-finite value); a torn last row (a crash
  mid-write) is dropped on reading, with one warning.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from .._atomic import folder_problem, write_text
from .checkpoint import CHECKPOINT_NAME, DAMAGED_SUFFIX, checkpoint_history

__all__ = ["RunError", "RunFolder", "MetricsLog", "read_metrics", "json_safe", "check_out_dir"]

# What a run writes into its folder (besides the lock, the older checkpoints ckpt.<n>.pt and
# the damaged ones set aside, <name>.damaged).
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "curves.png", "eval.json")
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")  # tempfile.mkstemp(prefix=".name.", suffix=".tmp")


class RunError(RuntimeError):
    """A run that cannot start or go on (folder taken, run diverged, a write failed)."""


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    """Strict JSON of ``obj`` (non-finite floats as ``null``)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Refuse, before any work, a folder that cannot hold a run: a file, a path under a file,
    or a folder (or its nearest existing parent) this process cannot write to."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{flag} {out} is a file, not a folder")
    problem = folder_problem(out)
    if problem:
        raise RunError(f"{flag} {out}: {problem}")


class RunFolder:
    """The folder ``out`` of one run, locked while this process writes it.

    Example::

        >>> with RunFolder(out) as run:          # raises RunError if another trainer holds it
        ...     run.claim(resume=False, overwrite=False)
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self._fd: int | None = None

    def holds_run(self) -> list[str]:
        """The run files present (empty: a fresh folder)."""
        names = [n for n in RUN_FILES if (self.out / n).exists()]
        names += [p.name for p in checkpoint_history(self.out / CHECKPOINT_NAME) if p.name not in names]
        return names + sorted(p.name for p in self.out.glob(f"*{DAMAGED_SUFFIX}") if p.is_file())

    def lock(self) -> None:
        import fcntl

        check_out_dir(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode().strip() or "?"
            finally:
                os.close(fd)
            raise RunError(f"{self.out} is in use by another trainer (pid {pid}); wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (removing it would race a new locker)
            self._fd = None

    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, *exc):
        self.release()

    def check_free(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse a folder that holds a run, unless it is resumed or overwritten."""
        present = self.holds_run()
        if present and not resume and not overwrite:
            raise RunError(
                f"{self.out} already holds a run ({', '.join(present)}): continue it with --resume, "
                f"replace it with --overwrite, or choose another --out"
            )

    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Make the folder this run's (the lock held): :meth:`check_free`, then, with
        ``overwrite``, the old run's files go; stale temporary files go."""
        self.check_free(resume=resume, overwrite=overwrite)
        if not resume:
            for name in self.holds_run():
                (self.out / name).unlink()
        self.clean_temps()

    def clean_temps(self) -> list[str]:
        """Remove the temporary files of killed writers (only while the lock is held)."""
        removed = []
        for p in self.out.iterdir():
            if _TEMP.match(p.name) and (p.is_file() or p.is_symlink()):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed


def read_metrics(path: Path, *, warn: bool = True) -> list[dict]:
    """The rows of a metrics log. A torn last row (a crash mid-write) is dropped with one
    warning; an unreadable row elsewhere raises :class:`RunError`."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            last = all(not rest.strip() for rest in lines[i + 1:])
            if not last:
                raise RunError(f"{path}: row {i + 1} is not valid JSON (the log was edited or damaged)") from None
            if warn:
                print(f"imaml-train: warning: {path}: dropped a torn last row (a crash while it was written)", file=sys.stderr)
            break
        rows.append(row)
    return rows


class MetricsLog:
    """An append-only metrics log: each row one ``write`` of a whole line, strict JSON."""

    def __init__(self, path: Path | None):
        self.path = path  # None: a log that writes nothing (ranks other than 0)
        self._fd: int | None = None

    def write(self, rows: Iterable[dict]) -> None:
        if self.path is None:
            return
        if self._fd is None:  # opened at the first row: a run that logs nothing leaves no file
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for row in rows:
            data = (dumps(row) + "\n").encode()
            if os.write(self._fd, data) != len(data):  # a regular file takes it whole or raises
                raise RunError(f"{self.path}: short write (disk full?)")

    def sync(self) -> None:
        """The rows written so far onto the disk (``fsync``), before a checkpoint says they are logged."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rewrite_metrics(path: Path, rows: list[dict]) -> None:
    """Replace the log with ``rows`` atomically."""
    write_text(path, "".join(dumps(r) + "\n" for r in rows))
