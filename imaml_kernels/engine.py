"""The fused batched network engine: loss, gradient and exact Hessian-vector products for
T tasks at once, with every task's parameters in one flat ``[T, P]`` buffer.

Forward-over-reverse by hand (Pearlmutter's R-operator): every layer has a forward, a
backward, a tangent forward and a tangent backward. :meth:`BatchedNet.linearize` runs the
primal forward and backward once at ``φ`` and keeps what the HVP needs (im2col patches,
normalised activations, ReLU masks, the primal cotangents), so each HVP of a CG solve runs
only the tangent passes: per conv layer two batched GEMMs forward, four backward, no primal
recompute and no autograd graph.

Layout inside the engine: activations are channels-last ``[T, N, H, W, C]`` so that a 3×3
convolution is one strided im2col copy and one ``bmm`` per task batch (``[T, N·Ho·Wo, 9C] @
[T, 9C, Cout]``); parameters keep the ``nn.Module`` layout in the flat buffer, so the engine
is a drop-in for the module's ``named_parameters()``.

Supported: ``nn.Sequential`` of Conv2d (square kernel, any stride/padding, groups 1),
BatchNorm2d in batch-statistics mode (affine), ReLU, Tanh, MaxPool2d(2), ZeroPad2d,
Flatten and Linear, with softmax cross-entropy (mean over the task's examples). The elementwise
stages (BatchNorm+ReLU and softmax-CE, primal and tangent together) run through the fused
``imaml::`` ops of :mod:`imaml_kernels.fused`.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .layout import ParamLayout


class UnsupportedModel(TypeError):
    """The model has a layer the engine does not implement (the generic path handles it)."""


# --------------------------------------------------------------------------- conv helpers


def _bmm_into(a, b, out):
    """``out = a @ b`` written straight into a (strided) view of a flat parameter buffer;
    under ``torch.compile`` (no non-contiguous ``out=``) a product and a copy."""
    if torch.compiler.is_compiling():
        out.copy_(torch.bmm(a, b))
    else:
        torch.bmm(a, b, out=out)


def _sum_into(t, out):
    """``out = t.sum(1)`` into a strided view (see :func:`_bmm_into`)."""
    if torch.compiler.is_compiling():
        out.copy_(t.sum(1))
    else:
        torch.sum(t, 1, out=out)


class _Layer:
    backend: Optional[str] = None  # the fused stages' backend (None: automatic)
    params: tuple = ()  # names of this layer's parameters in the module (e.g. ("0.weight", "0.bias"))

    def native(self):
        """``{name: (to_native, from_native, native_shape)}`` for parameters stored in another
        order in the engine's layout (the maps act on ``[T, *shape]`` views)."""
        return {}

    def fwd(self, p, x, c):
        raise NotImplementedError

    def bwd(self, p, gy, c, gp, need_gx):
        raise NotImplementedError

    def tfwd(self, p, rp, rx, c):
        raise NotImplementedError

    def tbwd(self, p, rp, rgy, c, rgp, need_gx):
        raise NotImplementedError


class _Conv(_Layer):
    def __init__(self, m: nn.Conv2d, prefix):
        if m.groups != 1 or m.dilation != (1, 1) or m.kernel_size[0] != m.kernel_size[1] or m.stride[0] != m.stride[1]:
            raise UnsupportedModel(f"Conv2d {m}: only square kernels, equal strides, groups=1, dilation=1")
        if not isinstance(m.padding, tuple) or m.padding_mode != "zeros":
            raise UnsupportedModel(f"Conv2d {m}: only numeric zero padding")
        self.k, self.s = m.kernel_size[0], m.stride[0]
        self.ph, self.pw = m.padding
        self.cin, self.cout = m.in_channels, m.out_channels
        self.bias = m.bias is not None
        self.params = (prefix + "weight",) + ((prefix + "bias",) if self.bias else ())

    def native(self):
        # The weight lives as [k, k, Cin, Cout] in the engine's layout: a [k·k·Cin, Cout] GEMM
        # operand in the (ki, kj, c) order of the patches, with no per-call permute.
        w = self.params[0]
        return {w: (lambda t: t.permute(0, 3, 4, 2, 1), lambda t: t.permute(0, 4, 3, 1, 2), (self.k, self.k, self.cin, self.cout))}

    def _wt(self, w):
        return w.view(w.shape[0], self.k * self.k * self.cin, self.cout)

    def _out_hw(self, H, W):
        return (H + 2 * self.ph - self.k) // self.s + 1, (W + 2 * self.pw - self.k) // self.s + 1

    def _cols(self, x, Ho, Wo):
        T, N = x.shape[:2]
        cols = fused.im2col(x, Ho, Wo, self.k, self.s, self.ph, self.pw, self.backend)
        return cols.view(T, N * Ho * Wo, self.k * self.k * self.cin)

    def fwd(self, p, x, c):
        T, N, H, W, _ = x.shape
        Ho, Wo = self._out_hw(H, W)
        cols = self._cols(x, Ho, Wo)
        wt = self._wt(p[0])
        z = torch.baddbmm(p[1].unsqueeze(1), cols, wt) if self.bias else torch.bmm(cols, wt)
        c.update(cols=cols, wt=wt, xshape=x.shape, hw=(Ho, Wo))
        return z.view(T, N, Ho, Wo, self.cout)

    def _gx(self, gcols, c):
        T, N, H, W, C = c["xshape"]
        Ho, Wo = c["hw"]
        g = gcols.view(T, N, Ho, Wo, self.k, self.k, C)
        return fused.col2im(g, H, W, self.s, self.ph, self.pw, self.backend)

    def bwd(self, p, gy, c, gp, need_gx):
        T = gy.shape[0]
        gz = gy.reshape(T, -1, self.cout)
        c["gz"] = gz
        _bmm_into(c["cols"].transpose(1, 2), gz, self._wt(gp[0]))
        if self.bias:
            _sum_into(gz, gp[1])
        if need_gx:
            return self._gx(torch.bmm(gz, c["wt"].transpose(1, 2)), c)
        return None

    def tfwd(self, p, rp, rx, c):
        T = c["cols"].shape[0]
        Ho, Wo = c["hw"]
        rwt = self._wt(rp[0])
        c["rwt"] = rwt
        rz = torch.baddbmm(rp[1].unsqueeze(1), c["cols"], rwt) if self.bias else torch.bmm(c["cols"], rwt)
        if rx is not None:
            rcols = self._cols(rx, Ho, Wo)
            rz.baddbmm_(rcols, c["wt"])
            c["rcols"] = rcols
        else:
            c["rcols"] = None
        return rz.view(T, -1, Ho, Wo, self.cout)

    def tbwd(self, p, rp, rgy, c, rgp, need_gx):
        T = rgy.shape[0]
        rgz = rgy.reshape(T, -1, self.cout)
        gz, cols, rcols = c["gz"], c["cols"], c["rcols"]
        rgw = self._wt(rgp[0])
        _bmm_into(cols.transpose(1, 2), rgz, rgw)
        if rcols is not None:
            rgw.baddbmm_(rcols.transpose(1, 2), gz)
        if self.bias:
            _sum_into(rgz, rgp[1])
        if need_gx:
            # Two GEMMs into one output. Stacking them ([rgz | gz] @ [Wᵀ; Ẇᵀ], one GEMM with
            # K = 2·Cout) measured no faster on the 2-core CPU (12.8 vs 12.9 ms, Omniglot 5w1s).
            rgcols = torch.bmm(rgz, c["wt"].transpose(1, 2))
            rgcols.baddbmm_(gz, c["rwt"].transpose(1, 2))
            return self._gx(rgcols, c)
        return None


class _BatchNorm(_Layer):
    """BatchNorm2d with batch statistics per task (over N, H, W), optionally followed by ReLU,
    fused: primal and tangent in one pass each way (:mod:`imaml_kernels.fused`)."""

    def __init__(self, m: nn.BatchNorm2d, prefix, relu):
        if not m.affine:
            raise UnsupportedModel("BatchNorm2d without affine parameters")
        if m.track_running_stats and not m.training:
            raise UnsupportedModel("BatchNorm2d in eval mode with running statistics (the engine uses batch statistics)")
        self.eps, self.relu = m.eps, relu
        self.params = (prefix + "weight", prefix + "bias")

    def fwd(self, p, x, c):
        shape = x.shape
        T, C = shape[0], shape[-1]
        y, xhat, rstd = fused.bn_fwd(x.reshape(T, -1, C), p[0], p[1], self.eps, self.relu, self.backend)
        c.update(xhat=xhat, rstd=rstd, y=y if self.relu else None, shape=shape)
        return y.view(shape)

    def bwd(self, p, gy, c, gp, need_gx):
        T, C = gy.shape[0], gy.shape[-1]
        gy = gy.reshape(T, -1, C)
        c["gy"] = gy
        gx, ggamma, gbeta = fused.bn_bwd(gy, c["xhat"], c["rstd"], p[0], c["y"], self.backend)
        gp[0].copy_(ggamma)
        gp[1].copy_(gbeta)
        return gx.view(c["shape"])

    def tfwd(self, p, rp, rx, c):
        T, C = rx.shape[0], rx.shape[-1]
        ry, rxhat, a = fused.bn_tfwd(rx.reshape(T, -1, C), c["xhat"], c["rstd"], p[0], rp[0], rp[1], c["y"], self.backend)
        c.update(rxhat=rxhat, a=a)
        return ry.view(c["shape"])

    def tbwd(self, p, rp, rgy, c, rgp, need_gx):
        T, C = rgy.shape[0], rgy.shape[-1]
        rgx, rggamma, rgbeta = fused.bn_tbwd(
            c["gy"], rgy.reshape(T, -1, C), c["xhat"], c["rxhat"], c["rstd"], c["a"], p[0], rp[0], c["y"], self.backend
        )
        rgp[0].copy_(rggamma)
        rgp[1].copy_(rgbeta)
        return rgx.view(c["shape"])


class _ReLU(_Layer):
    def fwd(self, p, x, c):
        y = torch.relu(x)
        c["mask"] = y > 0
        return y

    def bwd(self, p, gy, c, gp, need_gx):
        return gy * c["mask"]

    def tfwd(self, p, rp, rx, c):
        return rx * c["mask"]

    def tbwd(self, p, rp, rgy, c, rgp, need_gx):
        return rgy * c["mask"]


class _Tanh(_Layer):
    def fwd(self, p, x, c):
        y = torch.tanh(x)
        c["y"] = y
        return y

    def bwd(self, p, gy, c, gp, need_gx):
        c["gy"] = gy
        return gy * (1 - c["y"] * c["y"])

    def tfwd(self, p, rp, rx, c):
        ry = rx * (1 - c["y"] * c["y"])
        c["ry"] = ry
        return ry

    def tbwd(self, p, rp, rgy, c, rgp, need_gx):
        y = c["y"]
        return rgy * (1 - y * y) - 2 * c["gy"] * y * c["ry"]


class _MaxPool(_Layer):
    """2×2 max-pool, stride 2, floor mode (odd rows/columns dropped, as in ``nn.MaxPool2d(2)``);
    the forward keeps the argmax (uint8) for the tangent (a gather) and the adjoint (a scatter)."""

    def fwd(self, p, x, c):
        y, idx = fused.maxpool_fwd(x, self.backend)
        c.update(idx=idx, shape=x.shape)
        return y

    def bwd(self, p, gy, c, gp, need_gx):
        H, W = c["shape"][2], c["shape"][3]
        return fused.maxpool_scatter(gy, c["idx"], H, W, self.backend)

    def tfwd(self, p, rp, rx, c):
        return fused.maxpool_gather(rx, c["idx"], self.backend)

    def tbwd(self, p, rp, rgy, c, rgp, need_gx):
        return self.bwd(p, rgy, c, rgp, need_gx)


class _ZeroPad(_Layer):
    def __init__(self, m: nn.ZeroPad2d):
        self.l, self.r, self.t, self.b = m.padding

    def fwd(self, p, x, c):
        c["shape"] = x.shape
        return F.pad(x, (0, 0, self.l, self.r, self.t, self.b))

    def _crop(self, g):
        H, W = g.shape[2], g.shape[3]
        return g[:, :, self.t : H - self.b, self.l : W - self.r, :]

    def bwd(self, p, gy, c, gp, need_gx):
        return self._crop(gy)

    def tfwd(self, p, rp, rx, c):
        return F.pad(rx, (0, 0, self.l, self.r, self.t, self.b))

    def tbwd(self, p, rp, rgy, c, rgp, need_gx):
        return self._crop(rgy)


class _Flatten(_Layer):
    """Flattens ``[T, N, H, W, C]`` (channels-last) to ``[T, N, H·W·C]``; the next Linear
    permutes its weight from the module's (C, H, W) order instead of the activations."""

    def fwd(self, p, x, c):
        c["shape"] = x.shape
        return x.reshape(x.shape[0], x.shape[1], -1)

    def bwd(self, p, gy, c, gp, need_gx):
        return gy.reshape(c["shape"])

    def tfwd(self, p, rp, rx, c):
        return rx.reshape(rx.shape[0], rx.shape[1], -1)

    def tbwd(self, p, rp, rgy, c, rgp, need_gx):
        return rgy.reshape(c["shape"])


class _Linear(_Layer):
    def __init__(self, m: nn.Linear, prefix, chw=None):
        self.inf, self.outf = m.in_features, m.out_features
        self.bias = m.bias is not None
        self.chw = chw  # (C, H, W) of a channels-last input flattened by _Flatten, else None
        self.params = (prefix + "weight",) + ((prefix + "bias",) if self.bias else ())

    def native(self):
        # After a channels-last Flatten the weight lives as [out, H, W, C] (the activations'
        # order) in the engine's layout.
        if self.chw is None:
            return {}
        C, H, W = self.chw
        w = self.params[0]
        return {w: (lambda t: t.view(t.shape[0], self.outf, C, H, W).permute(0, 1, 3, 4, 2),
                    lambda t: t.permute(0, 1, 4, 2, 3), (self.outf, H, W, C))}

    def _w(self, w):
        return w.reshape(w.shape[0], self.outf, self.inf)

    def fwd(self, p, x, c):
        w = self._w(p[0])
        c.update(x=x, w=w)
        return torch.baddbmm(p[1].unsqueeze(1), x, w.transpose(1, 2)) if self.bias else torch.bmm(x, w.transpose(1, 2))

    def bwd(self, p, gy, c, gp, need_gx):
        c["gy"] = gy
        _bmm_into(gy.transpose(1, 2), c["x"], self._w(gp[0]))
        if self.bias:
            _sum_into(gy, gp[1])
        return torch.bmm(gy, c["w"]) if need_gx else None

    def tfwd(self, p, rp, rx, c):
        rw = self._w(rp[0])
        c.update(rw=rw, rx=rx)
        ry = torch.baddbmm(rp[1].unsqueeze(1), c["x"], rw.transpose(1, 2)) if self.bias else torch.bmm(c["x"], rw.transpose(1, 2))
        if rx is not None:
            ry.baddbmm_(rx, c["w"].transpose(1, 2))
        return ry

    def tbwd(self, p, rp, rgy, c, rgp, need_gx):
        gy = c["gy"]
        rgw = self._w(rgp[0])
        _bmm_into(rgy.transpose(1, 2), c["x"], rgw)
        if c["rx"] is not None:
            rgw.baddbmm_(gy.transpose(1, 2), c["rx"])
        if self.bias:
            _sum_into(rgy, rgp[1])
        if not need_gx:
            return None
        return torch.baddbmm(torch.bmm(rgy, c["w"]), gy, c["rw"])


# --------------------------------------------------------------------------- the network


def _parse(model: nn.Module, in_shape):
    """The layers of a supported ``nn.Sequential`` and the shape bookkeeping (channels-last)."""
    if not isinstance(model, nn.Sequential):
        raise UnsupportedModel(f"the engine takes an nn.Sequential, got {type(model).__name__}")
    mods = list(model.named_children())
    layers: List[_Layer] = []
    shape = tuple(in_shape)  # per-example shape (C, H, W) or (D,)
    spatial = len(shape) == 3
    i = 0
    while i < len(mods):
        name, m = mods[i]
        prefix = name + "."
        if isinstance(m, nn.Conv2d):
            if not spatial or shape[0] != m.in_channels:
                raise UnsupportedModel(f"layer {name}: Conv2d input shape {shape} does not fit {m}")
            layer = _Conv(m, prefix)
            C, H, W = shape
            Ho = (H + 2 * layer.ph - layer.k) // layer.s + 1
            Wo = (W + 2 * layer.pw - layer.k) // layer.s + 1
            shape = (m.out_channels, Ho, Wo)
            layers.append(layer)
        elif isinstance(m, nn.BatchNorm2d):
            relu = i + 1 < len(mods) and isinstance(mods[i + 1][1], nn.ReLU)
            layers.append(_BatchNorm(m, prefix, relu))
            i += relu
        elif isinstance(m, nn.ReLU):
            layers.append(_ReLU())
        elif isinstance(m, nn.Tanh):
            layers.append(_Tanh())
        elif isinstance(m, nn.MaxPool2d):
            if m.kernel_size not in (2, (2, 2)) or m.stride not in (2, (2, 2)) or m.padding not in (0, (0, 0)) or m.ceil_mode or m.dilation not in (1, (1, 1)):
                raise UnsupportedModel(f"layer {name}: only MaxPool2d(2)")
            layers.append(_MaxPool())
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
        elif isinstance(m, nn.ZeroPad2d):
            layer = _ZeroPad(m)
            layers.append(layer)
            shape = (shape[0], shape[1] + layer.t + layer.b, shape[2] + layer.l + layer.r)
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise UnsupportedModel(f"layer {name}: only Flatten(1, -1)")
            layers.append(_Flatten())
        elif isinstance(m, nn.Linear):
            chw = None
            if isinstance(layers[-1] if layers else None, _Flatten) and spatial:
                chw = shape
            flat = shape[0] * shape[1] * shape[2] if spatial else shape[0]
            if flat != m.in_features:
                raise UnsupportedModel(f"layer {name}: Linear expects {m.in_features} inputs, gets {flat}")
            layers.append(_Linear(m, prefix, chw))
            shape, spatial = (m.out_features,), False
        else:
            raise UnsupportedModel(f"layer {name}: {type(m).__name__} is not implemented by the engine")
        i += 1
    if spatial or not layers:
        raise UnsupportedModel("the network must end in a Linear layer producing logits")
    return layers, shape[0]


class Linearization:
    """The network linearised at ``φ`` for all T tasks (made by :meth:`BatchedNet.linearize`):
    ``loss [T]``, ``grad [T, P]``, ``logits [T, N, classes]`` and :meth:`hvp`, which reuses the
    primal activations. ``hvp_native`` works in the engine's parameter order
    (:meth:`BatchedNet.to_native`): a CG solve run in that order skips two permutes per product.
    """

    def __init__(self, net, params_native, caches, loss, grad_native):
        self.net, self.params_native, self.caches = net, params_native, caches
        self.loss, self.grad_native = loss, grad_native
        self.logits = caches[-1]["logits"]
        self._grad = None

    @property
    def grad(self) -> torch.Tensor:
        """``[T, P]`` in the module's parameter order."""
        if self._grad is None:
            self._grad = self.net.from_native(self.grad_native)
        return self._grad

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """``H_t v_t`` for all tasks: ``v [T, P]`` -> ``[T, P]`` (same dtype as the params)."""
        if v.shape != self.params_native.shape:
            raise ValueError(f"v must have shape {list(self.params_native.shape)} (the params), got {list(v.shape)}")
        return self.net.from_native(self.hvp_native(self.net.to_native(v.to(self.params_native.dtype))))

    def hvp_native(self, v: torch.Tensor) -> torch.Tensor:
        """:meth:`hvp` with ``v`` and the result in the engine's parameter order."""
        net = self.net
        v = v.to(self.params_native.dtype)
        p = net._views(self.params_native)
        rp = net._views(v)
        out = torch.empty_like(v)
        rgp = net._views(out)
        rx = None
        for layer, c, lp, lrp in zip(net.layers, self.caches, p, rp):
            # Before the first layer with parameters the tangent is zero (the input is data).
            rx = layer.tfwd(lp, lrp, rx, c) if (rx is not None or layer.params) else None
        rg = fused.softmax_ce_tangent(self.caches[-1]["prob"], rx, net.backend)
        for idx in range(len(net.layers) - 1, net.first_needs_gx - 1, -1):
            layer = net.layers[idx]
            rg = layer.tbwd(p[idx], rp[idx], rg, self.caches[idx], rgp[idx], need_gx=idx > net.first_needs_gx)
        return out


class BatchedNet:
    """The batched engine for one network structure (parameter values are passed per call).

    Args:
        model: a supported ``nn.Sequential`` (e.g. :class:`imaml_kernels.nets.OmniglotConv`).
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
        self.layers, self.num_classes = _parse(model, self.input_shape)
        for layer in self.layers:
            layer.backend = backend
        names = [n for layer in self.layers for n in layer.params]
        params = dict(model.named_parameters())
        if sorted(names) != sorted(params):
            raise UnsupportedModel(f"parameters {sorted(set(params) - set(names))} are not used by supported layers")
        self.layout = ParamLayout.from_params(params, batched=False)
        self._native = {k: v for layer in self.layers for k, v in layer.native().items()}
        self.native_layout = ParamLayout({k: self._native[k][2] if k in self._native else s for k, s in self.layout.shapes.items()})
        self.spatial = len(self.input_shape) == 3
        # Layers up to this index need no input gradient (nothing upstream has parameters).
        with_params = [i for i, layer in enumerate(self.layers) if layer.params]
        self.first_needs_gx = with_params[0] if with_params else len(self.layers)

    @property
    def numel(self) -> int:
        return self.layout.numel

    def _views(self, flat_native):
        d = self.native_layout.unflatten(flat_native)
        return [[d[n] for n in layer.params] for layer in self.layers]

    def _permute(self, flat, src, dst, which):
        if not self._native:
            return flat.clone(memory_format=torch.contiguous_format)
        out = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)
        a, b = src.unflatten(flat), dst.unflatten(out)
        for k in self.layout.names:
            src = self._native[k][which](a[k]) if k in self._native else a[k]
            b[k].view(src.shape).copy_(src)
        return out

    def to_native(self, flat: torch.Tensor) -> torch.Tensor:
        """``[T, P]`` in the module's order -> the engine's order (conv weights as
        ``[k, k, Cin, Cout]``, a linear weight after a channels-last flatten as
        ``[out, H, W, C]``); a new buffer. Elementwise maps (CG, proximal steps) commute with it."""
        return self._permute(flat, self.layout, self.native_layout, 0)

    def from_native(self, flat: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_native`."""
        return self._permute(flat, self.native_layout, self.layout, 1)

    def _check(self, params, x, y):
        if not isinstance(params, torch.Tensor) or params.dim() != 2 or params.shape[1] != self.numel:
            got = list(params.shape) if isinstance(params, torch.Tensor) else type(params).__name__
            raise ValueError(f"params must be a flat [T, {self.numel}] buffer for this network, got {got}")
        if not params.is_floating_point():
            raise TypeError(f"params must be floating point, got {params.dtype}")
        T = params.shape[0]
        if x.dim() != 2 + len(self.input_shape) or x.shape[0] != T or tuple(x.shape[2:]) != self.input_shape:
            raise ValueError(f"x must have shape [T={T}, N, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        if y.shape != x.shape[:2]:
            raise ValueError(f"y must have shape {list(x.shape[:2])} (tasks, examples), got {list(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"y must hold integer class labels, got {y.dtype}")
        if x.shape[1] < 1:
            raise ValueError("every task needs at least one example")
        if torch.compiler.is_compiling():
            pass  # no value checks while tracing (they would read the labels back)
        elif y.device.type == "cpu":
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]")
        else:  # on a GPU: a device-side assert, no host synchronisation
            torch._assert_async(((y >= 0) & (y < self.num_classes)).all(), "labels out of range for the network")

    def _input(self, x, dtype):
        x = x.to(dtype)
        return x.permute(0, 1, 3, 4, 2) if self.spatial else x  # channels-last

    def _run_forward(self, params_native, x):
        p = self._views(params_native)
        caches = [{} for _ in self.layers]
        h = self._input(x, params_native.dtype)
        for layer, c, lp in zip(self.layers, caches, p):
            h = layer.fwd(lp, h, c)
        return p, caches, h

    def _forward(self, params_native, x, y):
        p, caches, logits = self._run_forward(params_native, x)
        loss, prob, glogits = fused.softmax_ce(logits, y, self.backend)
        caches[-1].update(prob=prob, logits=logits)
        return p, caches, loss, glogits

    def logits(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The network's output ``[T, N, classes]`` (no autograd; see :func:`functional_logits`)."""
        self._check(params, x, torch.zeros(x.shape[:2], dtype=torch.int64, device=x.device))
        return self._run_forward(self.to_native(params), x)[2]

    def loss(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per task: ``[T]``."""
        self._check(params, x, y)
        return self._forward(self.to_native(params), x, y)[2]

    def _backward(self, p, caches, glogits, grad):
        gp = self._views(grad)
        g = glogits
        for idx in range(len(self.layers) - 1, self.first_needs_gx - 1, -1):
            g = self.layers[idx].bwd(p[idx], g, caches[idx], gp[idx], need_gx=idx > self.first_needs_gx)

    def linearize(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Linearization:
        """Primal forward and backward at ``params [T, P]``; the result's ``hvp`` reuses them."""
        self._check(params, x, y)
        native = self.to_native(params)
        p, caches, loss, glogits = self._forward(native, x, y)
        grad = torch.empty_like(native)
        self._backward(p, caches, glogits, grad)
        return Linearization(self, native, caches, loss, grad)

    def vjp(self, params, x, glogits):
        """``∂⟨glogits, f(params, x)⟩/∂params``: ``glogits [T, N, classes]`` -> ``[T, P]``."""
        native = self.to_native(params)
        p, caches, logits = self._run_forward(native, x)
        grad = torch.empty_like(native)
        self._backward(p, caches, glogits.to(params.dtype).contiguous(), grad)
        return self.from_native(grad)

    def loss_and_grad(self, params, x, y):
        """``(loss [T], grad [T, P])``."""
        lin = self.linearize(params, x, y)
        return lin.loss, lin.grad

    def hvp(self, params, v, x, y):
        """``H_t v_t``: ``[T, P]`` (one primal pass, then the tangent passes)."""
        return self.linearize(params, x, y).hvp(v)

    def inner_loop(self, theta, x, y, *, lam, steps: int, lr: float, phi0: Optional[torch.Tensor] = None):
        """``steps`` proximal gradient steps for all tasks in one call:
        ``φ ← φ − lr (∇L̂_t(φ) + λ_t (φ − θ))``, from ``φ0`` (default θ).

        Args:
            theta: ``[P]`` (shared) or ``[T, P]``; lam: scalar or ``[T]``.
            x, y: the support set ``[T, N, ...]``, ``[T, N]``.
            phi0: ``[T, P]`` starting point (not modified).

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
        lam_t = torch.as_tensor(lam, dtype=start.dtype, device=start.device).expand(T).contiguous()
        # Work in the engine's order throughout: one permute in, one out.
        phi = self.to_native(start)
        theta = self.to_native(rows.contiguous())
        theta = theta[0] if shared else theta
        grad = torch.empty_like(phi)
        for _ in range(steps):
            p, caches, _, glogits = self._forward(phi, x, y)
            self._backward(p, caches, glogits, grad)
            # φ -= lr (g + λ (φ − θ))  ==  φ (1 − lr λ) + lr λ θ − lr g
            fused.prox_step(phi, grad, theta, lam_t, lr, self.backend)
        return self.from_native(phi)


class _EngineLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, net, x, *leaves):
        flat = net.layout.flatten({k: t.detach() for k, t in zip(net.layout.names, leaves)})
        with torch.no_grad():
            native = net.to_native(flat)
            p, caches, logits = net._run_forward(native, x)
        # The backward reuses this forward's activations (no recompute).
        ctx.net, ctx.state = net, (native, p, caches)
        return logits

    @staticmethod
    def backward(ctx, glogits):
        net = ctx.net
        native, p, caches = ctx.state
        ctx.state = None
        grad = torch.empty_like(native)
        net._backward(p, caches, glogits.to(native.dtype).contiguous(), grad)
        g = net.layout.unflatten(net.from_native(grad))
        return (None, None, *(g[k] for k in net.layout.names))


def functional_logits(net: BatchedNet, params, x):
    """Logits ``[T, N, classes]`` for per-task parameters ``params`` (a dict ``{name: [T, ...]}``
    or a flat ``[T, P]``), differentiable with respect to them through the engine's backward
    (no vmap, no autograd graph of the network). The drop-in for
    ``vmap(functional_call(model, ·, x))``."""
    if isinstance(params, torch.Tensor):
        params = net.layout.unflatten(params)
    leaves = [params[k] for k in net.layout.names]
    net._check(net.layout.flatten({k: t.detach() for k, t in zip(net.layout.names, leaves)}), x,
               torch.zeros(x.shape[:2], dtype=torch.int64, device=x.device))
    return _EngineLogits.apply(net, x, *leaves)
