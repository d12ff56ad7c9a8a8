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
    """The Triton launches of one meta-step of ``config``: the support-set inner loop (two
    proximal steps stand for all: every step launches the same kernels), the query loss's
    linearisation at φ, HVPs and the CG solve of the implicit gradient, on tensors without
    data (``device="meta"``: every ``imaml::`` op runs its fake, which calls the Triton
    launcher with the recording ``wrap``)."""
    import imaml_kernels as ik
    from imaml_kernels import nets, ops

    net_name, way, shot, query, T = CONFIGS[config]
    # The network only gives the engine its structure (parameters are passed flat): built
    # for real on the CPU; every tensor of the step is data-less.
    net = nets.OmniglotConv(way) if net_name == "omniglot" else nets.MiniImagenetConv(way)
    eng = net.batched(backend="triton")
    P = sum(p.numel() for p in net.parameters())
    shape = net.input_shape
    with _shapes_only(device):
        theta = torch.empty(P, device=device, dtype=dtype)
        xs = torch.empty(T, way * shot, *shape, device=device, dtype=dtype)
        ys = torch.zeros(T, way * shot, device=device, dtype=torch.int64)
        xq = torch.empty(T, way * query, *shape, device=device, dtype=dtype)
        yq = torch.zeros(T, way * query, device=device, dtype=torch.int64)
        lam = torch.full((T,), 2.0, device=device, dtype=dtype)

        def run(wrap):
            with ops.record_triton_launches(wrap):
                phi = eng.inner_loop(theta, xs, ys, lam=lam, steps=2, lr=0.1)
                lin = eng.linearize(phi, xq, yq)
                ik.cg_solve(lambda v: v + lin.hvp(v) / 2.0, lin.grad, iters=2, backend="triton")

        launches = record(run)
    for launch in launches:
        launch.config = config
        launch.dtype = {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    return launches
