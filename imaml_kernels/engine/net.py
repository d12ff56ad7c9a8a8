"""The network: parsing a model into engine layers (:mod:`.layers`), the flat ``[T, P]``
parameter layout, :class:`Linearization` (one primal pass reused by every HVP of a CG
solve), :class:`BatchedNet` (loss, gradient, HVP, the fused inner loop) and
:func:`functional_logits` (the engine's forward and backward behind autograd).
"""

import weakref
from typing import Optional

import torch
from torch import nn

from .. import dispatch
from ..lam import PerCoordinate
from ..layout import ParamLayout
from .layers import BatchNorm, Conv, Linear, Residual, UnsupportedModel, leaf_layers, parse_items  # noqa: F401
from .trace import traced_items


def parse(model: nn.Module, in_shape):
    """The engine's layers of ``model`` and its number of classes; raises
    :class:`UnsupportedModel` naming the first layer it cannot run.

    An ``nn.Sequential`` is read child by child; any other module (or a Sequential with blocks of
    its own) through its ``torch.fx`` trace (:func:`.trace.traced_items`), which adds residual
    blocks, a global average pool and the functional forms of the layers."""
    first = None
    if isinstance(model, nn.Sequential):
        try:
            return parse_items([(name, m) for name, m in model.named_children()], in_shape)
        except UnsupportedModel as e:
            first = e
    try:
        return parse_items(traced_items(model), in_shape)
    except UnsupportedModel:
        if first is not None:
            raise first from None
        raise


class Linearization:
    """The network linearised at ``φ`` for all T tasks (made by :meth:`BatchedNet.linearize`),
    the linearisation protocol of :mod:`imaml_kernels.objective`: ``loss [T]``, ``grad [T, P]``
    (θ's order), :meth:`hvp` in the engine's parameter order (the *work* order: a CG solve run
    there skips two permutes per product; :meth:`to_work`/:meth:`from_work` convert), reusing
    the primal activations for every product. Also ``logits [T, N, classes]``.
    """

    def __init__(self, net, kern, params_native, caches, loss, grad_native):
        self.net, self.kernels, self.params_native, self.caches = net, kern, params_native, caches
        self.loss, self.grad_native = loss, grad_native
        self.logits = caches[-1]["logits"]
        self._grad = None

    @property
    def grad(self) -> torch.Tensor:
        """``[T, P]`` in the module's parameter order."""
        if self._grad is None:
            self._grad = self.net.from_native(self.grad_native)
        return self._grad

    def release_grad(self):
        """Frees the support gradient (``grad``), for a caller that needs only the products."""
        self.grad_native = self._grad = None

    def to_work(self, v: torch.Tensor) -> torch.Tensor:
        """``[T, P]`` in θ's order -> the engine's order: a new buffer, or ``v`` itself where the
        two orders agree (an MLP)."""
        return self.net.to_native(v) if self.net._native else v

    def from_work(self, v: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_work`."""
        return self.net.from_native(v) if self.net._native else v

    def hvp(self, v: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``H_t v_t`` for all tasks, ``v [T, P]`` and the result in the engine's order (same
        dtype as the params); ``out``: a buffer from an earlier call to write into; on the CPU
        whatever it holds now (the spans no layer writes are zeroed again), elsewhere an earlier
        product (those spans are still zero)."""
        net, k = self.net, self.kernels
        if v.shape != self.params_native.shape:
            raise ValueError(f"v must have shape {list(self.params_native.shape)} (the params), got {list(v.shape)}")
        v = v.to(self.params_native.dtype)
        p = net._views(self.params_native)
        rp = net._views(v)
        if out is None:
            out = net._grad_buffer(v)
        elif out.device.type == "cpu" and not torch.compiler.is_compiling():
            # A buffer an earlier result was made in (CG's matvec on the CPU leaves its v + Hv/λ
            # there): its unwritten spans zero again. Elsewhere the matvec keeps products apart.
            for lo, hi in net._unwritten:
                out[:, lo:hi].zero_()
        rgp = net._views(out)
        scratch = [{} for _ in net.layers]  # per product: the primal caches are only read
        rx = None
        for layer, c, s, lp, lrp in zip(net.layers, self.caches, scratch, p, rp):
            # Before the first layer with parameters the tangent is zero (the input is data).
            rx = layer.tfwd(k, lp, lrp, rx, c, s) if (rx is not None or layer.params) else None
        rg = k.softmax_ce_tangent(self.caches[-1]["prob"], rx)
        for idx in range(len(net.layers) - 1, net.first_needs_gx - 1, -1):
            layer = net.layers[idx]
            need = idx > net.first_needs_gx
            if need and isinstance(layer, Conv) and isinstance(net.layers[idx - 1], BatchNorm):
                need = "cols"  # the BatchNorm's tangent backward gathers (see .layers)
            rg = layer.tbwd(k, p[idx], rp[idx], rg, self.caches[idx], scratch[idx], rgp[idx], need_gx=need)
            scratch[idx] = None  # this layer's tangents are freed as the pass goes
        return out


class BatchedNet:
    """The batched engine for one network structure (parameter values are passed per call).

    Args:
        model: a supported ``nn.Sequential`` (e.g. :class:`imaml_kernels.nets.OmniglotConv`) or
            a module whose ``torch.fx`` trace holds only supported layers and residual blocks
            (:func:`parse`).
        input_shape: one example's shape, ``(C, H, W)`` or ``(D,)``.

    Parameters travel as a flat ``[T, P]`` buffer in ``model.named_parameters()`` order
    (:attr:`layout`); inputs are ``x [T, N, *input_shape]`` and labels ``y [T, N]`` (int64).

    Example::

        >>> net = BatchedNet(OmniglotConv(5), (1, 28, 28))
        >>> loss, g = net.loss_and_grad(params, x, y)        # [T], [T, P]
        >>> hv = net.hvp(params, v, x, y)                     # [T, P]
    """

    def __init__(self, model: nn.Module, input_shape, backend: Optional[str] = None):
        self.input_shape = tuple(input_shape)
        self.backend = backend
        self.layers, self.num_classes = parse(model, self.input_shape)
        names = [n for layer in self.layers for n in layer.params]
        params = dict(model.named_parameters())
        if sorted(names) != sorted(params):
            raise UnsupportedModel(f"parameters {sorted(set(params) - set(names))} are not used by supported layers")
        self.layout = ParamLayout.from_params(params, batched=False)
        self._native = {k: v for layer in self.layers for k, v in layer.native().items()}
        self.native_layout = ParamLayout({k: self._native[k][2] if k in self._native else s for k, s in self.layout.shapes.items()})
        self.spatial = len(self.input_shape) == 3
        self._run_list = self._runs()
        self._last_inner = None  # (output, its native buffer, output version) of inner_loop
        self._last_data = None  # (x, x version, dtype, _prepare(x)) of the last inner loop
        self._perms = {}  # the layout permutations' gather indices, per device
        self._checked_labels = None  # (weakref to the last labels checked, their version)
        # Gradient-like buffers start at zero where no backward method writes (dead conv biases).
        dead = [layer.params[1] for layer in leaf_layers(self.layers) if isinstance(layer, Conv) and layer.bias and layer.dead_bias]
        self._zeroed = bool(dead)
        self._unwritten = [(self.native_layout.offsets[n], self.native_layout.offsets[n] + self.native_layout.numels[n]) for n in dead]
        # Layers up to this index need no input gradient (nothing upstream has parameters).
        with_params = [i for i, layer in enumerate(self.layers) if layer.params]
        self.first_needs_gx = with_params[0] if with_params else len(self.layers)

    @property
    def numel(self) -> int:
        return self.layout.numel

    def _grad_buffer(self, like):
        """An output buffer for a backward pass: zeros where the layers write nothing, else
        uninitialised (every element is written). On a GPU one fill of the whole buffer (one
        launch); on the CPU only the unwritten spans are zeroed (a fill of all ``[T, P]``
        costs more than the few hundred elements need)."""
        if not self._zeroed:
            return torch.empty_like(like)
        if like.device.type != "cpu" or torch.compiler.is_compiling():
            return torch.zeros_like(like)
        out = torch.empty_like(like)
        for lo, hi in self._unwritten:
            out[:, lo:hi].zero_()
        return out

    def kernels(self, t: torch.Tensor):
        """The :class:`~imaml_kernels.dispatch.Kernels` for ``t``'s device and dtype under this
        net's backend: resolved once per pass, shared by every stage of it."""
        return dispatch.kernels(t.device, t.dtype, self.backend)

    def _views(self, flat_native):
        d = self.native_layout.unflatten(flat_native)
        return [[d[n] for n in layer.params] for layer in self.layers]

    def _runs(self):
        """The layout as ``(name, None)`` for a permuted parameter and ``(None, (lo, hi))``
        for a maximal run of parameters stored alike in both orders (one copy each)."""
        runs = []
        for k in self.layout.names:
            lo, hi = self.layout.offsets[k], self.layout.offsets[k] + self.layout.numels[k]
            if k in self._native:
                runs.append((k, None))
            elif runs and runs[-1][0] is None:
                runs[-1] = (None, (runs[-1][1][0], hi))
            else:
                runs.append((None, (lo, hi)))
        return runs

    def _permute(self, flat, src, dst, which, copy=True):
        """One gather (``index_select`` with the layout's permutation): one launch per
        conversion, not one copy per parameter (the copies below build the index, once).
        Without ``copy``, where the two orders are one (an MLP), ``flat`` itself when contiguous."""
        if not self._native:
            if not copy and flat.is_contiguous():
                return flat
            return flat.clone(memory_format=torch.contiguous_format)
        if flat.device.type == "cpu" and not torch.compiler.is_compiling():
            # On the CPU launches cost nothing and a gather reads an int64 index per element:
            # a copy per run of parameters stored alike, and a permuted copy per moved one.
            return self._permute_copies(flat, src, dst, which)
        return flat.index_select(1, self._perm(flat, which))

    def _perm(self, flat, which):
        """The gather index of conversion ``which`` (0: to native, 1: from native) on
        ``flat``'s device, made once per device by the copies of :meth:`_permute_copies` on an
        index ramp (under ``FakeTensorMode``, once per mode: ``bench launches`` counts it once,
        as a GPU would make it)."""
        if torch.compiler.is_compiling():
            mode = None  # traced: a real index made before is a constant of the graph
        else:
            from torch._guards import detect_fake_mode

            mode = detect_fake_mode(flat)
        key = (which, str(flat.device), None if mode is None else id(mode))
        p = self._perms.get(key)
        if p is None:
            # Methods of `flat`, so that a fake `flat` makes a fake index (exact below 2**53).
            ramp = flat.new_ones((1, self.numel), dtype=torch.float64).cumsum(1) - 1
            src, dst = (self.layout, self.native_layout) if which == 0 else (self.native_layout, self.layout)
            p = self._permute_copies(ramp, src, dst, which)[0].to(torch.int64)
            if not torch.compiler.is_compiling():
                self._perms[key] = p
        return p

    def _permute_copies(self, flat, src, dst, which):
        out = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)
        a, b = src.unflatten(flat), dst.unflatten(out)
        for k, span in self._run_list:
            if k is None:
                out[:, span[0] : span[1]].copy_(flat[:, span[0] : span[1]])
            else:
                moved = self._native[k][which](a[k])
                b[k].view(moved.shape).copy_(moved)
        return out

    def to_native(self, flat: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """``[T, P]`` in the module's order -> the engine's order (conv weights as
        ``[k, k, Cin, Cout]``, a linear weight after a channels-last flatten as
        ``[out, H, W, C]``); a new buffer. Elementwise maps (CG, proximal steps) commute with it.
        ``copy=False``, for a caller that neither writes the result nor keeps it past a write
        to ``flat``: ``flat`` itself where the orders are one (no parameter moves: an MLP, whose
        [1, 4.7M] copies took 3 ms each)."""
        return self._permute(flat, self.layout, self.native_layout, 0, copy)

    def from_native(self, flat: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """The inverse of :meth:`to_native` (``copy`` as there)."""
        return self._permute(flat, self.native_layout, self.layout, 1, copy)

    def _native_for_reading(self, flat: torch.Tensor) -> torch.Tensor:
        """:meth:`to_native` for a consumer that never writes the result: the native buffer
        :meth:`inner_loop` converted ``flat`` from, when ``flat`` is its (unchanged) output,
        so φ makes no round trip between the inner loop and the linearisation."""
        last = self._last_inner
        if last is not None and not torch.compiler.is_compiling():
            out, native, version = last
            if (flat.shape == out.shape and flat.dtype == out.dtype and flat.device == out.device
                    and flat.untyped_storage()._cdata == out.untyped_storage()._cdata
                    and flat.storage_offset() == out.storage_offset() and flat.stride() == out.stride()
                    and out._version == version):
                self._last_inner = None  # used once: the linearisation now owns the buffer
                return native
        return self.to_native(flat)

    def _check(self, params, x, y=None):
        """Shapes and dtypes of ``params``, ``x`` and (given) the labels ``y``, whose values are
        checked once per labels tensor (its identity and version: the inner loop and the
        linearisation that follows share one check; on a GPU a device-side assert)."""
        if not isinstance(params, torch.Tensor) or params.dim() != 2 or params.shape[1] != self.numel:
            got = list(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
            raise ValueError(f"params must be a flat [T, {self.numel}] buffer for this network, got {got}")
        if not params.is_floating_point():
            raise TypeError(f"params must be floating point, got {params.dtype}")
        T = params.shape[0]
        if x.dim() != 2 + len(self.input_shape) or x.shape[0] != T or tuple(x.shape[2:]) != self.input_shape:
            raise ValueError(f"x must have shape [T={T}, N, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        if x.shape[1] < 1:
            raise ValueError("every task needs at least one example")
        if y is None:
            return
        if y.shape != x.shape[:2]:
            raise ValueError(f"y must have shape {list(x.shape[:2])} (tasks, examples), got {list(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"y must hold integer class labels, got {y.dtype}")
        if torch.compiler.is_compiling():
            pass  # no value checks while tracing (they would read the labels back)
        elif self._checked_labels is not None and self._checked_labels[0]() is y and self._checked_labels[1] == y._version:
            pass
        elif y.device.type == "cpu":
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]")
        else:  # on a GPU: a device-side assert, no host synchronisation
            torch._assert_async(((y >= 0) & (y < self.num_classes)).all(), "labels out of range for the network")
        if not torch.compiler.is_compiling():
            self._checked_labels = (weakref.ref(y), y._version)

    def _input(self, x, dtype):
        x = x.to(dtype)
        return x.permute(0, 1, 3, 4, 2) if self.spatial else x  # channels-last

    def _prepare(self, k, x, dtype):
        """What depends on the data alone: the input channels-last and, when the first layer
        is a convolution (or a residual block whose chains start with one), its patches. Made
        once per inner loop, not once per step."""
        h = self._input(x, dtype)
        first = self.layers[0]
        return h, (first.patches(k, h.contiguous()) if isinstance(first, (Conv, Residual)) else {})

    def _data_for(self, k, x, dtype):
        """:meth:`_prepare`, or the last inner loop's when it ran on the same (unchanged) ``x``."""
        last = self._last_data
        if last is not None and last[0] is x and last[1] == x._version and last[2] == dtype and not torch.compiler.is_compiling():
            return last[3]
        return self._prepare(k, x, dtype)

    def _run_forward(self, k, params_native, x, data=None, lean=False):
        p = self._views(params_native)
        caches = [{"lean": True} if lean else {} for _ in self.layers]
        h, pre = data if data is not None else self._prepare(k, x, params_native.dtype)
        caches[0].update(pre)
        for layer, c, lp in zip(self.layers, caches, p):
            h = layer.fwd(k, lp, h, c)
        return p, caches, h

    def _forward(self, k, params_native, x, y, data=None, grad=None, lean=False):
        """``grad``: the gradient buffer the backward will fill; the softmax kernel then also
        writes the head's bias gradient into it (one reduction fewer)."""
        p, caches, logits = self._run_forward(k, params_native, x, data, lean)
        head = self.layers[-1]
        if grad is not None and isinstance(head, Linear) and head.bias:
            loss, prob, glogits = k.softmax_ce_bias(logits, y, self._views(grad)[-1][1])
            caches[-1]["gb_done"] = True
        else:
            loss, prob, glogits = k.softmax_ce(logits, y)
        caches[-1].update(prob=prob, logits=logits)
        return p, caches, loss, glogits

    def logits(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The network's output ``[T, N, classes]`` (no autograd; see :func:`functional_logits`)."""
        self._check(params, x)
        return self._run_forward(self.kernels(params), self.to_native(params), x)[2]

    def loss(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per task: ``[T]``."""
        self._check(params, x, y)
        return self._forward(self.kernels(params), self.to_native(params), x, y)[2]

    def _backward(self, k, p, caches, glogits, grad, fuse=False):
        """``fuse``: no tangent pass follows (the inner loop, a query loss's backward), so a
        convolution fed by a BatchNorm hands it its patch cotangent to gather (see
        :mod:`.layers`), and each layer's cache is emptied once its backward ran (what it held
        is freed as the pass goes, as autograd frees saved tensors)."""
        gp = self._views(grad)
        g = glogits
        for idx in range(len(self.layers) - 1, self.first_needs_gx - 1, -1):
            need = idx > self.first_needs_gx
            if need and fuse and isinstance(self.layers[idx], Conv) and isinstance(self.layers[idx - 1], BatchNorm):
                need = "cols"
            g = self.layers[idx].bwd(k, p[idx], g, caches[idx], gp[idx], need_gx=need)
            if fuse:
                caches[idx].clear()
        if fuse:
            for c in caches:
                c.clear()

    def linearize(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lean: bool = False) -> Linearization:
        """Primal forward and backward at ``params [T, P]``; the result's ``hvp`` reuses them.
        ``lean``: every convolution that can (see :meth:`~.layers.Conv._use_direct`; not the
        first layer, whose patches are the data's) runs directly and keeps its input instead of
        its patches (``k·k`` times smaller) at some cost in speed where the GEMMs are faster."""
        self._check(params, x, y)
        k = self.kernels(params)
        native = self._native_for_reading(params)
        grad = self._grad_buffer(native)
        p, caches, loss, glogits = self._forward(k, native, x, y, self._data_for(k, x, native.dtype), grad, lean)
        self._backward(k, p, caches, glogits, grad)
        for layer, c in zip(self.layers, caches):
            layer.compact(c)
        return Linearization(self, k, native, caches, loss, grad)

    def loss_and_grad(self, params, x, y):
        """``(loss [T], grad [T, P])``."""
        lin = self.linearize(params, x, y)
        return lin.loss, lin.grad

    def hvp(self, params, v, x, y):
        """``H_t v_t``: ``[T, P]`` in the module's order (one primal pass, then the tangent passes)."""
        lin = self.linearize(params, x, y)
        return lin.from_work(lin.hvp(lin.to_work(v)))

    def inner_loop(self, theta, x, y, *, lam, steps: int, lr: float, phi0: Optional[torch.Tensor] = None,
                   proximal: bool = True, pull_back: bool = False):
        """``steps`` proximal gradient steps for all tasks in one call:
        ``φ ← φ − lr (∇L̂_t(φ) + λ_t (φ − θ))``, from ``φ0`` (default θ).

        Args:
            theta: ``[P]`` (shared) or ``[T, P]``; lam: scalar, ``[T]`` or a
                :class:`~imaml_kernels.lam.PerCoordinate` (one λ per parameter group).
            x, y: the support set ``[T, N, ...]``, ``[T, N]``.
            phi0: ``[T, P]`` starting point (not modified).
            proximal: ``False``: the steps are plain gradient steps on the task loss alone,
                ``φ ← φ − lr ∇L̂_t(φ)`` (λ unused there).
            pull_back: after the steps, one proximal "pull-back" step
                ``φ ← φ − lr λ_t (φ − θ)``. ``proximal=False, pull_back=True`` is the inner
                procedure of the authors' released code.

        Returns:
            ``φ [T, P]``, a new buffer.

        Example::

            >>> phi = net.inner_loop(theta, xs, ys, lam=2.0, steps=16, lr=0.1)   # [T, P]
        """
        T = x.shape[0]
        theta = theta.detach()
        shared = theta.dim() == 1 or theta.stride(0) == 0
        rows = theta.reshape(1, -1) if theta.dim() == 1 else (theta[:1] if shared else theta)
        start = rows.expand(T, -1) if phi0 is None else phi0.detach()  # to_native makes the copy
        self._check(start, x, y)
        if rows.shape[1] != self.numel or (not shared and rows.shape[0] != T):
            raise ValueError(f"theta must be [{self.numel}] or [{T}, {self.numel}], got {list(theta.shape)}")
        coords = isinstance(lam, PerCoordinate)
        if coords:  # λ per coordinate: a [1, P] row in the engine's order
            lam_row = self.to_native(lam.row(start))
            lam_t = torch.zeros(T, dtype=start.dtype, device=start.device)
        else:
            lam_t = torch.as_tensor(lam, dtype=start.dtype, device=start.device).expand(T).contiguous()
        # Work in the engine's order throughout: one permute in, one out.
        theta = self.to_native(rows.contiguous(), copy=False)  # read only
        if phi0 is None and shared:  # one row permuted, then copied T times (not T rows gathered)
            phi = theta.expand(T, -1).clone(memory_format=torch.contiguous_format)
        else:
            phi = self.to_native(start)
        theta = theta[0] if shared else theta
        grad = self._grad_buffer(phi)  # reused by every step
        k = self.kernels(phi)
        data = self._prepare(k, x, phi.dtype)  # the support set's first-layer patches, once
        self._last_data = None if torch.compiler.is_compiling() else (x, x._version, phi.dtype, data)
        if not proximal:
            step_lam = torch.zeros_like(lam_t)
        else:  # λ per task [T], or per coordinate: one [1, P] row (the fused step takes both)
            step_lam = lam_row.contiguous() if coords else lam_t
        theta_b = theta if theta.dim() == 2 else theta.unsqueeze(0)
        w = lam_row * lr if coords else (lam_t * lr).unsqueeze(1)
        for _ in range(steps):
            p, caches, _, glogits = self._forward(k, phi, x, y, data, grad)
            self._backward(k, p, caches, glogits, grad, fuse=True)  # empties the caches
            del glogits
            # φ -= lr (g + λ (φ − θ))  ==  φ (1 − lr λ) + lr λ θ − lr g   (λ = 0: plain SGD)
            k.prox_step(phi, grad, theta, step_lam, lr)
        if pull_back:  # φ -= lr λ (φ − θ)  ==  lerp(φ, θ, lr λ): one launch
            phi.lerp_(theta_b, w)
        out = self.from_native(phi, copy=False)  # φ is this call's own buffer
        self._last_inner = None if torch.compiler.is_compiling() else (out, phi, out._version)
        return out


class _EngineLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, net, x, *leaves):
        flat = net.layout.as_flat({k: t.detach() for k, t in zip(net.layout.names, leaves)})  # to_native copies
        with torch.no_grad():
            # Eagerly, may be the caller's buffer (an MLP): its version is checked in the backward.
            traced = torch.compiler.is_compiling()
            native = net.to_native(flat, copy=traced)
            k = net.kernels(native)
            p, caches, logits = net._run_forward(k, native, x)
        # The backward reuses this forward's activations (no recompute).
        ctx.net, ctx.state, ctx.version = net, (k, native, p, caches), None if traced else native._version
        return logits

    @staticmethod
    def backward(ctx, glogits):
        net = ctx.net
        k, native, p, caches = ctx.state
        ctx.state = None
        if ctx.version is not None and native._version != ctx.version:
            raise RuntimeError("functional_logits: the parameters were modified in place between the forward and "
                               "the backward (one of the variables needed for gradient computation has been modified "
                               "by an inplace operation)")
        # The backward adds to the caches (the primal cotangents): fresh dicts, so that nothing
        # the forward made is mutated (torch.compile traces this Function as a whole).
        caches = [dict(c) for c in caches]
        grad = net._grad_buffer(native)
        net._backward(k, p, caches, glogits.to(native.dtype).contiguous(), grad, fuse=True)  # no tangent pass follows
        # grad is this backward's own buffer: no copy, eagerly (traced, the copy stays).
        g = net.layout.unflatten(net.from_native(grad, copy=torch.compiler.is_compiling()))
        return (None, None, *(g[k] for k in net.layout.names))


def functional_logits(net: BatchedNet, params, x):
    """Logits ``[T, N, classes]`` for per-task parameters ``params`` (a dict ``{name: [T, ...]}``
    or a flat ``[T, P]``), differentiable with respect to them through the engine's backward
    (no vmap, no autograd graph of the network). The drop-in for
    ``vmap(functional_call(model, ·, x))``."""
    if isinstance(params, torch.Tensor):
        params = net.layout.unflatten(params)
    leaves = [params[k] for k in net.layout.names]
    net._check(net.layout.as_flat({k: t.detach() for k, t in zip(net.layout.names, leaves)}), x)
    return _EngineLogits.apply(net, x, *leaves)


# {id(model): {structure key: BatchedNet}}, an entry dropped when its model is collected. Not
# a WeakKeyDictionary: torch.compile guards its weakref keys by position, and the collection of
# an unrelated model while tracing shifted them (a guard failing with IndexError).
_NETS = {}


def batched_net(model: nn.Module, input_shape, backend: Optional[str] = None) -> BatchedNet:
    """The :class:`BatchedNet` of ``model`` for inputs of ``input_shape``, parsed once and
    reused while the model's structure (parameter names and shapes, training mode) stays the
    same. Raises :class:`UnsupportedModel` like the constructor."""
    key = (tuple(input_shape), backend, model.training,
           tuple((n, tuple(t.shape)) for n, t in model.named_parameters()),
           tuple(type(m).__name__ + str(m.training) for m in model.modules()))
    per_model = _NETS.get(id(model))
    if per_model is None:
        if torch.compiler.is_compiling():  # traced: no cache state (dynamo guards on finalize's registry)
            return BatchedNet(model, input_shape, backend=backend)
        per_model = _NETS[id(model)] = {}
        weakref.finalize(model, _NETS.pop, id(model), None)
    net = per_model.get(key)
    if net is None:
        try:
            net = per_model[key] = BatchedNet(model, input_shape, backend=backend)
        except UnsupportedModel as e:
            # Remembered too: a model the engine cannot run is not traced again on every call.
            net = per_model[key] = e
    if isinstance(net, UnsupportedModel):
        raise UnsupportedModel(str(net))
    return net
