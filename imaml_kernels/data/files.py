"""Generic file plumbing of the data layer: where a dataset lives, atomic array writes,
checksums and downloads.

* :func:`resolve_root` decides which directory a dataset is read from or written to
  (explicit argument, then an environment variable, then the user cache);
* :func:`save_npz_atomic` writes arrays through :func:`imaml_kernels._atomic.atomic_write`
  (a temporary file and ``os.replace``), so that an interrupted conversion never leaves a
  half-written file under its final name (text goes through
  :func:`imaml_kernels._atomic.write_text`);
* :func:`file_digest` hashes a file in chunks (sha256 by default);
* :func:`download_url` fetches one file with a tqdm progress bar.

It imports nothing else from the package but :mod:`imaml_kernels._atomic`, so every
reader and converter can import it.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .._atomic import atomic_write

__all__ = [
    "DEFAULT_CACHE_SUBDIR",
    "resolve_root",
    "save_npz_atomic",
    "file_digest",
    "download_url",
]

# ----------------------------------------------------------------------------
# Where data lives
# ----------------------------------------------------------------------------

DEFAULT_CACHE_SUBDIR = "imaml_kernels"


def _user_cache_dir() -> Path:
    # XDG first because HPC clusters often point it at scratch space; the home
    # directory there is small and slow.
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / DEFAULT_CACHE_SUBDIR


def resolve_root(
    root: str | os.PathLike | None, *, env_var: str, subdir: str
) -> tuple[Path, str]:
    """Pick a dataset directory: ``root``, else ``$env_var``, else the user cache.

    Args:
        root: explicit directory, or None.
        env_var: environment variable that names the dataset directory itself
            (``IMAML_DATA`` for Omniglot, ``IMAML_DATA_MINIIMAGENET``).
        subdir: folder under ``$XDG_CACHE_HOME/imaml_kernels`` (default
            ``~/.cache/imaml_kernels``) used when neither is given.

    Returns:
        ``(path, how)`` where ``how`` says which rule chose the path, for error
        messages (e.g. ``"from $IMAML_DATA"``). The path need not exist.

    Example:
        >>> p, how = resolve_root("/data/omniglot", env_var="IMAML_DATA", subdir="omniglot")
        >>> str(p), how
        ('/data/omniglot', 'given as root')
    """
    if root is not None:
        return Path(root).expanduser(), "given as root"
    env = os.environ.get(env_var)
    if env:
        return Path(env).expanduser(), f"from ${env_var}"
    return _user_cache_dir() / subdir, "the default cache directory"


# ----------------------------------------------------------------------------
# Writing and hashing files
# ----------------------------------------------------------------------------


def save_npz_atomic(dest: str | os.PathLike, *, compressed: bool = True, **arrays: np.ndarray) -> Path:
    """Write ``arrays`` to the ``.npz`` file ``dest`` via a temporary file and a rename.

    Args:
        dest: final path (any suffix; numpy's habit of appending ``.npz`` is
            avoided by writing to an open file).
        compressed: ``np.savez_compressed`` (True) or ``np.savez``.
        **arrays: the arrays, by key.

    Returns:
        ``Path(dest)``.

    Example:
        >>> save_npz_atomic(tmp / "x.npz", images=np.zeros((2, 20, 28, 28), np.uint8))
        >>> np.load(tmp / "x.npz")["images"].shape
        (2, 20, 28, 28)
    """
    dest = Path(dest)
    # The file is created with 0o666 less the umask (as by open()): converted data is often shared.
    with atomic_write(dest) as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return dest


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", *, chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in 1 MiB chunks (``algorithm``: a :func:`hashlib.new` name).

    ``md5`` is accepted for checking downloads against published values (integrity, not
    security).

    Example:
        >>> file_digest(tmp / "a.json")
        '44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a'
    """
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------
# Downloads
# ----------------------------------------------------------------------------


def download_url(url: str, dest: str | os.PathLike, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (atomically) with a tqdm progress bar.

    ``file://`` URLs work too, which is how the tests run offline.

    Raises:
        OSError: the URL could not be fetched; the message names it and says
            how to supply the files by hand.

    Example:
        >>> download_url("https://example.org/data/images_background.zip", "/tmp/bg.zip")
        PosixPath('/tmp/bg.zip')
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    try:
        resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (callers pass http/https/file URLs)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise OSError(
            f"could not download {url}: {exc}. If this machine is offline, fetch the file "
            f"elsewhere and pass the folder that holds it as --src (or src=)."
        ) from exc
    with resp, atomic_write(dest) as f:
        total = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
        with tqdm(
            total=int(total) if total else None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=dest.name,
            disable=not progress,
        ) as bar:
            while block := resp.read(1 << 16):
                f.write(block)
                bar.update(len(block))
    return dest

