"""Data for implicit MAML: Omniglot, MiniImagenet and a device-side task sampler.

The path of a meta-batch: arrays on disk (made once by ``imaml-data``) ->
``load_*`` (validated tensors ``[C, N, ch, H, W]``) -> :class:`TaskSampler`
(split moved to the device once; ``sample(T)`` gathers T tasks there).

Example:
    >>> from imaml_kernels.data import omniglot_samplers
    >>> train, test = omniglot_samplers(way=5, shot=1, query=15, device="cuda")
    >>> x_s, y_s, x_q, y_q = train.sample(32)   # [32, 5, 1, 28, 28], [32, 5], ...

Only torch, numpy, the standard library, tqdm and (lazily) Pillow are used.
"""

from .download import convert_omniglot_zips, prepare_omniglot
from .files import resolve_root
from .miniimagenet import (
    convert_miniimagenet,
    detect_miniimagenet_layout,
    load_miniimagenet,
    miniimagenet_root,
    miniimagenet_samplers,
)
from .omniglot import (
    IMAML_SPLIT_SEED,
    load_omniglot,
    load_omniglot_arrays,
    omniglot_root,
    omniglot_samplers,
    omniglot_split,
)
from .sampler import TaskIndices, TaskSampler

__all__ = [
    "TaskSampler",
    "TaskIndices",
    "load_omniglot",
    "load_omniglot_arrays",
    "omniglot_split",
    "omniglot_samplers",
    "omniglot_root",
    "IMAML_SPLIT_SEED",
    "prepare_omniglot",
    "convert_omniglot_zips",
    "load_miniimagenet",
    "miniimagenet_samplers",
    "miniimagenet_root",
    "convert_miniimagenet",
    "detect_miniimagenet_layout",
    "resolve_root",
]
