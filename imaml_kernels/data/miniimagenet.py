"""MiniImagenet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) split.

100 ImageNet classes x 600 images, 84x84 RGB, split 64 / 16 / 20 classes into
meta-train / meta-validation / meta-test. The images cannot be downloaded
automatically (ImageNet terms), so :func:`convert_miniimagenet` turns either of
the two common distributions into one array format, once:

1. ``SRC/{train,val,test}.csv`` (header ``filename,label``, e.g.
   ``n0153282900000005.jpg,n01532829``) plus ``SRC/images/`` holding the
   files (directly, or in per-label subfolders); images not 84x84 are
   resized with Pillow LANCZOS;
2. ``SRC/mini-imagenet-cache-{train,val,test}.pkl``: a dict with
   ``image_data`` (uint8 ``[N, 84, 84, 3]``) and ``class_dict``
   (``{wnid: [row indices]}``).

Output in ``root``:

* ``miniimagenet_{train,val,test}.npz`` (key ``images``): uint8
  ``[C, n, 84, 84, 3]``, classes sorted by wnid, images of a class in source
  order (CSV rows / ``class_dict`` indices); stored uncompressed because
  zlib gains little on photographs and would make loading several times slower;
* ``miniimagenet_classes.json``: the wnids of each split, the source layout
  and the per-channel ``mean`` / ``std`` (in [0, 1] units) of the train split.

Command line: ``imaml-data miniimagenet --src SRC --root DIR``.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .._atomic import write_text
from .files import resolve_root, save_npz_atomic
from .sampler import TaskSampler

__all__ = [
    "MINIIMAGENET_ENV",
    "MINIIMAGENET_SPLITS",
    "MINIIMAGENET_CLASSES",
    "MINIIMAGENET_PER_CLASS",
    "MINIIMAGENET_SIZE",
    "miniimagenet_root",
    "miniimagenet_npz_name",
    "detect_miniimagenet_layout",
    "convert_miniimagenet",
    "load_miniimagenet",
    "miniimagenet_samplers",
]

MINIIMAGENET_ENV = "IMAML_DATA_MINIIMAGENET"
MINIIMAGENET_SPLITS = ("train", "val", "test")
MINIIMAGENET_CLASSES = {"train": 64, "val": 16, "test": 20}
MINIIMAGENET_PER_CLASS = 600
MINIIMAGENET_SIZE = 84
MINIIMAGENET_CLASSES_JSON = "miniimagenet_classes.json"


def miniimagenet_npz_name(split: str) -> str:
    """``miniimagenet_{split}.npz``."""
    return f"miniimagenet_{split}.npz"


def miniimagenet_root(root: str | os.PathLike | None = None) -> Path:
    """The MiniImagenet folder: ``root``, else ``$IMAML_DATA_MINIIMAGENET``, else the user cache.

    The cache is ``~/.cache/imaml_kernels/miniimagenet`` (``$XDG_CACHE_HOME``
    replaces ``~/.cache`` when set).

    Example:
        >>> miniimagenet_root("/data/mini")
        PosixPath('/data/mini')
    """
    return resolve_root(root, env_var=MINIIMAGENET_ENV, subdir="miniimagenet")[0]


# ----------------------------------------------------------------------------
# Reading the source layouts
# ----------------------------------------------------------------------------


def _pickle_name(split: str) -> str:
    return f"mini-imagenet-cache-{split}.pkl"


def detect_miniimagenet_layout(src: str | os.PathLike) -> str:
    """``"csv"`` or ``"pickle"``: which distribution the folder ``src`` holds.

    Raises:
        FileNotFoundError: neither layout is complete; the message lists the
            files looked for.

    Example:
        >>> detect_miniimagenet_layout("~/Downloads/mini-imagenet")
        'csv'
    """
    src = Path(src).expanduser()
    csvs = [src / f"{s}.csv" for s in MINIIMAGENET_SPLITS]
    pkls = [src / _pickle_name(s) for s in MINIIMAGENET_SPLITS]
    if all(p.is_file() for p in csvs) and (src / "images").is_dir():
        return "csv"
    if all(p.is_file() for p in pkls):
        return "pickle"
    found = sorted(p.name for p in src.iterdir()) if src.is_dir() else "(not a folder)"
    raise FileNotFoundError(
        f"{src} holds neither MiniImagenet layout: expected train.csv, val.csv, test.csv and "
        f"an images/ folder, or {', '.join(p.name for p in pkls)}; found {found}"
    )


def _read_csv(path: Path) -> dict[str, list[str]]:
    """``{label: [filename, ...]}`` in file order."""
    per_class: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or (i == 0 and [c.strip() for c in row] == ["filename", "label"]):
                continue
            if len(row) != 2:
                raise ValueError(f"{path}:{i + 1}: expected 'filename,label', got {row!r}")
            per_class.setdefault(row[1].strip(), []).append(row[0].strip())
    if not per_class:
        raise ValueError(f"{path}: no rows")
    return per_class


def _load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def _find_image(images_dir: Path, label: str, filename: str) -> Path:
    for p in (images_dir / filename, images_dir / label / filename):
        if p.is_file():
            return p
    raise FileNotFoundError(f"image {filename} (class {label}) not found in {images_dir} or {images_dir / label}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle plain containers and numpy arrays only.

    A pickle can run arbitrary code when loaded; the cache files come from
    third-party mirrors, so everything but array reconstruction is refused.
    """

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        # Pickles written by numpy < 2 name numpy.core, which numpy 2 renamed.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a MiniImagenet pickle")
        return getattr(importlib.import_module(module), name)


def _read_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    try:
        with open(path, "rb") as f:
            # latin1: the usual caches were written by Python 2; it maps their
            # byte strings (and numpy buffers) back one-to-one.
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as exc:
        raise ValueError(f"{path}: cannot be unpickled ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a dict with 'image_data' and 'class_dict', found {keys}")
    images, classes = np.asarray(data["image_data"]), data["class_dict"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"{path}: image_data should be uint8 [N, H, W, 3], found {images.dtype} {list(images.shape)}"
        )
    return images, {str(k): [int(i) for i in v] for k, v in classes.items()}


def _check_counts(split: str, sizes: Mapping[str, int], per_class: int | None, where: Path) -> int:
    counts = sorted(set(sizes.values()))
    if len(counts) != 1:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(sizes.items()) if v != max(sizes.values()))
        raise ValueError(
            f"{where}: the {split} classes have unequal image counts {counts} ({detail}); "
            f"every class needs the same number"
        )
    if per_class is not None and counts[0] != per_class:
        raise ValueError(f"{where}: {split} classes have {counts[0]} images each, expected {per_class}")
    return counts[0]


def _histogram_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean / std (in [0, 1]) of uint8 [..., 3] via 256-bin histograms."""
    hist = np.zeros((3, 256), np.int64)
    for c in range(images.shape[0]):  # per class: bounded temporary memory
        for ch in range(3):
            hist[ch] += np.bincount(images[c, ..., ch].ravel(), minlength=256)
    v = np.arange(256, dtype=np.float64) / 255.0
    n = hist.sum(1)
    mean = (hist * v).sum(1) / n
    var = (hist * v**2).sum(1) / n - mean**2
    return mean.tolist(), np.sqrt(np.maximum(var, 0.0)).tolist()


def _convert_csv_split(
    src: Path, split: str, per_class: int | None, progress: bool
) -> tuple[np.ndarray, list[str], Path]:
    """One split of the CSV layout: uint8 [C, n, S, S, 3] (classes sorted), the wnids, the CSV."""
    from tqdm.auto import tqdm

    S = MINIIMAGENET_SIZE
    where = src / f"{split}.csv"
    per = _read_csv(where)
    n = _check_counts(split, {k: len(v) for k, v in per.items()}, per_class, where)
    classes = sorted(per)
    arr = np.empty((len(classes), n, S, S, 3), np.uint8)
    bar = tqdm(total=len(classes) * n, desc=split, unit="img", disable=not progress)
    with bar:
        for c, label in enumerate(classes):
            for i, name in enumerate(per[label]):
                arr[c, i] = _load_image(_find_image(src / "images", label, name), S)
                bar.update(1)
    return arr, classes, where


def _convert_pickle_split(src: Path, split: str, per_class: int | None) -> tuple[np.ndarray, list[str], Path]:
    """One split of the pickle layout: uint8 [C, n, S, S, 3] (classes sorted), the wnids, the pickle."""
    S = MINIIMAGENET_SIZE
    where = src / _pickle_name(split)
    images, per = _read_pickle(where)
    if images.shape[1:] != (S, S, 3):
        raise ValueError(f"{where}: images are {list(images.shape[1:])}, expected [{S}, {S}, 3]")
    _check_counts(split, {k: len(v) for k, v in per.items()}, per_class, where)
    classes = sorted(per)
    bad = [i for v in per.values() for i in v if not 0 <= i < len(images)]
    if bad:
        raise ValueError(
            f"{where}: class_dict indexes rows {bad[:3]} outside image_data ({len(images)} rows)"
        )
    return np.stack([images[per[k]] for k in classes]), classes, where


def _check_disjoint(wnids: Mapping[str, Sequence[str]]) -> None:
    """No class in two splits."""
    seen: dict[str, str] = {}
    for split, classes in wnids.items():
        for k in classes:
            if k in seen:
                raise ValueError(f"class {k} is in both the {seen[k]} and the {split} split")
            seen[k] = split


def convert_miniimagenet(
    src: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    expected_classes: Mapping[str, int] | None = MINIIMAGENET_CLASSES,
    per_class: int | None = MINIIMAGENET_PER_CLASS,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a MiniImagenet distribution in ``src`` into the array format in ``root``.

    Args:
        src: folder with either layout (see the module docstring).
        root: output folder; None resolves like :func:`load_miniimagenet`.
        expected_classes: classes per split to insist on (64 / 16 / 20);
            None skips the check.
        per_class: images per class to insist on (600); None accepts any
            count as long as all classes of a split agree.
        force: convert even if the outputs exist.
        progress: show tqdm bars.

    Returns:
        The resolved ``root``.

    Raises:
        FileNotFoundError: ``src`` has neither layout, or an image is missing.
        ValueError: wrong class / image counts, classes in two splits,
            unreadable pickle, images of the wrong shape.

    Example:
        >>> convert_miniimagenet("~/Downloads/mini-imagenet", "~/data/mini")
        PosixPath('/home/me/data/mini')
    """
    src = Path(src).expanduser()
    root, _ = resolve_root(root, env_var=MINIIMAGENET_ENV, subdir="miniimagenet")
    outputs = [root / miniimagenet_npz_name(s) for s in MINIIMAGENET_SPLITS] + [root / MINIIMAGENET_CLASSES_JSON]
    if not force and all(p.is_file() for p in outputs):
        return root
    layout = detect_miniimagenet_layout(src)

    arrays: dict[str, np.ndarray] = {}
    wnids: dict[str, list[str]] = {}
    for split in MINIIMAGENET_SPLITS:
        if layout == "csv":
            arr, classes, where = _convert_csv_split(src, split, per_class, progress)
        else:
            arr, classes, where = _convert_pickle_split(src, split, per_class)
        if expected_classes is not None and len(classes) != expected_classes[split]:
            raise ValueError(f"{where}: found {len(classes)} {split} classes, expected {expected_classes[split]}")
        arrays[split], wnids[split] = arr, classes
    _check_disjoint(wnids)

    root.mkdir(parents=True, exist_ok=True)
    for split, arr in arrays.items():
        save_npz_atomic(root / miniimagenet_npz_name(split), compressed=False, images=arr)
    mean, std = _histogram_stats(arrays["train"])
    meta = {
        **wnids,
        "mean": mean,
        "std": std,
        "source_layout": layout,
        "note": (
            'Row i of miniimagenet_<split>.npz "images" (uint8 [C, n, 84, 84, 3]) is class '
            "<split>[i] (ImageNet wnid); mean/std are per RGB channel over the train split, in [0, 1] units."
        ),
    }
    # Written last: its presence marks a complete conversion.
    write_text(root / MINIIMAGENET_CLASSES_JSON, json.dumps(meta, indent=1))
    return root


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def _missing_message(root: Path, how: str, missing: Sequence[str]) -> str:
    return (
        f"MiniImagenet not found in {root} ({how}): missing {', '.join(missing)}.\n"
        f"MiniImagenet cannot be downloaded automatically; convert a copy you have with\n"
        f"    imaml-data miniimagenet --src SRC --root {root}\n"
        f"or  python -m imaml_kernels.data miniimagenet --src SRC --root {root}\n"
        f"where SRC holds train.csv, val.csv, test.csv and images/, or "
        f"mini-imagenet-cache-{{train,val,test}}.pkl; or point ${MINIIMAGENET_ENV} (or root=) "
        f"at a converted folder."
    )


def _load_split(path: Path, num_classes: int) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"] if "images" in z.files else None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path}: cannot be read ({type(exc).__name__}: {exc}); the file is truncated or corrupt. "
            f"Convert again with `imaml-data miniimagenet --src SRC --root {path.parent} --force`."
        ) from exc
    S = MINIIMAGENET_SIZE
    if images is None:
        raise ValueError(f"{path}: no array 'images'")
    shape = images.shape
    if images.dtype != np.uint8 or images.ndim != 5 or shape[0] != num_classes or shape[2:] != (S, S, 3):
        raise ValueError(
            f"{path}: expected uint8 [{num_classes}, n, {S}, {S}, 3], found {images.dtype} {list(images.shape)}"
        )
    return images


def load_miniimagenet(
    root: str | os.PathLike | None = None,
    *,
    splits: Sequence[str] = MINIIMAGENET_SPLITS,
    normalize: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Load converted MiniImagenet splits as ``[C, n, 3, 84, 84]`` tensors.

    Args:
        root: data folder: ``root``, else ``$IMAML_DATA_MINIIMAGENET``, else
            ``~/.cache/imaml_kernels/miniimagenet``.
        splits: which of ``"train"``, ``"val"``, ``"test"`` to load (the
            float32 train split alone is 3.3 GB).
        normalize: subtract the per-channel train mean and divide by the train
            std (from ``miniimagenet_classes.json``); otherwise values are in [0, 1].
        dtype: ``torch.float32`` (``x / 255``), or ``torch.uint8`` to keep raw
            bytes, 4x smaller; :class:`TaskSampler` scales uint8 by 1/255 when
            it gathers a batch. ``normalize`` needs float32.

    Returns:
        ``{split: tensor [C, n, 3, 84, 84], f"{split}_classes": [wnid, ...],
        "mean": float32 [3], "std": float32 [3]}``.

    Raises:
        FileNotFoundError: not converted yet; the message says how.
        ValueError: unreadable file, wrong shape / dtype, bad arguments.

    Example:
        >>> data = load_miniimagenet(splits=("train",))
        >>> data["train"].shape, data["train"].dtype
        (torch.Size([64, 600, 3, 84, 84]), torch.float32)
    """
    bad = [s for s in splits if s not in MINIIMAGENET_SPLITS]
    if bad:
        raise ValueError(f"unknown splits {bad}; choose from {MINIIMAGENET_SPLITS}")
    if dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
    if normalize and dtype != torch.float32:
        raise ValueError("normalize=True needs dtype=torch.float32")
    root, how = resolve_root(root, env_var=MINIIMAGENET_ENV, subdir="miniimagenet")
    names = [MINIIMAGENET_CLASSES_JSON] + [miniimagenet_npz_name(s) for s in splits]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(_missing_message(root, how, missing))
    meta_path = root / MINIIMAGENET_CLASSES_JSON
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        mean = torch.tensor(meta["mean"], dtype=torch.float32)
        std = torch.tensor(meta["std"], dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path}: not a valid classes file ({exc})") from exc

    out: dict[str, Any] = {"mean": mean, "std": std}
    for split in splits:
        classes = meta.get(split)
        if not isinstance(classes, list):
            raise ValueError(f"{meta_path}: no class list for '{split}'")
        arr = torch.from_numpy(_load_split(root / miniimagenet_npz_name(split), len(classes)))
        C, n = arr.shape[:2]
        x = torch.empty((C, n, 3, MINIIMAGENET_SIZE, MINIIMAGENET_SIZE), dtype=dtype)
        for c in range(C):  # per class: never holds a second full-size float copy
            xc = arr[c].permute(0, 3, 1, 2)
            if dtype == torch.uint8:
                x[c] = xc
            else:
                x[c] = xc.to(torch.float32).div_(255.0)
                if normalize:
                    x[c].sub_(mean.view(3, 1, 1)).div_(std.view(3, 1, 1))
        out[split] = x
        out[f"{split}_classes"] = classes
    return out


def miniimagenet_samplers(
    way: int,
    shot: int,
    query: int,
    *,
    root: str | os.PathLike | None = None,
    splits: Sequence[str] = MINIIMAGENET_SPLITS,
    normalize: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, TaskSampler]:
    """One :class:`TaskSampler` per split (no rotation); train / val / test seeded ``seed + 0 / 1 / 2``.

    Example:
        >>> s = miniimagenet_samplers(5, 1, 15, splits=("train", "test"), dtype=torch.uint8, device="cuda")
        >>> x_s, y_s, x_q, y_q = s["train"].sample(4)   # x_s: [4, 5, 3, 84, 84] float32
    """
    data = load_miniimagenet(root, splits=splits, normalize=normalize, dtype=dtype)
    return {
        split: TaskSampler(
            data[split], way, shot, query, device=device, seed=seed + MINIIMAGENET_SPLITS.index(split)
        )
        for split in splits
    }
