"""The counting ``TorchDispatchMode`` of ``bench launches``: kernel launches and host
synchronisations of the ops it sees, each with its Python call site (see :mod:`bench.launches`
for what counts as which)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..common import ROOT

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
# The frames of this package's own functions (counter, driver), left out of call sites.
_PACKAGE = os.path.dirname(__file__)
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
        package's machinery left out), and the autograd node being run (None outside backward)."""
        frames = []
        f = sys._getframe(2)
        root = str(ROOT) + os.sep
        while f is not None:
            name, fn = f.f_code.co_filename, f.f_code.co_name
            machinery = fn in _MACHINERY and os.path.dirname(name) == _PACKAGE
            if name.startswith(root) and fn not in _COMPREHENSIONS and not machinery:
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
