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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .common import machine_header, markdown_table

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("omniglot-5w1s", "omniglot-20w1s")
BUDGET = 800  # launches per 5-way 1-shot meta-step (the target; goal 500)
GOAL = 500

# aten ops that launch no kernel (allocation without initialisation, metadata, aliasing)
# beyond those with ``is_view`` / ``Tag.inplace_view``.
NO_KERNEL = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
    "_unsafe_view", "lift_fresh", "resize_", "set_", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream",
    "_assert_tensor_metadata", "_version", "dim", "size", "stride", "numel", "storage_offset",
    "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "_nested_tensor_size",
})
# aten ops whose result (or output shape) needs the device's data on the host.
SYNC_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_numpy", "argwhere", "masked_select",
    "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "equal", "allclose", "bincount",
})


_COMPREHENSIONS = frozenset({"<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>"})
# This module's own frames, left out of call sites.
_MACHINERY = frozenset({"__torch_dispatch__", "_stack", "_site", "_record", "_run_or_dummy", "host_sync", "<lambda>",
                        "count_step", "count_spec", "_child_main", "measure", "run", "main"})


def _device_types(tree):
    return {t.device.type for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


def _shape(t):
    return "x".join(map(str, t.shape)) or "scalar"


def _layout(op, args):
    """For the copies (``clone``, ``copy_``): what is copied, e.g. ``32x64 strided (113221, 1)``
    (a column block of a flat [T, P] buffer) or ``32x64 -> 32x64 strided (113221, 1)``."""
    def desc(t):
        return _shape(t) + ("" if t.is_contiguous() else f" strided {tuple(t.stride())}")

    if op == "clone" and isinstance(args[0], torch.Tensor):
        return desc(args[0])
    if op == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return f"{desc(args[1])} -> {desc(args[0])}"
    return None


def _dummy_scalar(t):
    if t.dtype == torch.bool:
        return True
    if t.is_complex():
        return 1 + 0j
    return 1.0 if t.is_floating_point() else 1


class _Launcher:
    """``wrap(kernel)`` for ``record_triton_launches``: ``wrap(kernel)[grid](*args)`` counts."""

    def __init__(self, counter, kernel):
        self.counter, self.kernel = counter, kernel

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        self.counter._triton_launch(self.kernel)


class LaunchCounter(TorchDispatchMode):
    """Counts kernel launches and host synchronisations of the ops it sees (see the module doc).

    Enter it *inside* a ``FakeTensorMode`` (it must sit above it on the mode stack) or on
    real tensors; use :meth:`triton_hook` around the step to count ``imaml::`` ops' kernels.

    Attributes:
        calls, kernels: ``Counter`` op name -> calls / kernels launched (CUDA tensors).
        sites: op name -> ``Counter`` call site -> kernels (when ``sites=True``); layouts:
            ``(op, site)`` -> ``Counter`` of what ``clone``/``copy_`` copied there; phases:
            ``Counter`` outermost frames (:meth:`_phase`) -> kernels.
        syncs: ``[(op, detail, site)]`` host synchronisations on CUDA tensors.
        h2d: ``Counter`` call site -> host-to-device copies (included in ``kernels``).
        host_ops: ``Counter`` op name -> ops on CPU tensors only (no launch).
        free: ``Counter`` op name -> ops that launch nothing (views, metadata, allocations).
        triton: ``Counter`` Triton kernel name -> launches (with the hook).
    """

    def __init__(self, sites: bool = True, depth: int = 4):
        super().__init__()
        self.record_sites, self.depth = sites, depth
        self.calls, self.kernels, self.host_ops, self.free, self.triton = Counter(), Counter(), Counter(), Counter(), Counter()
        self.h2d = Counter()
        self.sites = defaultdict(Counter)
        self.layouts = defaultdict(Counter)
        self.phases = Counter()
        self.syncs = []
        self.hooked = False
        self._pending = 0

    # ---------------------------------------------------------------- results

    @property
    def total(self) -> int:
        return sum(self.kernels.values())

    def result(self) -> dict:
        return {
            "launches": self.total,
            "ops": sum(self.calls.values()),
            "by_op": {k: [self.calls[k], self.kernels[k]] for k, _ in self.kernels.most_common()},
            "sites": {k: [[" < ".join(s), n, dict(self.layouts[k, s].most_common())] for s, n in c.most_common()]
                      for k, c in self.sites.items()},
            "syncs": [{"op": op, "detail": d, "site": " < ".join(s), "count": n}
                      for (op, d, s), n in Counter(self.syncs).most_common()],
            "sync_count": len(self.syncs),
            "phases": dict(self.phases.most_common()),
            "h2d": [[" < ".join(s), n] for s, n in self.h2d.most_common()],
            "host_ops": dict(self.host_ops.most_common()),
            "free_ops": sum(self.free.values()),
            "triton": dict(self.triton.most_common()),
            "triton_hook": self.hooked,
        }

    # ---------------------------------------------------------------- imaml ops' kernels

    def triton_hook(self):
        """``imaml_kernels.ops.record_triton_launches(wrap)`` with a counting ``wrap``, or a
        no-op context (each ``imaml::`` op then counts as one kernel) while it does not exist."""
        from imaml_kernels import ops

        record = getattr(ops, "record_triton_launches", None)
        if record is None:
            return contextlib.nullcontext()
        self.hooked = True
        return record(lambda kernel: _Launcher(self, kernel))

    def _triton_launch(self, kernel):
        self._pending += 1
        k = kernel
        while not hasattr(k, "__name__") and hasattr(k, "fn"):  # Autotuner / Heuristics -> JITFunction
            k = k.fn
        self.triton[getattr(k, "__name__", type(k).__name__)] += 1

    def host_sync(self, what):
        """Record an explicit synchronisation (``torch.cuda.synchronize()`` and the like)."""
        self.syncs.append((what, "explicit synchronisation", self._site()))

    @contextlib.contextmanager
    def explicit_syncs(self):
        """Count ``torch.cuda.synchronize``, ``torch.accelerator.synchronize`` and
        ``Stream``/``Event.synchronize`` calls (they are no ops, a dispatch mode misses them)."""
        patches = [(torch.cuda, "synchronize", "torch.cuda.synchronize"),
                   (torch.cuda.Stream, "synchronize", "torch.cuda.Stream.synchronize"),
                   (torch.cuda.Event, "synchronize", "torch.cuda.Event.synchronize")]
        if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "synchronize"):
            patches.append((torch.accelerator, "synchronize", "torch.accelerator.synchronize"))
        patches = [(obj, attr, what) for obj, attr, what in patches if hasattr(obj, attr)]
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
        try:
            for obj, attr, what in patches:
                setattr(obj, attr, lambda *a, _what=what, **k: self.host_sync(_what))
            yield self
        finally:
            for obj, attr, fn in saved:
                setattr(obj, attr, fn)

    # ---------------------------------------------------------------- call sites

    def _stack(self):
        """This repository's frames of the current Python stack, innermost first, as
        ``(path, line, function)`` (comprehensions folded into the function around them, this
        module's machinery left out), and the autograd node being run (None outside backward)."""
        frames = []
        f = sys._getframe(2)
        here = __file__
        root = str(ROOT) + os.sep
        while f is not None:
            name, fn = f.f_code.co_filename, f.f_code.co_name
            if name.startswith(root) and fn not in _COMPREHENSIONS and not (name == here and fn in _MACHINERY):
                frames.append((os.path.relpath(name, ROOT), f.f_lineno, fn))
            f = f.f_back
        node = torch._C._current_autograd_node()
        return frames, (node.name() if node is not None else None)

    def _site(self, stack=None):
        """The innermost ``depth`` frames: ``("path:line function [AutogradNode]", ...)``."""
        frames, node = stack or self._stack()
        out = [f"{p}:{ln} {fn}" for p, ln, fn in frames[: self.depth]]
        if node is not None and not out:
            out.append(f"autograd {node}")
        elif node is not None:
            out[0] += f" [{node}]"
        return tuple(out) or ("<no Python frame>",)

    @staticmethod
    def _phase(stack):
        """Which part of the step an op belongs to: its outermost two frames (``function:line >
        function:line``), or in the backward pass the autograd node and its outermost frame."""
        frames, node = stack
        outer = " > ".join(f"{fn}:{ln}" for _, ln, fn in frames[::-1][: 1 if node is not None else 2])
        return f"[{node}] {outer}".strip() if node is not None else (outer or "<no Python frame>")

    def _record(self, name, k, what=None):
        self.calls[name] += 1
        self.kernels[name] += k
        if self.record_sites:
            stack = self._stack()
            site = self._site(stack)
            self.sites[name][site] += k
            self.phases[self._phase(stack)] += k
            if what:
                self.layouts[name, site][what] += k

    # ---------------------------------------------------------------- dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, op = func.namespace, func._opname
        name = f"{ns}::{op}"
        if ns == "prim" or (ns == "aten" and (op in NO_KERNEL or func.is_view or torch.Tag.inplace_view in func.tags)):
            self.free[name] += 1
            return func(*args, **kwargs)
        devs_in = _device_types((args, kwargs))
        if ns == "aten" and op in ("_to_copy", "copy_", "_copy_from", "_copy_from_and_resize") and "cuda" in devs_in:
            out = func(*args, **kwargs)
            src = args[1] if op == "copy_" else args[0]
            dst = {"copy_": args[0], "_to_copy": out}.get(op, args[1] if len(args) > 1 else out)
            if src.device.type == "cuda" and dst.device.type == "cpu":
                nb = bool(kwargs.get("non_blocking", False) or (op == "copy_" and len(args) > 2 and args[2]))
                self.syncs.append((name, "device-to-host copy" + (" (non_blocking)" if nb else ""), self._site()))
                self._record(name, 1)
                return out
            if src.device.type == "cpu" and dst.device.type == "cuda":
                self.h2d[self._site()] += 1
            self._record(name, 1, _layout(op, args) if self.record_sites else None)
            return out
        if ns == "aten" and (op in SYNC_OPS or self._is_sync_indexing(op, args, kwargs)):
            if "cuda" not in devs_in:
                self.host_ops[name] += 1
                return self._run_or_dummy(func, op, args, kwargs)
            self.syncs.append((name, "reads device data on the host", self._site()))
            out = self._run_or_dummy(func, op, args, kwargs)
            if op not in ("_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"):
                self._record(name, 1)  # the op itself also runs on the device
            return out
        if ns == "imaml":
            self._pending = 0
            out = func(*args, **kwargs)
            self._record(name, self._pending if self._pending > 0 else 1)
            return out
        out = func(*args, **kwargs)
        if "cuda" in devs_in | _device_types(out):
            self._record(name, 1, _layout(op, args) if self.record_sites else None)
        else:
            self.host_ops[name] += 1
        return out

    @staticmethod
    def _is_sync_indexing(op, args, kwargs):
        """Boolean-mask indexing (its CUDA kernels call ``nonzero``; ``x[mask] = scalar`` goes to
        ``masked_fill_`` and does not) and ``repeat_interleave`` without ``output_size``."""
        if op == "repeat_interleave":
            return kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) and len(args) < 4
        if op in ("index", "index_put", "index_put_", "_index_put_impl_"):
            idx = [i for i in (args[1] if len(args) > 1 else ()) or () if i is not None]
            if not any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                return False
            value = args[2] if len(args) > 2 else None
            masked_fill = (op != "index" and len(idx) == 1 and isinstance(value, torch.Tensor) and value.numel() == 1
                           and value.device.type == "cpu")
            return not masked_fill
        return False

    @staticmethod
    def _run_or_dummy(func, op, args, kwargs):
        from torch._subclasses.fake_tensor import (
            DataDependentOutputException,
            DynamicOutputShapeException,
        )

        try:
            return func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            pass
        x = args[0]
        if op in ("_local_scalar_dense", "item"):
            return _dummy_scalar(x)
        if op in ("is_nonzero", "equal", "allclose"):
            return True
        if op in ("nonzero", "argwhere"):
            return torch.empty((0, x.dim()), dtype=torch.long, device=x.device)
        if op in ("masked_select", "repeat_interleave"):
            return (x if isinstance(x, torch.Tensor) else args[1]).new_empty((0,))
        if op == "index":  # boolean-mask indexing: [number of True, *remaining dims]
            masks = [i for i in args[1] if i is not None]
            k = sum(i.dim() if i.dtype == torch.bool else 1 for i in masks)
            return x.new_empty((0, *x.shape[k:]))
        raise RuntimeError(f"bench.launches: no dummy result for the host-synchronising op aten::{op}")


# ------------------------------------------------------------------------ the two meta-steps


def _config(shape, **overrides):
    from imaml_kernels.trainer.presets import resolve_config

    return resolve_config(shape, {k: v for k, v in overrides.items() if v is not None})


def _fake_cuda_model(cfg):
    """The preset's network, initialised on the CPU (seed 0), as fake CUDA parameters."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from imaml_kernels.trainer.builders import build_model

    with unset_fake_temporarily():  # a real module first: fake CPU parameters would be swapped, not replaced
        torch.manual_seed(0)
        model = build_model(cfg)
    return model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda"))


def _fake_batch(cfg):
    T, way = cfg["meta_batch"], cfg["way"]
    xs = torch.randn(T, way * cfg["shot"], 1, 28, 28, device="cuda")
    xq = torch.randn(T, way * cfg["query"], 1, 28, 28, device="cuda")
    ys = torch.randint(0, way, (T, way * cfg["shot"]), device="cuda")
    yq = torch.randint(0, way, (T, way * cfg["query"]), device="cuda")
    return xs, ys, xq, yq


def _optimizer(model, cfg):
    # foreach=True: the default torch.optim picks for real CUDA parameters (it falls back to
    # the per-parameter loop for fake ones). Not capturable: the step counters stay on the
    # host, as in the trainer.
    return torch.optim.Adam(model.parameters(), lr=cfg["outer_lr"], foreach=True)


def fused_step(cfg):
    """``step()``: one call of the trainer's ``meta_step`` on the preset's shapes."""
    from imaml_kernels.step import meta_step
    from imaml_kernels.trainer.builders import build_backward_solve, build_solver

    model = _fake_cuda_model(cfg)
    theta = dict(model.named_parameters())
    opt, solver, batch = _optimizer(model, cfg), build_solver(cfg), _fake_batch(cfg)
    solve = build_backward_solve(cfg)
    return lambda: meta_step(model, theta, opt, batch, lam=cfg["lam"], inner=solver, solve=solve)


def per_task_meta_step(model, optimizer, batch, cfg, residual_tol=1e-10):
    """One meta-step the way public iMAML code writes it (aravindr93/imaml_dev: ``Learner``,
    ``utils.cg_solve``), on the same damped system as the trainer:

    for each task: copy θ into the fast weights; ``inner_steps`` proximal GD steps, each a
    forward, ``torch.autograd.grad`` and a per-parameter update; the query gradient, flattened;
    CG from x = 0 on ``A v = (1+c) v + H v / (λ+d)``, every product a fresh double backward
    through the support loss on a flat vector, with the residual test ``r·r < tol`` read back
    every iteration; ``meta_grad += x / T``. Then the flat meta-gradient is copied into
    ``p.grad`` and the outer optimizer steps.
    """
    from torch.func import functional_call

    xs, ys, xq, yq = batch
    names, params = zip(*model.named_parameters())
    lam, lr, c, d = cfg["lam"], cfg["inner_lr"], cfg["cg_damping"], cfg["lam_damping"]
    w0 = torch.cat([p.detach().view(-1) for p in params])  # get_params()
    sizes = [p.numel() for p in params]
    T = xs.shape[0]
    meta_grad = torch.zeros_like(w0)

    def loss_at(fast, x, y):
        return F.cross_entropy(functional_call(model, dict(zip(names, fast)), (x,)), y)

    def flat(gs):
        return torch.cat([g.contiguous().view(-1) for g in gs])

    for t in range(T):
        fast = [p.detach().clone().requires_grad_() for p in params]  # set_params(w_k.clone())
        for _ in range(cfg["inner_steps"]):
            reg, off = 0.0, 0
            for p, n in zip(fast, sizes):  # regularization_loss(w_0, lam)
                reg = reg + 0.5 * lam * torch.sum((p.view(-1) - w0[off:off + n]) ** 2)
                off += n
            grads = torch.autograd.grad(loss_at(fast, xs[t], ys[t]) + reg, fast)
            with torch.no_grad():
                for p, g in zip(fast, grads):
                    p.add_(g, alpha=-lr)
        b = flat(torch.autograd.grad(loss_at(fast, xq[t], yq[t]), fast))

        def matvec(v, fast=fast, t=t):  # Learner.matrix_evaluator / hessian_vector_product
            g1 = flat(torch.autograd.grad(loss_at(fast, xs[t], ys[t]), fast, create_graph=True))
            hv = flat(torch.autograd.grad(torch.sum(g1 * v), fast))
            return (1.0 + c) * v + hv / (lam + d)

        x = torch.zeros_like(b)  # utils.cg_solve(f_Ax, b, cg_iters, x_init=None)
        r = b - matvec(x)
        p = r.clone()
        for _ in range(cfg["cg_iters"]):
            rdotr = r.dot(r)
            Ap = matvec(p)
            alpha = rdotr / p.dot(Ap)
            x = x + alpha * p
            r = r - alpha * Ap
            newrdotr = r.dot(r)
            p = r + (newrdotr / rdotr) * p
            if newrdotr.item() < residual_tol:  # imaml_dev: `if newrdotr < residual_tol`; a host sync
                break
        meta_grad += x.detach() / T
    off = 0
    for p, n in zip(params, sizes):  # outer_step_with_grad(meta_grad, flat_grad=True)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(meta_grad[off:off + n].view_as(p))
        off += n
    optimizer.step()


def baseline_step(cfg):
    """``step()``: one :func:`per_task_meta_step` on the preset's shapes."""
    model = _fake_cuda_model(cfg)
    opt, batch = _optimizer(model, cfg), _fake_batch(cfg)
    return lambda: per_task_meta_step(model, opt, batch, cfg)


STEPS = {"fused": fused_step, "baseline": baseline_step}


# ------------------------------------------------------------------------ counting


def count_step(make_step, *, warmup: int = 1, sites: bool = True) -> dict:
    """Build ``make_step()`` on fake CUDA tensors, run ``warmup`` steps, count the next one.

    Needs a torch on which fake ``cuda`` tensors can go through autograd (a CUDA build, or
    this process started with the stand-in runtime: :func:`cuda_ready`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    with FakeTensorMode():
        step = make_step()
        for _ in range(warmup):
            with LaunchCounter(sites=False):  # answers host reads with dummies; discarded
                step()
        counter = LaunchCounter(sites=sites)
        with counter.triton_hook(), counter.explicit_syncs(), counter:
            step()
    out = counter.result()
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def backends() -> dict:
    """The backends the GPU path dispatches to for CUDA float32: CG kernels and engine stages."""
    from imaml_kernels import dispatch

    k = dispatch.kernels("cuda", torch.float32)
    return {"cg": k.backend, "engine": k.engine_backend}


def cuda_ready() -> bool:
    """Whether fake ``cuda`` tensors can run a backward pass in this process."""
    if torch.backends.cuda.is_built():
        return True
    acc = torch._C._accelerator_getAccelerator()
    return acc is not None and acc.type == "cuda"


FAKE_CUDA_SOURCE = r"""
// A stand-in CUDA runtime for counting ops on fake "cuda" tensors with a CPU-only torch:
// a device guard (streams and events are no-ops) and CUDA hooks that report "built, not
// available", so that the autograd engine's stream bookkeeping runs. Nothing can execute on
// it: every tensor must be a FakeTensor. Load it before torch is imported.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace imaml_fake {
struct CUDAHooks : public at::CUDAHooksInterface {
  explicit CUDAHooks(at::CUDAHooksArgs) {}
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return false; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  void init() const override {}
  c10::DeviceIndex deviceCount() const override { return 1; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  void setCurrentDevice(c10::DeviceIndex) const override {}
  c10::DeviceIndex current_device() const override { return 0; }
  int getNumGPUs() const override { return 1; }
};
}  // namespace imaml_fake

namespace at {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", imaml_fake::CUDAHooks)
}

static bool registered_guard = [] {
  if (c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA)) return false;
  static c10::impl::DeviceGuardImplRegistrar reg(
      c10::DeviceType::CUDA, new c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>());
  return true;
}();

extern "C" int imaml_fake_cuda_guard_registered() { return registered_guard ? 1 : 0; }
"""


def fake_cuda_library() -> Path:
    """The compiled :data:`FAKE_CUDA_SOURCE` for this torch (built once, then cached under
    ``$IMAML_CACHE`` or ``~/.cache/imaml_kernels``)."""
    tdir = Path(torch.__file__).parent
    key = hashlib.sha1(f"{FAKE_CUDA_SOURCE}{torch.__version__}{tdir}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("IMAML_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imaml_kernels")
    so = cache / f"fakecuda-{key}.so"
    if so.exists():
        return so
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"fakecuda-{key}.cpp"
    src.write_text(FAKE_CUDA_SOURCE)
    tmp = so.with_name(f".{so.name}.{os.getpid()}")
    cmd = [
        os.environ.get("CXX", "c++"), "-O1", "-shared", "-fPIC", "-std=c++20", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-I", str(tdir / "include"),
        str(src), "-L", str(tdir / "lib"), "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{tdir / 'lib'}", "-o", str(tmp),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise RuntimeError(f"bench.launches: no C++ compiler ({cmd[0]}) to build the stand-in CUDA runtime") from exc
    if proc.returncode:
        raise RuntimeError(f"bench.launches: building the stand-in CUDA runtime failed:\n{proc.stderr[-3000:]}")
    os.replace(tmp, so)
    return so


_MARK = "@@bench.launches@@"
_CHILD = (
    "import ctypes, sys; ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)\n"
    "from bench.launches import _child_main; _child_main()\n"
)


def _child_main():
    specs = json.loads(sys.stdin.read())
    out = [count_spec(s) for s in specs]
    sys.stdout.write(_MARK + json.dumps(out) + "\n")


def _resolve(target):
    import importlib

    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def _linear(r1, r2, T):
    """The count at ``T`` tasks from the counts at 1 and 2 tasks (``a + b T``): exact for the
    per-task baseline, whose loop body is the same for every task."""
    def ext(a, b):
        return a + (T - 1) * (b - a)

    out = dict(r2)
    out["launches"], out["ops"] = ext(r1["launches"], r2["launches"]), ext(r1["ops"], r2["ops"])
    out["sync_count"] = ext(r1["sync_count"], r2["sync_count"])
    keys = dict.fromkeys([*r2["by_op"], *r1["by_op"]])
    out["by_op"] = {k: [ext(*(r.get(k, [0, 0])[j] for r in (r1["by_op"], r2["by_op"]))) for j in (0, 1)] for k in keys}
    out["by_op"] = dict(sorted(out["by_op"].items(), key=lambda kv: -kv[1][1]))
    s1 = {(x["op"], x["detail"], x["site"]): x["count"] for x in r1["syncs"]}
    out["syncs"] = [{**x, "count": ext(s1.get((x["op"], x["detail"], x["site"]), 0), x["count"])} for x in r2["syncs"]]
    out["h2d"] = [[site, ext(0, n)] for site, n in r2["h2d"]] if r2["h2d"] else []
    out["sites"], out["phases"] = {}, {}
    out["seconds"] = round(r1["seconds"] + r2["seconds"], 2)
    out["extrapolated_from"] = [1, 2]
    return out


def count_spec(spec) -> dict:
    """Count one spec (see :func:`measure`) in this process (needs :func:`cuda_ready`)."""
    kind = spec["kind"]
    cfg = _config(spec.get("shape", "omniglot-5w1s"), **spec.get("overrides", {}))
    make = _resolve(spec["target"]) if kind == "custom" else STEPS[kind]
    T = cfg["meta_batch"]
    sites = spec.get("sites", kind != "baseline")
    if kind == "baseline" and spec.get("extrapolate", True) and T > 2:
        r1, r2 = (count_step(lambda c=dict(cfg, meta_batch=t): make(c), sites=False) for t in (1, 2))
        res = _linear(r1, r2, T)
    else:
        res = count_step(lambda: make(cfg), warmup=spec.get("warmup", 1), sites=sites)
    res.update(kind=kind, shape=cfg["preset"], backends=backends(),
               config={k: cfg[k] for k in ("way", "shot", "query", "meta_batch", "inner_steps", "inner_lr", "lam",
                                           "cg_iters", "cg_damping", "lam_damping")})
    return res


def measure(specs, timeout: float = 1800) -> list:
    """Count each spec: ``{"kind": "fused" | "baseline" | "custom", "shape": preset name,
    "overrides": {config key: value}, "sites": bool, "extrapolate": bool, "target":
    "module:function"}`` (``custom``: ``function(cfg)`` returns the ``step()`` to count,
    built on fake CUDA tensors). The baseline is counted at 1 and 2 tasks and extrapolated
    (:func:`_linear`) unless ``extrapolate`` is False.

    Runs in this process when :func:`cuda_ready`, else in one subprocess that loads the
    stand-in CUDA runtime first. Returns one :meth:`LaunchCounter.result` dict per spec, plus
    ``kind``, ``shape``, ``config``, ``backends`` and ``seconds``."""
    if cuda_ready():
        return [count_spec(s) for s in specs]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(fake_cuda_library())], input=json.dumps(specs), capture_output=True,
        text=True, cwd=str(ROOT), env=env, timeout=timeout, check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench.launches: the counting subprocess failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len(_MARK):])


# ------------------------------------------------------------------------ report


def _n(x):
    return f"{x:,}"


def _revision():
    """``<commit>`` of the checkout, ``+ local changes`` when ``imaml_kernels/`` differs from it."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "imaml_kernels"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + (" + local changes in imaml_kernels/" if dirty else "")


def report(results, header=None, top=15, sites_per_op=6, every_site=("aten::clone", "aten::copy_")) -> str:
    """The markdown report of :func:`measure`'s results."""
    header = header or machine_header()
    fused = {r["shape"]: r for r in results if r["kind"] == "fused"}
    base = {r["shape"]: r for r in results if r["kind"] == "baseline"}
    hooked = any(r["triton_hook"] for r in results)
    rev = _revision()
    lines = [
        "# Kernel launches and host synchronisations per meta-step (GPU code path)",
        "",
        header + (f" | code {rev}" if rev else ""),
        "",
        "`python -m bench launches` (`bench/launches.py`): the meta-step runs on fake `cuda` tensors "
        "(FakeTensorMode: no data, no compute) under a counting TorchDispatchMode. *Kernel launches*: aten ops on "
        "CUDA tensors except views, metadata and `empty*` allocations, one kernel each (cuBLAS may use 2 for a GEMM); "
        "`imaml::` ops as their Triton launches "
        + ("(counted through `imaml_kernels.ops.record_triton_launches`)." if hooked else
           "(1 each: `imaml_kernels.ops.record_triton_launches` is not there yet).")
        + " *Host syncs*: `.item()`/`bool()`/`int()` (`_local_scalar_dense`), `nonzero`, `masked_select`, `unique*`, "
        "`equal`, boolean-mask indexing, device-to-host copies and `synchronize()` calls. One warm-up step (Adam's "
        "state), then one counted step. Adam `foreach=True` (its default on CUDA parameters), step counters on "
        "the host as in the trainer: CPU-tensor ops, neither launches nor syncs. Task sampling is outside the "
        "meta-step and not counted. The baseline is counted at T = 1 and 2 and extrapolated linearly (exact: "
        "the loop body is the same for every task).",
        "",
    ]
    rows = []
    for shape in dict.fromkeys(r["shape"] for r in results):
        for kind, d in (("fused: trainer `meta_step`", fused), ("per-task baseline (imaml_dev style)", base)):
            r = d.get(shape)
            if r is None:
                continue
            c = r["config"]
            rows.append((kind, shape, c["meta_batch"], c["inner_steps"], c["cg_iters"], _n(r["launches"]), _n(r["ops"]),
                         _n(r["sync_count"]), sum(n for _, n in r["h2d"]), sum(r["host_ops"].values())))
    lines.append(markdown_table(
        ("path", "shape", "T", "inner steps", "CG iters", "kernel launches", "launching ops", "host syncs",
         "H2D copies", "CPU-tensor ops"), rows))
    lines.append("")
    for shape in fused:
        if shape in base:
            lines.append(f"- {shape}: the baseline launches {base[shape]['launches'] / fused[shape]['launches']:.0f}x "
                         f"as many kernels as the fused path.")
    f5 = fused.get("omniglot-5w1s")
    if f5 is not None:
        ok = f5["launches"] <= BUDGET and not f5["sync_count"]
        lines.append(f"- Budget at 5-way 1-shot (<= {BUDGET} launches, goal <= {GOAL}; 0 host syncs): "
                     f"{'met' if ok else 'not met'} ({_n(f5['launches'])} launches, {f5['sync_count']} syncs).")
    b = next(iter(fused.values()), None)
    if b is not None:
        lines.append(f"- Backends for CUDA float32: CG `{b['backends']['cg']}`, engine stages `{b['backends']['engine']}`.")
    for shape, r in fused.items():
        lines += ["", f"## Fused {shape}: launches by op (top {top})", ""]
        tot = r["launches"]
        rows = [(f"`{op}`", calls, kern, f"{100 * kern / tot:.1f}%") for op, (calls, kern) in list(r["by_op"].items())[:top]]
        rest = sum(k for _, (_, k) in list(r["by_op"].items())[top:])
        rows.append((f"{len(r['by_op']) - top} other ops", "", rest, f"{100 * rest / tot:.1f}%"))
        lines.append(markdown_table(("op", "calls", "kernels", "share"), rows))
        if r["triton"]:
            lines += ["", "Triton kernels: " + ", ".join(f"`{k}` {v}" for k, v in r["triton"].items())]
        if r.get("phases"):
            lines += ["", ("Launches by phase (the outermost frames of each op's call stack; `[Node]`: run by the "
                           "autograd engine in that node's backward):"), ""]
            lines.append(markdown_table(("phase", "kernels"), [(f"`{p}`", n) for p, n in list(r["phases"].items())[:top]]))
    if f5 is not None and f5["sites"]:
        lines += ["", "## Fused omniglot-5w1s: call sites of the top ops (innermost project frame first)", ""]
        rows = []
        for op, _ in list(f5["by_op"].items())[:top]:
            for site, n, _ in f5["sites"].get(op, [])[:sites_per_op]:
                rows.append((f"`{op}`", n, f"`{site}`"))
        lines.append(markdown_table(("op", "kernels", "call site < callers"), rows))
        for op in every_site:
            if op in f5["sites"]:
                lines += ["", (f"Every call site of `{op}` (omniglot-5w1s, {_n(f5['by_op'][op][1])} kernels) and what it "
                               "copies (shape, strides when not contiguous; `a -> b`: source -> destination):"), ""]
                rows = [(n, f"`{s}`", "; ".join(f"{w} x{c}" for w, c in lay.items())) for s, n, lay in f5["sites"][op]]
                lines.append(markdown_table(("kernels", "call site < callers", "copies"), rows))
    lines += ["", "## Host synchronisations", ""]
    for r in results:
        label = f"{r['kind']} {r['shape']}"
        if not r["sync_count"]:
            lines.append(f"- {label}: none.")
            continue
        lines.append(f"- {label}: {_n(r['sync_count'])}")
        for x in r["syncs"][:8]:
            lines.append(f"  - {_n(x['count'])} x `{x['op']}` ({x['detail']}) at `{x['site']}`")
    return "\n".join(lines) + "\n"


def run(shapes=SHAPES, baseline=True, overrides=None):
    """Fused (and baseline) counts for each preset in ``shapes``."""
    specs = []
    for shape in shapes:
        specs.append({"kind": "fused", "shape": shape, "overrides": overrides or {}})
        if baseline:
            specs.append({"kind": "baseline", "shape": shape, "overrides": overrides or {}})
    return measure(specs)


def main(args):
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
