"""CUDA-graph capture of a whole meta-step: inner loop, outer gradient, CG with HVPs and the
optimizer step, replayed as one graph launch.

Nothing inside a meta-step reads a tensor back to the host (no ``.item()``, no data-dependent
Python branching), so the step captures as it is; the optimizer must be capturable
(``torch.optim.Adam(..., capturable=True)``) and, for a learning-rate schedule to reach the
replays, its ``lr`` a tensor on the device: a Python float is baked into the graph at capture
(every replay steps with the value it had then, whatever the schedule sets later).
"""

from typing import Callable, Sequence

import torch


def _forget_engine_data():
    """Drops the fused engines' per-data caches (the last inner loop's prepared support set and
    its output). Those made while capturing live in the graph's memory, which only a replay
    writes: an eager call on the same static input right after capture would read them
    unwritten."""
    from .engine import net as engine_net

    for nets in list(engine_net._NETS.values()):
        for net in nets.values():
            net._last_data = None
            net._last_inner = None


class CUDAGraphStep:
    """Capture ``step(*batch)`` once on CUDA and replay it for new batches.

    The batch tensors are copied into static buffers before each replay; the returned
    tensors are the graph's static outputs (overwritten by the next call). Capturing runs
    ``warmup`` eager steps on a side stream first (they do update the model: call this on a
    real batch, or reset the model afterwards).

    Args:
        step: ``step(*batch) -> tensor or tuple of tensors``, free of host synchronisation.
        example_batch: tensors on one CUDA device with the shapes and dtypes of every later
            batch (later batches must be on that device too: a copy from pinned host memory
            with ``non_blocking=True`` would race with the caller reusing the host buffer).
        warmup: eager steps before capture, at least 1: Triton compilation, module loading,
            cuBLAS handles and the engine's device caches must exist before capture, not be
            made inside it (in graph memory that only a replay writes).

    Example (a tensor ``lr``: a schedule that sets ``group["lr"].fill_(v)`` reaches the replays)::

        >>> opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
        >>> graphed = CUDAGraphStep(lambda *b: meta_step(model, theta, opt, b, lam=2.0, inner=GD(16, 0.1), solve=CG(5)), batch)
        >>> stats = graphed(*next_batch)
    """

    def __init__(self, step: Callable, example_batch: Sequence[torch.Tensor], warmup: int = 3):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"CUDAGraphStep needs warmup >= 1 eager steps before capture, got {warmup!r}")
        if not example_batch or not all(isinstance(b, torch.Tensor) and b.is_cuda for b in example_batch):
            raise ValueError("CUDAGraphStep needs every batch tensor on a CUDA device")
        devices = {b.device for b in example_batch}
        if len(devices) > 1:
            raise ValueError(f"CUDAGraphStep needs the batch on one CUDA device, got {sorted(map(str, devices))}")
        self.device = devices.pop()
        with torch.cuda.device(self.device):
            self.static = [b.clone() for b in example_batch]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step(*self.static)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = step(*self.static)
        _forget_engine_data()

    def __call__(self, *batch):
        if len(batch) != len(self.static):
            raise ValueError(f"expected {len(self.static)} batch tensors, got {len(batch)}")
        for s, b in zip(self.static, batch):
            if not isinstance(b, torch.Tensor) or b.device != s.device:
                where = b.device if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"batch tensor on {where}: the graph was captured on {s.device}; move it there first")
            if b.shape != s.shape or b.dtype != s.dtype:
                raise ValueError(f"batch tensor {tuple(b.shape)} {b.dtype} differs from the captured {tuple(s.shape)} {s.dtype}")
        with torch.cuda.device(self.device):
            for s, b in zip(self.static, batch):
                s.copy_(b, non_blocking=True)
            self.graph.replay()
        return self.out
