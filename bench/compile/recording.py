"""Recording the Triton launches of one meta-step without a GPU: on data-less ``meta`` tensors
the paper's networks run one meta-step's engine work inside
:func:`imaml_kernels.ops.record_triton_launches` with a ``wrap`` (:class:`Recorder`) that
records ``(kernel, grid, args, kwargs)`` and launches nothing."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import List, Tuple

import torch

# The paper's configurations (Rajeswaran et al. 2019; imaml_kernels.trainer.presets): name -> (network,
# way, shot, query per class, tasks per meta-step T).
CONFIGS = {
    "omniglot-5w1s": ("omniglot", 5, 1, 1, 32),
    "omniglot-20w1s": ("omniglot", 20, 1, 1, 16),
    "miniimagenet-5w1s": ("miniimagenet", 5, 1, 15, 4),
}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
PAPER_CHANNELS = {"omniglot": 64, "miniimagenet": 32}

# The grid beyond the paper (``python -m bench compile --grid``, tests/test_compile.py): both
# networks at every T, support size and width below, float32 and float64. Users adapt on one
# task, on tiny support sets, on wider nets: T = 1 .. 64; (way, shot) giving 1 .. 100 support
# examples (way 1 and 2 included: a one-row softmax, a two-image batch); channels 16 .. 128,
# 48 and 100 for widths that are not powers of two (100: not a multiple of 16 either). Query
# sets as in the paper: 1 per class (Omniglot), 15 (MiniImagenet).
GRID_T = (1, 2, 8, 32, 64)
GRID_SUPPORT = ((1, 1), (2, 1), (5, 1), (5, 2), (20, 1), (5, 5), (10, 5), (20, 5))
GRID_CHANNELS = (16, 32, 48, 64, 100, 128)
QUERY_PER_CLASS = {"omniglot": 1, "miniimagenet": 15}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One meta-step's shapes: network, tasks ``T``, ``way`` x ``shot`` support examples,
    ``query`` per class, conv ``channels``, ``dtype`` (``"fp32"``/``"fp64"``)."""

    net: str
    T: int
    way: int
    shot: int
    query: int
    channels: int
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.net}-T{self.T}-{self.way}w{self.shot}s-c{self.channels}"


def paper_shape(config: str, dtype: str) -> Shape:
    net, way, shot, query, T = CONFIGS[config]
    return Shape(net, T, way, shot, query, PAPER_CHANNELS[net], dtype)


def grid_shapes(dtypes=tuple(DTYPES)) -> List[Shape]:
    """Every shape of the grid (``2 x 5 x 8 x 6 x 2 = 960`` with both dtypes)."""
    return [Shape(net, T, way, shot, QUERY_PER_CLASS[net], c, dt)
            for dt in dtypes for net in ("omniglot", "miniimagenet") for T in GRID_T
            for way, shot in GRID_SUPPORT for c in GRID_CHANNELS]


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: Tuple[int, ...]
    args: tuple
    kwargs: dict
    config: str = ""
    dtype: str = ""


class Recorder:
    """A ``wrap`` for the launchers: ``Recorder(kernel)[grid](*args, **kwargs)`` appends a
    :class:`Launch` to :attr:`launches` and launches nothing."""

    launches: List[Launch] = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            Recorder.launches.append(Launch(self.kernel, tuple(int(g) for g in grid), args, kwargs))

        return record


def record(fn) -> List[Launch]:
    """The launches ``fn()`` makes through the launchers called with ``wrap=Recorder``."""
    Recorder.launches = []
    try:
        fn(Recorder)
        return list(Recorder.launches)
    finally:
        Recorder.launches = []


@contextlib.contextmanager
def _shapes_only(device):
    """Where the step's tensors live. ``"cuda"`` needs ``FakeTensorMode``, but on a CPU-only
    build of torch a fake CUDA tensor cannot even be sliced; so the default is ``"meta"``
    (shapes only: every op runs its fake), with ``backend="triton"`` let through the dispatch
    check for meta tensors while recording (nothing is launched)."""
    if torch.device(device).type != "meta":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            yield
        return
    from imaml_kernels import dispatch

    if not dispatch.backend_problems("triton", "meta", torch.float32):
        yield
        return
    real = dispatch.backend_problems

    def problems(backend, dev, dtype):
        if backend == "triton" and torch.device(dev).type == "meta":
            return real(backend, "cuda", dtype)
        return real(backend, dev, dtype)

    dispatch.backend_problems = problems
    try:
        yield
    finally:
        dispatch.backend_problems = real


def meta_step_launches(config: str, dtype: torch.dtype, device="meta") -> List[Launch]:
    """The Triton launches of one meta-step of the paper's ``config`` (see :func:`launches`)."""
    launches_ = launches(paper_shape(config, {torch.float32: "fp32", torch.float64: "fp64"}[dtype]), device)
    for launch in launches_:
        launch.config = config
    return launches_


def launches(shape: Shape, device="meta") -> List[Launch]:
    """The Triton launches of one meta-step at ``shape``: the support-set inner loop (two
    proximal steps stand for all: every step launches the same kernels), the query loss's
    linearisation at φ, HVPs and the CG solve of the implicit gradient, on tensors without
    data (``device="meta"``: every ``imaml::`` op runs its fake, which calls the Triton
    launcher with the recording ``wrap``)."""
    import imaml_kernels as ik
    from imaml_kernels import nets, ops

    dtype, T = DTYPES[shape.dtype], shape.T
    # The network only gives the engine its structure (parameters are passed flat): built
    # for real on the CPU; every tensor of the step is data-less.
    net = (nets.OmniglotConv if shape.net == "omniglot" else nets.MiniImagenetConv)(shape.way, channels=shape.channels)
    eng = net.batched(backend="triton")
    P = sum(p.numel() for p in net.parameters())
    n_s, n_q = shape.way * shape.shot, shape.way * shape.query
    with _shapes_only(device):
        theta = torch.empty(P, device=device, dtype=dtype)
        xs = torch.empty(T, n_s, *net.input_shape, device=device, dtype=dtype)
        ys = torch.zeros(T, n_s, device=device, dtype=torch.int64)
        xq = torch.empty(T, n_q, *net.input_shape, device=device, dtype=dtype)
        yq = torch.zeros(T, n_q, device=device, dtype=torch.int64)
        lam = torch.full((T,), 2.0, device=device, dtype=dtype)

        def run(wrap):
            with ops.record_triton_launches(wrap):
                phi = eng.inner_loop(theta, xs, ys, lam=lam, steps=2, lr=0.1)
                lin = eng.linearize(phi, xq, yq)
                ik.cg_solve(lambda v: v + lin.hvp(v) / 2.0, lin.grad, iters=2, backend="triton")

        recorded = record(run)
    for launch in recorded:
        launch.config, launch.dtype = shape.name, shape.dtype
    return recorded
