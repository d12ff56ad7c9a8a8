"""CUDA-graph capture of a whole meta-step: inner loop, outer gradient, CG with HVPs and the
optimizer step, replayed as one graph launch.

Nothing inside a meta-step reads a tensor back to the host (no ``.item()``, no data-dependent
Python branching), so the step captures as it is; the optimizer must be capturable
(``torch.optim.Adam(..., capturable=True)``).
"""

from typing import Callable, Sequence

import torch


class CUDAGraphStep:
    """Capture ``step(*batch)`` once on CUDA and replay it for new batches.

    The batch tensors are copied into static buffers before each replay; the returned
    tensors are the graph's static outputs (overwritten by the next call). Capturing runs
    ``warmup`` eager steps on a side stream first (they do update the model: call this on a
    real batch, or reset the model afterwards).

    Args:
        step: ``step(*batch) -> tensor or tuple of tensors``, free of host synchronisation.
        example_batch: CUDA tensors with the shapes and dtypes of every later batch.
        warmup: eager steps before capture (cuBLAS handles, Triton compilation, allocator).

    Example::

        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
        >>> graphed = CUDAGraphStep(lambda *b: meta_step(model, theta, opt, b, lam=2.0, inner=GD(16, 0.1), solve=CG(5)), batch)
        >>> stats = graphed(*next_batch)
    """

    def __init__(self, step: Callable, example_batch: Sequence[torch.Tensor], warmup: int = 3):
        if not all(isinstance(b, torch.Tensor) and b.is_cuda for b in example_batch):
            raise ValueError("CUDAGraphStep needs every batch tensor on a CUDA device")
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

    def __call__(self, *batch):
        if len(batch) != len(self.static):
            raise ValueError(f"expected {len(self.static)} batch tensors, got {len(batch)}")
        for s, b in zip(self.static, batch):
            if b.shape != s.shape or b.dtype != s.dtype:
                raise ValueError(f"batch tensor {tuple(b.shape)} {b.dtype} differs from the captured {tuple(s.shape)} {s.dtype}")
            s.copy_(b, non_blocking=True)
        self.graph.replay()
        return self.out
