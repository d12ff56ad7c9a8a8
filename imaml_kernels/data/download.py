"""The Omniglot download (``imaml-data omniglot``): the on-disk format, and the upstream
release fetched and converted into it.

* the format constants and file names (``OMNIGLOT_*``, :func:`omniglot_npz_name`), which
  the reader :mod:`imaml_kernels.data.omniglot` imports;
* :func:`fetch_omniglot_zips` finds or downloads the release zips of ``brendenlake/omniglot``;
* :func:`convert_omniglot_zips` turns them into the array format;
* :func:`prepare_omniglot` does both (what ``imaml-data omniglot`` runs).

Where files go, how they are written and downloaded is :mod:`imaml_kernels.data.files`.
It imports nothing else from the package but :mod:`imaml_kernels._atomic` and ``files``,
so the readers can import it.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import urllib.parse
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .._atomic import write_text
from .files import download_url, file_digest, resolve_root, save_npz_atomic

__all__ = [
    "OMNIGLOT_URL",
    "OMNIGLOT_SPLITS",
    "OMNIGLOT_COUNTS",
    "OMNIGLOT_DRAWINGS",
    "OMNIGLOT_SIZES",
    "OMNIGLOT_CHARACTERS_JSON",
    "OMNIGLOT_SHA256",
    "omniglot_npz_name",
    "omniglot_zip_name",
    "fetch_omniglot_zips",
    "convert_omniglot_zips",
    "prepare_omniglot",
]

# ----------------------------------------------------------------------------
# Omniglot: the on-disk format (the reader in omniglot.py imports these)
# ----------------------------------------------------------------------------

# torchvision and most meta-learning code fetch the release from here.
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
OMNIGLOT_SPLITS = ("background", "evaluation")
OMNIGLOT_COUNTS = {"background": 964, "evaluation": 659}
OMNIGLOT_DRAWINGS = 20
OMNIGLOT_SIZES = (105, 28)
OMNIGLOT_CHARACTERS_JSON = "characters.json"
# md5 of the upstream zips (the values torchvision checks).
_OMNIGLOT_ZIP_MD5 = {
    "background": "68d2efa1b9178cc56df9314c21c6e718",
    "evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
_OMNIGLOT_NOTE = (
    'Row i of images_<split>_*.npz "images" is characters[i] (Alphabet/characterNN folder '
    "of the original release); character_ids[i] is the 4-digit id in the original file "
    "names (NNNN_DD.png); axis 1 is the drawing DD-1 (DD = 01..20)."
)

# Checksums of the reference files (shared data README): (sha256 of the file,
# sha256 of the C-ordered array bytes). The second lets a re-conversion pass:
# np.savez stamps the zip members with the current time, so a converted file
# never matches the first hash even when its pixels are identical.
OMNIGLOT_SHA256: dict[str, tuple[str, str | None]] = {
    "images_background_105.npz": (
        "d8bb80f39a927c0791addb21342a795eaf34e953bd49fbf04dd8d55c67af73c4",
        "f32435a80e3966c7aa29e20298c2c9ec9947dbf555cecea37d51cfc8e1365fa0",
    ),
    "images_evaluation_105.npz": (
        "c9084c9fea1e1c74aa5e78e9b432c0d3ebece9d670e4aa2219a91e6daa946c8c",
        "eb68a59f8009779aa59cff308d7af8e3b946a55d740dad6a8ed9364f7c20fa27",
    ),
    "images_background_28.npz": (
        "d78a7d66b6ed74ef719193907f883247c87cfb5e52e3de479eb7231351254237",
        "e530259da819da5c3e1f317397ba27e7a19666beeee4061377e1a1f6266b0acb",
    ),
    "images_evaluation_28.npz": (
        "ac3d9916f37f8e3017f1c6cc0d1d3e91846541d423ae5a88bc60372505b4f444",
        "e8f4e050572d0036ad7e121c0e53bedfbb4988e5eb745e0feac0e8484f61c863",
    ),
    # The converter writes this file byte-for-byte (json indent=1, no newline).
    "characters.json": ("07f51cad64485e1befe8ed64c974d1397b0f4fbe3236d70aa4aa2d6634358f95", None),
}


def omniglot_npz_name(split: str, size: int) -> str:
    """``images_{split}_{size}.npz``, e.g. ``images_background_28.npz``."""
    return f"images_{split}_{size}.npz"


def omniglot_zip_name(split: str) -> str:
    """``images_{split}.zip``, the upstream release file name."""
    return f"images_{split}.zip"


# ----------------------------------------------------------------------------
# Omniglot: download and convert
# ----------------------------------------------------------------------------

# <top>/<Alphabet>/characterNN/NNNN_DD.png; <top> is images_background etc.
_MEMBER_RE = re.compile(r"^(?:[^/]+/)?([^/]+)/(character\d+)/(\d{4})_(\d{2})\.png$")


def fetch_omniglot_zips(
    src: str | os.PathLike | None, workdir: str | os.PathLike, *, progress: bool = True
) -> dict[str, Path]:
    """Locate or download ``images_background.zip`` and ``images_evaluation.zip``.

    Args:
        src: None for the upstream GitHub release (``OMNIGLOT_URL``, checked
            against the published md5); a local folder holding both zips (used
            in place, not copied); or a base URL (``http://``, ``https://``,
            ``file://``) under which both names are fetched.
        workdir: where downloads go.
        progress: show tqdm bars.

    Returns:
        ``{"background": Path, "evaluation": Path}``.

    Example:
        >>> zips = fetch_omniglot_zips("/mnt/omniglot_zips", "/tmp/work")
        >>> sorted(zips)
        ['background', 'evaluation']
    """
    workdir = Path(workdir)
    base = OMNIGLOT_URL if src is None else str(src)
    scheme = urllib.parse.urlparse(base).scheme
    if scheme not in ("http", "https", "file"):
        folder = Path(base).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"--src {base!r} is neither a folder nor an http(s)/file URL; it should be a "
                f"folder holding {omniglot_zip_name('background')} and "
                f"{omniglot_zip_name('evaluation')}"
            )
        out = {}
        for split in OMNIGLOT_SPLITS:
            p = folder / omniglot_zip_name(split)
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found (expected the upstream Omniglot zip there)")
            out[split] = p
        return out
    out = {}
    for split in OMNIGLOT_SPLITS:
        name = omniglot_zip_name(split)
        dest = download_url(f"{base.rstrip('/')}/{name}", workdir / name, progress=progress)
        md5 = file_digest(dest, "md5") if src is None else None
        if md5 is not None and md5 != _OMNIGLOT_ZIP_MD5[split]:
            raise ValueError(
                f"{name} downloaded from {base} has md5 {md5}, expected "
                f"{_OMNIGLOT_ZIP_MD5[split]}; the download is corrupt or upstream changed"
            )
        out[split] = dest
    return out


def _read_omniglot_zip(
    path: Path, *, drawings: int, image_size: int, progress: bool, desc: str
) -> tuple[np.ndarray, list[str], list[int]]:
    """Decode one release zip into uint8 [C, drawings, S, S] plus names and ids."""
    from PIL import Image
    from tqdm.auto import tqdm

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path} is not a readable zip file: {exc}") from exc
    with zf:
        # {(alphabet, character): {drawing: (member name, id)}}
        chars: dict[tuple[str, str], dict[int, tuple[str, int]]] = {}
        for name in zf.namelist():
            if name.endswith("/") or "__MACOSX" in name or not name.endswith(".png"):
                continue
            m = _MEMBER_RE.match(name)
            if m is None:
                raise ValueError(
                    f"{path}: unexpected member {name!r}; expected "
                    f"images_<split>/<Alphabet>/characterNN/NNNN_DD.png"
                )
            alphabet, character, cid, dd = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
            slot = chars.setdefault((alphabet, character), {})
            if dd - 1 in slot:
                raise ValueError(f"{path}: drawing {dd:02d} of {alphabet}/{character} appears twice")
            slot[dd - 1] = (name, cid)
        if not chars:
            raise ValueError(f"{path}: no character images found")

        # A sorted directory listing of the release: alphabet, then character.
        keys = sorted(chars)
        images = np.empty((len(keys), drawings, image_size, image_size), np.uint8)
        names, ids = [], []
        for row, key in enumerate(tqdm(keys, desc=desc, disable=not progress, unit="char")):
            slot = chars[key]
            label = f"{key[0]}/{key[1]}"
            if sorted(slot) != list(range(drawings)):
                found = ", ".join(f"{d + 1:02d}" for d in sorted(slot))
                raise ValueError(
                    f"{path}: {label} has drawings [{found}], expected exactly 01..{drawings:02d}"
                )
            cids = {cid for _, cid in slot.values()}
            if len(cids) != 1:
                raise ValueError(f"{path}: {label} mixes character ids {sorted(cids)}")
            for d, (member, _) in slot.items():
                with Image.open(io.BytesIO(zf.read(member))) as im:
                    # The PNGs are 1-bit; "L" maps them to 0 (ink) / 255 (paper).
                    gray = np.asarray(im.convert("L"))
                if gray.shape != (image_size, image_size):
                    raise ValueError(
                        f"{path}: {member} is {gray.shape[1]}x{gray.shape[0]}, "
                        f"expected {image_size}x{image_size}"
                    )
                images[row, d] = gray
            names.append(label)
            ids.append(cids.pop())
    return images, names, ids


def _lanczos(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 [C, D, S, S] to [C, D, size, size] with Pillow LANCZOS on the 8-bit image.

    Resizing the 8-bit image (not the 1-bit one, which Pillow would resize by
    nearest neighbour) gives the anti-aliased 28x28 images the iMAML reference
    loader feeds its network; Pillow rounds to uint8 itself.
    """
    from PIL import Image

    out = np.empty(images.shape[:2] + (size, size), np.uint8)
    for c in range(images.shape[0]):
        for d in range(images.shape[1]):
            out[c, d] = np.asarray(Image.fromarray(images[c, d]).resize((size, size), Image.LANCZOS))
    return out


def convert_omniglot_zips(
    zips: Mapping[str, str | os.PathLike],
    root: str | os.PathLike,
    *,
    expected_counts: Mapping[str, int] | None = OMNIGLOT_COUNTS,
    drawings: int = OMNIGLOT_DRAWINGS,
    sizes: Sequence[int] = OMNIGLOT_SIZES,
    progress: bool = True,
) -> list[Path]:
    """Convert the two release zips into the Omniglot array format in ``root``.

    Writes, each atomically:

    * ``images_{split}_{S}.npz`` (key ``images``): uint8 ``[C, drawings, S, S]``,
      255 = paper, 0 = ink. Rows are sorted by alphabet folder, then character
      folder; axis 1 index ``d`` is file ``NNNN_{d+1:02d}.png``. ``S = 105`` is
      the PNG itself, other sizes are Pillow LANCZOS resizes of it.
    * ``characters.json``: per split, ``characters`` (``"Alphabet/characterNN"``)
      and ``character_ids`` (int ids ``NNNN``) row by row, plus a ``note``;
      the same bytes as the reference file for the full release.

    Args:
        zips: ``{"background": path, "evaluation": path}``.
        root: output folder (created).
        expected_counts: characters per split to insist on; the real release
            has 964 / 659. None skips the check (small test zips).
        drawings: drawings per character; must be 01..drawings exactly.
        sizes: output sizes; the first must be the PNG size (105).
        progress: show tqdm bars.

    Returns:
        The paths written.

    Raises:
        ValueError: wrong character count, missing/extra drawings, unreadable
            zip, unexpected member names or image sizes.

    Example:
        >>> convert_omniglot_zips({"background": "bg.zip", "evaluation": "ev.zip"}, "out/")
        [PosixPath('out/images_background_105.npz'), ..., PosixPath('out/characters.json')]
    """
    root = Path(root)
    decoded = {}
    for split in OMNIGLOT_SPLITS:
        if split not in zips:
            raise ValueError(f"zips must name both {OMNIGLOT_SPLITS}, got {sorted(zips)}")
        images, names, ids = _read_omniglot_zip(
            Path(zips[split]), drawings=drawings, image_size=sizes[0], progress=progress, desc=split
        )
        if expected_counts is not None and images.shape[0] != expected_counts[split]:
            raise ValueError(
                f"{zips[split]}: found {images.shape[0]} characters x {drawings} drawings, "
                f"expected {expected_counts[split]} x {drawings} for the {split} split"
            )
        decoded[split] = (images, names, ids)
    all_ids = [i for _, _, ids in decoded.values() for i in ids]
    if len(set(all_ids)) != len(all_ids):
        raise ValueError("character ids repeat across characters; the zips are inconsistent")

    written = []
    for split, (images, _, _) in decoded.items():
        for size in sizes:
            arr = images if size == sizes[0] else _lanczos(images, size)
            written.append(save_npz_atomic(root / omniglot_npz_name(split, size), images=arr))
    meta = {split: {"characters": names, "character_ids": ids} for split, (_, names, ids) in decoded.items()}
    meta["note"] = _OMNIGLOT_NOTE
    # indent=1 and no trailing newline: the layout of the reference file, so the
    # full release reproduces its checksum.
    written.append(write_text(root / OMNIGLOT_CHARACTERS_JSON, json.dumps(meta, indent=1)))
    return written


def prepare_omniglot(
    root: str | os.PathLike | None = None,
    *,
    src: str | os.PathLike | None = None,
    expected_counts: Mapping[str, int] | None = OMNIGLOT_COUNTS,
    keep_zips: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Download (or take from ``src``) the Omniglot release and convert it into ``root``.

    This is what ``imaml-data omniglot --root DIR`` runs.

    Args:
        root: output folder; None resolves like the loader (``$IMAML_DATA``,
            then ``~/.cache/imaml_kernels/omniglot``).
        src: see :func:`fetch_omniglot_zips` (None = GitHub release).
        expected_counts: characters per split; None skips the check.
        keep_zips: keep downloaded zips in ``root`` (otherwise a temporary
            folder inside ``root`` is removed afterwards).
        force: convert even if the output files already exist.
        progress: show tqdm bars.

    Returns:
        The resolved ``root``.

    Example:
        >>> prepare_omniglot("~/data/omniglot")          # ~10 MB download, ~20 s
        PosixPath('/home/me/data/omniglot')
    """
    root, _ = resolve_root(root, env_var="IMAML_DATA", subdir="omniglot")
    outputs = [root / omniglot_npz_name(s, n) for s in OMNIGLOT_SPLITS for n in OMNIGLOT_SIZES]
    outputs.append(root / OMNIGLOT_CHARACTERS_JSON)
    if not force and all(p.is_file() for p in outputs):
        return root
    root.mkdir(parents=True, exist_ok=True)
    if keep_zips:
        zips = fetch_omniglot_zips(src, root, progress=progress)
        convert_omniglot_zips(zips, root, expected_counts=expected_counts, progress=progress)
    else:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as work:
            zips = fetch_omniglot_zips(src, work, progress=progress)
            convert_omniglot_zips(zips, root, expected_counts=expected_counts, progress=progress)
    return root
