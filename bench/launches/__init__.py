"""``python -m bench launches``: kernels launched and host synchronisations per iMAML meta-step.

The meta-step runs on *fake* ``cuda`` tensors (``FakeTensorMode``: shapes, dtypes and
devices, no data, no compute) under a counting ``TorchDispatchMode``, so the count is the GPU
code path's (engine stages on Triton, CG on the CUDA kernels, device-side label checks) on any
machine, in seconds. What is counted:

- **launches**: every aten op on a CUDA tensor except the ones that launch nothing (views,
  metadata, ``empty*`` allocations; :data:`NO_KERNEL`, ``func.is_view``, ``Tag.inplace_view``),
  plus each ``imaml::`` op as its kernels: the launches its Triton launcher makes under
  ``imaml_kernels.ops.record_triton_launches`` when that hook exists, else 1. One aten op is
  counted as one kernel (cuBLAS/cuDNN may launch 2-3 for one ``bmm``/``convolution``; a
  ``_foreach_*`` op over the 18 parameters is one or two ``multi_tensor_apply`` launches);
- **host synchronisations** on CUDA tensors, intercepted and answered with a dummy (``True``
  / 1 / empty results) so that the step runs on: ``_local_scalar_dense`` (``.item()``,
  ``bool()``, ``int()``, ``float()``), ``is_nonzero``, ``nonzero``, ``masked_select``,
  ``unique*``, ``equal``, boolean-mask indexing, ``repeat_interleave`` without an output size,
  and every device-to-host copy (``_to_copy``/``copy_`` from ``cuda`` to ``cpu``), each with
  its Python call site;
- separately: host-to-device copies (launches, not syncs) and ops on CPU tensors (Adam's
  step counters: host work, no launch, no sync).

The fused path is the trainer's own ``imaml_kernels.step.meta_step`` (GD inner loop, query
logits through the engine, ``backward()`` into the implicit op's damped CG, Adam with
``foreach=True``: what ``torch.optim.Adam`` picks on real CUDA parameters; the fake ones make
its default fall back to the per-parameter loop). One warm-up step runs first (Adam's state),
the second is counted. The baseline is a per-task loop in the style of public iMAML code
(aravindr93/imaml_dev's ``Learner`` and ``cg_solve``), written here: see
:func:`per_task_meta_step`.

A CPU-only torch has no CUDA device guard or hooks, so its autograd engine cannot run a
backward pass on fake ``cuda`` tensors. The counting then runs in a subprocess that first
loads a stand-in CUDA runtime (:data:`FAKE_CUDA_SOURCE`: a no-op device guard and CUDA hooks
that report "built, not available"; compiled once with the C++ compiler and cached), before
torch is imported. With a CUDA build of torch it runs in this process.

The package, by concern: :mod:`.counter` (the counting dispatch mode), :mod:`.fake_cuda` (the
stand-in runtime), :mod:`.steps` (the fused step and the per-task baseline: the one module
that imports the trainer), :mod:`.counting` (counting a step, in this process or the
subprocess), :mod:`.markdown` (the markdown report and the budget).
"""

from __future__ import annotations

import json
from pathlib import Path

from .counter import NO_KERNEL, SYNC_OPS, LaunchCounter
from .counting import SHAPES, backends, count_spec, count_step, measure, run
from .fake_cuda import FAKE_CUDA_SOURCE, cuda_ready, fake_cuda_library
from .markdown import BUDGET, GOAL, report
from .steps import STEPS, baseline_step, fused_step, per_task_meta_step

__all__ = [
    "BUDGET", "FAKE_CUDA_SOURCE", "GOAL", "NO_KERNEL", "SHAPES", "STEPS", "SYNC_OPS", "LaunchCounter",
    "backends", "baseline_step", "count_spec", "count_step", "cuda_ready", "fake_cuda_library", "fused_step",
    "main", "measure", "per_task_meta_step", "report", "run",
]


def main(args):
    """``python -m bench launches``: count, print the report, write ``--out`` and ``--json``."""
    overrides = {"meta_batch": args.tasks, "inner_steps": args.inner_steps, "cg_iters": args.cg_iters}
    results = run(args.shapes or SHAPES, baseline=not args.no_baseline, overrides=overrides)
    text = report(results, top=args.top)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results
