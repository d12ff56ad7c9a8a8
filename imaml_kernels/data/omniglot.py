"""Omniglot for meta-learning, as the iMAML experiments use it.

Data: the 1623 characters x 20 drawings of Lake et al. (2015), stored by
``imaml-data omniglot`` (see :mod:`imaml_kernels.data.download`) as

* ``images_{background,evaluation}_{105,28}.npz``, key ``images``: uint8
  ``[C, 20, S, S]`` (C = 964 / 659), 255 = paper, 0 = ink, rows sorted by
  alphabet then character folder, axis 1 = drawing ``DD - 1``;
* ``characters.json``: per split, ``characters`` (``"Alphabet/characterNN"``)
  and ``character_ids`` (the upstream ids 1..1623).

Protocol (iMAML, Rajeswaran et al. 2019, following Finn et al. 2017): all 1623
characters are pooled (background rows, then evaluation rows) and split by a
fixed seeded shuffle into 1200 meta-train and 423 meta-test classes; images are
28x28 (Pillow LANCZOS from 105x105), ink = 1.0; each class of each task is
rotated by a random multiple of 90 degrees (``rotate=True`` in the samplers).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .download import (
    OMNIGLOT_CHARACTERS_JSON,
    OMNIGLOT_COUNTS,
    OMNIGLOT_DRAWINGS,
    OMNIGLOT_SHA256,
    OMNIGLOT_SPLITS,
    omniglot_npz_name,
)
from .files import file_digest, resolve_root
from .sampler import TaskSampler

__all__ = [
    "IMAML_SPLIT_SEED",
    "IMAML_TRAIN_CLASSES",
    "OMNIGLOT_ENV",
    "omniglot_root",
    "load_omniglot_arrays",
    "omniglot_split",
    "load_omniglot",
    "omniglot_samplers",
]

OMNIGLOT_ENV = "IMAML_DATA"
# The meta-train / meta-test split is the order of sha256(f"{seed}:{name}")
# over the 1623 "Alphabet/characterNN" names: a seeded shuffle that, unlike
# numpy's or torch's generators, is the same in every library version.
IMAML_SPLIT_SEED = 0
IMAML_TRAIN_CLASSES = 1200


def omniglot_root(root: str | os.PathLike | None = None) -> Path:
    """The Omniglot folder: ``root``, else ``$IMAML_DATA``, else ``~/.cache/imaml_kernels/omniglot``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` when set. The folder need not exist.

    Example:
        >>> omniglot_root("/data/omniglot")
        PosixPath('/data/omniglot')
    """
    return resolve_root(root, env_var=OMNIGLOT_ENV, subdir="omniglot")[0]


def _missing_message(root: Path, how: str, missing: Sequence[str]) -> str:
    return (
        f"Omniglot not found in {root} ({how}): missing {', '.join(missing)}.\n"
        f"Download (about 15 MB) and convert it with\n"
        f"    imaml-data omniglot --root {root}\n"
        f"or  python -m imaml_kernels.data omniglot --root {root}\n"
        f"or point ${OMNIGLOT_ENV} (or root=) at a folder that already holds these files."
    )


def _content_sha256(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def _verify(path: Path, images: np.ndarray | None) -> None:
    """Check ``path`` against the reference checksums (file bytes, else array bytes)."""
    ref = OMNIGLOT_SHA256.get(path.name)
    if ref is None:
        raise ValueError(f"verify=True: no reference checksum is known for {path.name}")
    file_ref, content_ref = ref
    found = file_digest(path)
    if found == file_ref:
        return
    if images is not None and content_ref is not None and _content_sha256(images) == content_ref:
        return  # same pixels in a differently stamped zip container
    msg = f"{path}: sha256 {found} does not match the reference {file_ref}"
    if content_ref is not None and images is not None:
        msg += f" (nor do its array bytes match {content_ref})"
    if path.name.endswith("_28.npz"):
        msg += (
            ". If you made this file with `imaml-data omniglot`, a Pillow version other "
            "than 13.0.0 may round the LANCZOS 28x28 resize differently; such a file is "
            "still usable (load without verify=True). The 105x105 arrays and "
            "characters.json must match exactly."
        )
    raise ValueError(msg)


def _load_images(path: Path, expected: tuple[int, ...]) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files) if hasattr(z, "files") else None
            images = z["images"] if files and "images" in files else None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{path}: cannot be read ({type(exc).__name__}: {exc}); the file is truncated or "
            f"corrupt. Re-create it with `imaml-data omniglot --root {path.parent} --force`."
        ) from exc
    if images is None:
        raise ValueError(f"{path}: expected an .npz with the array 'images', found {files}")
    if images.dtype != np.uint8 or images.shape != expected:
        raise ValueError(
            f"{path}: expected uint8 {list(expected)}, found {images.dtype} {list(images.shape)}"
        )
    return images


def _check_meta_entry(meta_path: Path, split: str, entry: Any, count: int) -> None:
    """``entry`` is ``characters.json[split]``: ``{"characters": [count names], "character_ids":
    [count ints]}``; else a one-line ``ValueError`` naming the file and the bad field."""
    expected = f"{meta_path}: expected '{split}' with {count} 'characters' and {count} 'character_ids'"
    if not isinstance(entry, dict):
        raise ValueError(f"{expected}, found {type(entry).__name__}")
    fields = (
        ("characters", "a name (str)", lambda v: isinstance(v, str)),
        ("character_ids", "an integer id", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    )
    if not all(isinstance(entry.get(f), list) for f, _, _ in fields):
        found = ", ".join(
            f"'{f}': {type(entry[f]).__name__}" if f in entry else f"no '{f}'"
            for f, _, _ in fields if not isinstance(entry.get(f), list)
        )
        raise ValueError(f"{expected}, found {found}")
    if any(len(entry[f]) != count for f, _, _ in fields):
        found = {k: len(v) for k, v in entry.items() if isinstance(v, list)}
        raise ValueError(f"{expected}, found {found}")
    for field, what, ok in fields:
        for i, v in enumerate(entry[field]):
            if not ok(v):
                text = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
                raise ValueError(
                    f"{meta_path}: '{split}' '{field}'[{i}] must be {what}, found {type(v).__name__} {text}"
                )


def load_omniglot_arrays(
    root: str | os.PathLike | None = None, *, image_size: int = 28, verify: bool = False
) -> dict[str, Any]:
    """Read and validate the stored arrays, pooled: background rows, then evaluation rows.

    Args:
        root: data folder (see :func:`omniglot_root`).
        image_size: 28 or 105 (the files ``images_*_{image_size}.npz``).
        verify: also check the sha256 of each file read against the reference
            checksums (off by default: hashing costs more than loading). A file
            re-created by the converter passes if its pixels match.

    Returns:
        ``{"images": uint8 ndarray [1623, 20, S, S] (255 = paper),
        "characters": list[str] (1623), "character_ids": list[int] (1623),
        "num_background": 964}``.

    Raises:
        FileNotFoundError: files missing; the message says how to get them.
        ValueError: a file is unreadable, has the wrong shape or dtype, or
            (``verify=True``) the wrong checksum; the message names the file.

    Example:
        >>> raw = load_omniglot_arrays(image_size=105)
        >>> raw["images"].shape, raw["characters"][0]
        ((1623, 20, 105, 105), 'Alphabet_of_the_Magi/character01')
    """
    root, how = resolve_root(root, env_var=OMNIGLOT_ENV, subdir="omniglot")
    names = [omniglot_npz_name(s, image_size) for s in OMNIGLOT_SPLITS] + [OMNIGLOT_CHARACTERS_JSON]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(_missing_message(root, how, missing))

    meta_path = root / OMNIGLOT_CHARACTERS_JSON
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
    if verify:
        _verify(meta_path, None)

    images, characters, ids = [], [], []
    for split in OMNIGLOT_SPLITS:
        count = OMNIGLOT_COUNTS[split]
        entry = meta.get(split) if isinstance(meta, dict) else None
        _check_meta_entry(meta_path, split, entry, count)
        path = root / omniglot_npz_name(split, image_size)
        arr = _load_images(path, (count, OMNIGLOT_DRAWINGS, image_size, image_size))
        if verify:
            _verify(path, arr)
        images.append(arr)
        characters += list(entry["characters"])
        ids += list(entry["character_ids"])
    if len(set(characters)) != len(characters):
        raise ValueError(f"{meta_path}: character names repeat")
    return {
        "images": np.concatenate(images),
        "characters": characters,
        "character_ids": ids,
        "num_background": OMNIGLOT_COUNTS["background"],
    }


def omniglot_split(
    characters: Sequence[str], split: str | Mapping[str, Sequence[str]] = "imaml"
) -> tuple[list[int], list[int]]:
    """Meta-train and meta-test rows of the pooled character list.

    Args:
        characters: the 1623 pooled names (background, then evaluation).
        split:
            * ``"imaml"``: the iMAML protocol, a random 1200 / 423 split of all
              1623 characters, fixed by ``IMAML_SPLIT_SEED``: the 1200 names
              with the smallest ``sha256(f"{IMAML_SPLIT_SEED}:{name}")`` train.
              The iMAML authors' own class lists are not published with the
              paper, so this is the same protocol, not the same classes.
            * ``"vinyals"``: the first 1200 pooled characters train (the 964
              background characters and the first 236 evaluation characters,
              alphabetically), the last 423 test. This has the sizes of the
              split of Vinyals et al. (2016) but NOT its class lists (those
              files mix alphabets of both halves); pass them as a mapping to
              use them.
            * a mapping ``{"train": names, "test": names}``: explicit lists.

    Returns:
        ``(train_rows, test_rows)``, each sorted ascending.

    Example:
        >>> tr, te = omniglot_split(raw["characters"], "imaml")
        >>> len(tr), len(te)
        (1200, 423)
    """
    n = len(characters)
    if isinstance(split, Mapping):
        where = {c: i for i, c in enumerate(characters)}
        rows = {}
        for part in ("train", "test"):
            unknown = [c for c in split[part] if c not in where]
            if unknown:
                raise ValueError(f"split[{part!r}] names unknown characters, e.g. {unknown[:3]}")
            rows[part] = sorted({where[c] for c in split[part]})
        if set(rows["train"]) & set(rows["test"]):
            raise ValueError("split['train'] and split['test'] overlap")
        return rows["train"], rows["test"]
    if split == "imaml":
        key = lambda i: hashlib.sha256(f"{IMAML_SPLIT_SEED}:{characters[i]}".encode()).hexdigest()  # noqa: E731
        order = sorted(range(n), key=key)
        return sorted(order[:IMAML_TRAIN_CLASSES]), sorted(order[IMAML_TRAIN_CLASSES:])
    if split == "vinyals":
        return list(range(IMAML_TRAIN_CLASSES)), list(range(IMAML_TRAIN_CLASSES, n))
    raise ValueError(f"split must be 'imaml', 'vinyals' or a mapping, got {split!r}")


def load_omniglot(
    root: str | os.PathLike | None = None,
    *,
    split: str | Mapping[str, Sequence[str]] = "imaml",
    image_size: int = 28,
    verify: bool = False,
) -> dict[str, Any]:
    """Load Omniglot as meta-train / meta-test tensors with ink = 1.0.

    Args:
        root: data folder (see :func:`omniglot_root`).
        split: ``"imaml"`` (default), ``"vinyals"`` or explicit lists; see
            :func:`omniglot_split`.
        image_size: 28 (default, the iMAML setting) or 105.
        verify: check sha256 checksums (see :func:`load_omniglot_arrays`).

    Returns:
        dict with

        * ``"train"``: float32 ``[1200, 20, 1, S, S]``, ``1 - x/255`` (ink 1, paper 0);
        * ``"test"``: float32 ``[423, 20, 1, S, S]``;
        * ``"train_classes"`` / ``"test_classes"``: ``"Alphabet/characterNN"`` per row;
        * ``"train_ids"`` / ``"test_ids"``: upstream character ids per row.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_omniglot_arrays`.

    Example:
        >>> data = load_omniglot()
        >>> data["train"].shape, data["test"].shape
        (torch.Size([1200, 20, 1, 28, 28]), torch.Size([423, 20, 1, 28, 28]))
    """
    raw = load_omniglot_arrays(root, image_size=image_size, verify=verify)
    train_rows, test_rows = omniglot_split(raw["characters"], split)
    out: dict[str, Any] = {}
    for part, rows in (("train", train_rows), ("test", test_rows)):
        x = torch.from_numpy(raw["images"][rows])
        # (255 - x) / 255 rather than 1 - x/255: one rounding, so ink is
        # exactly 1.0 and paper exactly 0.0.
        out[part] = (255 - x.to(torch.float32)).div_(255.0).unsqueeze(2)
        out[f"{part}_classes"] = [raw["characters"][i] for i in rows]
        out[f"{part}_ids"] = [raw["character_ids"][i] for i in rows]
    return out


def omniglot_samplers(
    way: int,
    shot: int,
    query: int,
    *,
    root: str | os.PathLike | None = None,
    split: str | Mapping[str, Sequence[str]] = "imaml",
    image_size: int = 28,
    rotate: bool = True,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> tuple[TaskSampler, TaskSampler]:
    """Meta-train and meta-test :class:`TaskSampler` for Omniglot.

    Both rotate classes by multiples of 90 degrees when ``rotate`` (the iMAML
    setting). The test sampler's generator is seeded ``seed + 1`` so the two
    streams differ; evaluate with ``test.eval_tasks(n, batch, seed=...)`` for
    a fixed task set.

    Example:
        >>> train, test = omniglot_samplers(20, 1, 15, device="cuda")
        >>> x_s, y_s, x_q, y_q = train.sample(16)   # x_s: [16, 20, 1, 28, 28]
    """
    data = load_omniglot(root, split=split, image_size=image_size)
    kw = dict(rotate=rotate, device=device)
    return (
        TaskSampler(data["train"], way, shot, query, seed=seed, **kw),
        TaskSampler(data["test"], way, shot, query, seed=seed + 1, **kw),
    )
