"""The engine's layers: forward, backward, tangent forward and tangent backward of each,
batched over T tasks (Pearlmutter's R-operator by hand).

Activations are channels-last: ``[T, N, H, W, C]`` for images, ``[T, N, D]`` after a
flatten. A 3×3 convolution is the fused im2col (zero padding included; :mod:`imaml_kernels.ops.conv`)
and one batched GEMM per task batch, ``[T, N·Ho·Wo, k·k·Cin] @ [T, k·k·Cin, Cout]``.

The contract every layer keeps (``k`` is the resolved :class:`~imaml_kernels.dispatch.Kernels`):

- ``p``: this layer's parameter views ``[T, *native shape]`` into the flat ``[T, P]`` buffer, in
  :attr:`params` order; ``rp`` the same views into the tangent ``v``; ``gp`` / ``rgp`` views into
  the gradient / HVP output, which the backward methods write (every element, no accumulation).
- ``fwd(k, p, x, c) -> y``: the primal forward; writes what the backward and the tangents need
  into the primal cache ``c`` (a dict owned by one linearisation).
- ``bwd(k, p, gy, c, gp, need_gx) -> gx | None``: the primal backward; reads ``c``, writes
  ``gp``, may add the primal cotangent to ``c`` (``c["gy"]``, read by ``tbwd``); returns the
  input cotangent only when ``need_gx`` (the first layer with parameters skips it). With
  ``need_gx == "cols"`` (the inner loop, where no tangent pass follows, for a convolution fed
  by a BatchNorm) a convolution returns its patch cotangent as :class:`PatchCotangent`, and the
  BatchNorm's backward gathers from it (``col2im_bn_bwd``: one launch fewer on the GPU). The
  tangent backward does the same with the cotangent's tangent (``col2im_bn_tbwd``), always.
- ``tfwd(k, p, rp, rx, c, s) -> ry``: the tangent forward along ``(rx, rp)`` (``rx`` is ``None``
  before the first layer with parameters: the input is data); reads ``c`` only and writes the
  per-product scratch ``s``, a fresh dict for every HVP, so a linearisation is re-entrant.
- ``tbwd(k, p, rp, rgy, c, s, rgp, need_gx) -> rgx | None``: the tangent of the backward;
  reads ``c`` and ``s``, writes ``rgp``.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import precision as P
from .precision import lowp


class UnsupportedModel(TypeError):
    """The model has a layer the engine does not implement (the generic path handles it)."""


def _bmm_into(a, b, out, a2=None, b2=None):
    """``out = a @ b (+ a2 @ b2)`` written into a (strided) view of a flat parameter buffer.

    On a GPU the products write the view directly (cuBLAS takes any batch stride). On the
    CPU a product into a non-contiguous output leaves ATen's batched GEMM for a per-task
    loop of small GEMMs (measured 1.1-6x slower, Omniglot 5w1s), so the products go to a
    contiguous buffer and one copy moves them into the view. Under ``torch.compile`` (no
    non-contiguous ``out=``) likewise a product and a copy."""
    low = a.dtype == torch.bfloat16 or P.get_gemm_precision() == "bf16" and a.dtype == torch.float32
    if low or torch.compiler.is_compiling() or (out.device.type == "cpu" and not out.is_contiguous()):
        prod = P.bmm(a, b)
        if a2 is not None:
            P.baddbmm_(prod, a2, b2)
        out.copy_(prod)
    else:
        torch.bmm(a, b, out=out)
        if a2 is not None:
            out.baddbmm_(a2, b2)


def _sum_into(t, out):
    """``out = t.sum(1)`` into a strided view (see :func:`_bmm_into`)."""
    if torch.compiler.is_compiling():
        out.copy_(t.sum(1))
    else:
        torch.sum(t, 1, out=out)


class PatchCotangent:
    """A convolution's input cotangent not yet gathered: ``gcols [T, N, Ho, Wo, k, k, C]`` and the
    geometry of ``col2im(gcols, H, W, s, ph, pw)``."""

    def __init__(self, gcols, H, W, s, ph, pw):
        self.gcols, self.H, self.W, self.s, self.ph, self.pw = gcols, H, W, s, ph, pw


class Layer:
    """Base class; see the module docstring for the contract of the four methods."""

    params: tuple = ()  # names of this layer's parameters in the module (e.g. ("0.weight", "0.bias"))

    def native(self):
        """``{name: (to_native, from_native, native_shape)}`` for parameters stored in another
        order in the engine's layout (the maps act on ``[T, *shape]`` views)."""
        return {}

    def fwd(self, k, p, x, c):
        raise NotImplementedError

    def bwd(self, k, p, gy, c, gp, need_gx):
        raise NotImplementedError

    def tfwd(self, k, p, rp, rx, c, s):
        raise NotImplementedError

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        raise NotImplementedError

    def compact(self, c):
        """After a linearisation's primal pass: drop from ``c`` what the tangent passes can
        remake cheaply (see :meth:`Conv.compact`)."""


class Conv(Layer):
    """Conv2d, square kernel, equal strides, groups 1. Cache: ``cols`` (the im2col patches;
    ``fwd`` uses them when already present, see :meth:`patches`), ``wt`` (the weight as a
    ``[T, k·k·Cin, Cout]`` GEMM operand), ``xshape``, ``hw``, ``x`` (the input, where the
    patches are an activation's: :meth:`compact`); ``gz`` (the output cotangent) after ``bwd``;
    a direct convolution (:meth:`_use_direct`) keeps ``direct``, ``x``, ``ws`` and ``gz5``
    instead. Scratch: ``rwt``, ``rcols`` or (compacted) ``rx``; direct: ``rws``, ``rx``.

    A bias that feeds a batch-statistics BatchNorm (``dead_bias``) changes no output: the
    BatchNorm subtracts each channel's batch mean, bias included, for any input. Its gradient
    and every Hessian entry involving it are exactly zero, so the engine neither adds it nor
    reduces for it; the net hands the backward methods gradient buffers already zero there
    (:meth:`~imaml_kernels.engine.BatchedNet.linearize`), so ``gp[1]``/``rgp[1]`` are not written."""

    def __init__(self, m: nn.Conv2d, prefix):
        if m.groups != 1 or m.dilation != (1, 1) or m.kernel_size[0] != m.kernel_size[1] or m.stride[0] != m.stride[1]:
            raise UnsupportedModel(f"Conv2d {m}: only square kernels, equal strides, groups=1, dilation=1")
        if not isinstance(m.padding, tuple) or m.padding_mode != "zeros":
            raise UnsupportedModel(f"Conv2d {m}: only numeric zero padding")
        self.k, self.s = m.kernel_size[0], m.stride[0]
        self.ph, self.pw = m.padding  # top / left: the taps before the first row / column
        self.pb, self.pr = m.padding  # bottom / right: only the output size sees them
        self.cin, self.cout = m.in_channels, m.out_channels
        self.bias = m.bias is not None
        self.dead_bias = False  # set by parse() when a batch-statistics BatchNorm follows
        self.params = (prefix + "weight",) + ((prefix + "bias",) if self.bias else ())

    @property
    def live_bias(self):
        return self.bias and not self.dead_bias

    def absorb(self, pad: "ZeroPad"):
        """Take a preceding ``ZeroPad2d`` into this convolution's (fused, zero) padding: one
        im2col instead of a padded copy, and no crop of the cotangent."""
        self.ph, self.pb, self.pw, self.pr = self.ph + pad.t, self.pb + pad.b, self.pw + pad.l, self.pr + pad.r

    def native(self):
        # The weight lives as [k, k, Cin, Cout] in the engine's layout: a [k·k·Cin, Cout] GEMM
        # operand in the (ki, kj, c) order of the patches, with no per-call permute.
        w = self.params[0]
        return {w: (lambda t: t.permute(0, 3, 4, 2, 1), lambda t: t.permute(0, 4, 3, 1, 2), (self.k, self.k, self.cin, self.cout))}

    def _wt(self, w):
        return w.view(w.shape[0], self.k * self.k * self.cin, self.cout)

    def out_hw(self, H, W):
        return (H + self.ph + self.pb - self.k) // self.s + 1, (W + self.pw + self.pr - self.k) // self.s + 1

    @property
    def pointwise(self):
        """A 1x1 convolution, stride 1, no padding: its patches are its input (no im2col) and
        its input cotangent is the patch cotangent (no col2im)."""
        return self.k == 1 and self.s == 1 and self.ph == self.pw == self.pb == self.pr == 0

    def _cols(self, kern, x, Ho, Wo):
        T, N = x.shape[:2]
        if self.pointwise:
            return x.reshape(T, N * Ho * Wo, self.cin)
        cols = kern.im2col(x, Ho, Wo, self.k, self.s, self.ph, self.pw)
        return cols.view(T, N * Ho * Wo, self.k * self.k * self.cin)

    def patches(self, k, x):
        """The cache entries that depend on the input alone (``cols``, ``xshape``, ``hw``): for
        the first layer, where the input is data, made once and preset in ``c`` by the net."""
        T, N, H, W, _ = x.shape
        Ho, Wo = self.out_hw(H, W)
        return dict(cols=self._cols(k, x, Ho, Wo), xshape=x.shape, hw=(Ho, Wo))

    # Direct convolution (see :meth:`_use_direct`): at or above this many bytes of patches per
    # task, on the CPU. A Zen 4, 2 threads, 4 tasks of 5 images, 3x3 16->16 at 32x32 (2.9 MB of
    # patches a task): forward 0.58 against 1.42 ms, input gradient 0.62 against 0.90 ms; at
    # 15 images (8.8 MB) 1.5 against 19 ms and 1.7 against 16 ms; at 64 channels and 8x8
    # (0.7 MB) the GEMMs were faster.
    DIRECT_BYTES = 2 << 20

    def _use_direct(self, x, lean=False):
        """Whether this call convolves directly (oneDNN's convolution, one per task, on
        channels-last views: no patch buffer) instead of im2col + batched GEMM. On the CPU, in
        full precision, eagerly, where the patches would be large: a patch buffer of many MB
        is written and read at memory speed, and a GEMM with few output channels runs far
        below the machine's peak. ``lean`` (a linearisation under a memory bound): at any size."""
        if x.device.type != "cpu" or torch.compiler.is_compiling() or self.pointwise or P._low(x):
            return False
        if (self.ph, self.pw) != (self.pb, self.pr):
            return False
        T, N, H, W, _ = x.shape
        Ho, Wo = self.out_hw(H, W)
        return lean or N * Ho * Wo * self.k * self.k * self.cin * x.element_size() >= self.DIRECT_BYTES

    @staticmethod
    def _nchw(t):
        """A task's channels-last ``[N, H, W, C]`` as the ``[N, C, H, W]`` (channels-last
        strided) tensor oneDNN's convolution takes: a view."""
        return t.permute(0, 3, 1, 2)

    def _w_nchw(self, w):
        """Per task the ``[Cout, Cin, k, k]`` weight of the engine's ``[T, k, k, Cin, Cout]`` view."""
        return [w[t].permute(3, 2, 0, 1).contiguous() for t in range(w.shape[0])]

    def _conv(self, x, ws, bias=None):
        """``[T, N, Ho, Wo, Cout]``: each task's input convolved with its weight."""
        outs = [F.conv2d(self._nchw(x[t]), ws[t], None if bias is None else bias[t], self.s, (self.ph, self.pw))
                for t in range(x.shape[0])]
        return torch.stack([o.permute(0, 2, 3, 1) for o in outs])

    def _conv_bwd(self, g, x, ws, need_gx, need_gw=True):
        """Per task ``(input cotangent, weight cotangent)`` of the convolution of ``x`` with
        ``ws`` for output cotangent ``g`` (``None`` where not needed): oneDNN's backward."""
        gxs, gws = [], []
        for t in range(g.shape[0]):
            gx, gw, _ = torch.ops.aten.convolution_backward(
                self._nchw(g[t]), self._nchw(x[t]), ws[t], None, [self.s, self.s], [self.ph, self.pw], [1, 1], False,
                [0, 0], 1, [bool(need_gx), need_gw, False])
            gxs.append(None if gx is None else gx.permute(0, 2, 3, 1))
            gws.append(None if gw is None else gw.permute(2, 3, 1, 0))
        return gxs, gws

    def fwd(self, k, p, x, c):
        if "cols" not in c and self._use_direct(x, c.get("lean", False)):
            ws = self._w_nchw(p[0])
            c.update(direct=True, x=x, ws=ws, xshape=x.shape)
            return self._conv(x, ws, p[1] if self.live_bias else None)
        if "cols" not in c:
            c.update(self.patches(k, x))
            c["x"] = x  # patches of an activation (not the data's): remade from it after compact()
        T, N = x.shape[:2]
        Ho, Wo = c["hw"]
        cols = c["cols"]
        wt = self._wt(p[0])
        c["wt"] = wt
        cols, wt = lowp(cols, c, "cols_lp"), lowp(wt, c, "wt_lp")
        z = P.baddbmm(p[1].unsqueeze(1), cols, wt) if self.live_bias else P.bmm(cols, wt)
        return z.view(T, N, Ho, Wo, self.cout)

    def _gx(self, k, gcols, c, lazy=False):
        T, N, H, W, C = c["xshape"]
        Ho, Wo = c["hw"]
        g = gcols.view(T, N, Ho, Wo, self.k, self.k, C)
        if lazy:
            return PatchCotangent(g, H, W, self.s, self.ph, self.pw)
        if self.pointwise:
            return g.view(T, N, H, W, C)
        return k.col2im(g, H, W, self.s, self.ph, self.pw)

    def bwd(self, k, p, gy, c, gp, need_gx):
        T = gy.shape[0]
        if c.get("direct"):
            c["gz5"] = gy
            gxs, gws = self._conv_bwd(gy, c["x"], c["ws"], need_gx)
            gp[0].copy_(torch.stack(gws))
            if self.live_bias:
                _sum_into(gy.reshape(T, -1, self.cout), gp[1])
            return torch.stack(gxs) if need_gx else None
        gz = gy.reshape(T, -1, self.cout)
        c["gz"] = gz
        gz_lp = lowp(gz, c, "gz_lp")
        _bmm_into(lowp(c["cols"], c, "cols_lp").transpose(1, 2), gz_lp, self._wt(gp[0]))
        if self.live_bias:
            _sum_into(gz, gp[1])
        if need_gx:
            return self._gx(k, P.bmm(gz_lp, lowp(c["wt"], c, "wt_lp").transpose(1, 2)), c, lazy=need_gx == "cols")
        return None

    def compact(self, c):
        """A linearisation's patches of an activation (``k·k`` times its size) are not kept for
        the products: each tangent pass remakes them from the input (an im2col, on the CPU a
        few hundredths of a millisecond on the ResNet-12's deeper layers), and the tangent
        forward keeps the input's tangent, not its patches. Not in bf16 mode (its rounded
        copies are cached), nor for the data's patches (made once per inner loop), nor on a
        GPU (a launch more)."""
        if "x" in c and not c.get("direct") and "cols_lp" not in c and c["cols"].device.type == "cpu" \
                and not torch.compiler.is_compiling():
            del c["cols"]

    def _patches_of(self, k, c):
        """The primal patches: cached, or remade from the input after :meth:`compact`."""
        cols = c.get("cols")
        if cols is None:
            Ho, Wo = c["hw"]
            cols = self._cols(k, c["x"], Ho, Wo)
        return cols

    def tfwd(self, k, p, rp, rx, c, s):
        if c.get("direct"):
            rws = self._w_nchw(rp[0])
            s.update(rws=rws, rx=rx)
            rz = self._conv(c["x"], rws, rp[1] if self.live_bias else None)
            if rx is not None:
                rz += self._conv(rx, c["ws"])
            return rz
        Ho, Wo = c["hw"]
        rwt = self._wt(rp[0])
        s["rwt"] = rwt
        cols = self._patches_of(k, c)
        T = cols.shape[0]
        cols, rwt = lowp(cols, c, "cols_lp"), lowp(rwt, s, "rwt_lp")
        rz = P.baddbmm(rp[1].unsqueeze(1), cols, rwt) if self.live_bias else P.bmm(cols, rwt)
        s["rcols"] = s["rx"] = None
        if rx is not None:
            rcols = self._cols(k, rx, Ho, Wo)
            if "cols" in c:
                s["rcols"] = rcols
            else:  # compacted: the tangent backward remakes these patches too
                s["rx"] = rx
            P.baddbmm_(rz, lowp(rcols, s, "rcols_lp"), lowp(c["wt"], c, "wt_lp"))
        return rz.view(T, -1, Ho, Wo, self.cout)

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        T = rgy.shape[0]
        if c.get("direct"):
            # d(gW) = wgrad(x, ġz) + wgrad(ẋ, gz);  d(gx) = xgrad(ġz, W) + xgrad(gz, Ẇ)
            x, gz, rx = c["x"], c["gz5"], s["rx"]
            gx1, gw1 = self._conv_bwd(rgy, x, c["ws"], need_gx)
            gx2, gw2 = self._conv_bwd(gz, x if rx is None else rx, s["rws"], need_gx, need_gw=rx is not None)
            gw = torch.stack(gw1) if rx is None else torch.stack(gw1).add_(torch.stack(gw2))
            rgp[0].copy_(gw)
            if self.live_bias:
                _sum_into(rgy.reshape(T, -1, self.cout), rgp[1])
            return torch.stack(gx1).add_(torch.stack(gx2)) if need_gx else None
        rgz = rgy.reshape(T, -1, self.cout)
        rcols = s["rcols"]
        if rcols is None and s["rx"] is not None:
            rcols = self._cols(k, s["rx"], *c["hw"])
        gz, cols = lowp(c["gz"], c, "gz_lp"), lowp(self._patches_of(k, c), c, "cols_lp")
        rgz_lp = lowp(rgz)
        rgw = self._wt(rgp[0])
        if rcols is not None:
            _bmm_into(cols.transpose(1, 2), rgz_lp, rgw, lowp(rcols, s, "rcols_lp").transpose(1, 2), gz)
        else:
            _bmm_into(cols.transpose(1, 2), rgz_lp, rgw)
        if self.live_bias:
            _sum_into(rgz, rgp[1])
        if need_gx:
            # Two GEMMs into one output. Stacking them ([rgz | gz] @ [Wᵀ; Ẇᵀ], one GEMM with
            # K = 2·Cout) measured no faster on the 2-core CPU (12.8 vs 12.9 ms, Omniglot 5w1s).
            rgcols = P.bmm(rgz_lp, lowp(c["wt"], c, "wt_lp").transpose(1, 2))
            P.baddbmm_(rgcols, gz, lowp(s["rwt"], s, "rwt_lp").transpose(1, 2))
            return self._gx(k, rgcols, c, lazy=need_gx == "cols")
        return None


class BatchNorm(Layer):
    """BatchNorm2d with batch statistics per task (over N, H, W), optionally followed by ReLU,
    fused: primal and tangent in one pass each way (:mod:`imaml_kernels.ops.batchnorm`).
    Cache: ``xhat``, ``rstd``, ``y`` (the ReLU output, or ``None``), ``shape``; ``gy`` after
    ``bwd``. Scratch: ``rxhat``, ``a``."""

    def __init__(self, m: nn.BatchNorm2d, prefix, relu):
        if not m.affine:
            raise UnsupportedModel("BatchNorm2d without affine parameters")
        if m.track_running_stats and not m.training:
            raise UnsupportedModel("BatchNorm2d in eval mode with running statistics (the engine uses batch statistics)")
        self.eps, self.relu = m.eps, relu
        self.params = (prefix + "weight", prefix + "bias")

    def fwd(self, k, p, x, c):
        shape = x.shape
        T, C = shape[0], shape[-1]
        y, xhat, rstd = k.bn_fwd(x.reshape(T, -1, C), p[0], p[1], self.eps, self.relu)
        c.update(xhat=xhat, rstd=rstd, y=y if self.relu else None, shape=shape)
        return y.view(shape)

    def bwd(self, k, p, gy, c, gp, need_gx):
        # γ's and β's gradients are written straight into their views of the flat gradient.
        if isinstance(gy, PatchCotangent):  # the inner loop: no tangent pass reads c["gy"]
            g = gy
            gx = k.col2im_bn_bwd(g.gcols, g.H, g.W, g.s, g.ph, g.pw, c["xhat"], c["rstd"], p[0], c["y"], gp[0], gp[1])
            return gx.view(c["shape"])
        T, C = gy.shape[0], gy.shape[-1]
        gy = gy.reshape(T, -1, C)
        c["gy"] = gy
        gx = k.bn_bwd(gy, c["xhat"], c["rstd"], p[0], c["y"], gp[0], gp[1])
        return gx.view(c["shape"])

    def tfwd(self, k, p, rp, rx, c, s):
        T, C = rx.shape[0], rx.shape[-1]
        ry, rxhat, a = k.bn_tfwd(rx.reshape(T, -1, C), c["xhat"], c["rstd"], p[0], rp[0], rp[1], c["y"])
        s.update(rxhat=rxhat, a=a)
        return ry.view(c["shape"])

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        if isinstance(rgy, PatchCotangent):
            g = rgy
            rgx = k.col2im_bn_tbwd(c["gy"], g.gcols, g.H, g.W, g.s, g.ph, g.pw, c["xhat"], s["rxhat"], c["rstd"], s["a"], p[0], rp[0],
                                   c["y"], rgp[0], rgp[1])
            return rgx.view(c["shape"])
        T, C = rgy.shape[0], rgy.shape[-1]
        rgx = k.bn_tbwd(c["gy"], rgy.reshape(T, -1, C), c["xhat"], s["rxhat"], c["rstd"], s["a"], p[0], rp[0], c["y"], rgp[0], rgp[1])
        return rgx.view(c["shape"])


class ReLU(Layer):
    """A ReLU not fused into a BatchNorm. Cache: ``mask``."""

    def fwd(self, k, p, x, c):
        y = torch.relu(x)
        c["mask"] = y > 0
        return y

    def bwd(self, k, p, gy, c, gp, need_gx):
        return gy * c["mask"]

    def tfwd(self, k, p, rp, rx, c, s):
        return rx * c["mask"]

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        return rgy * c["mask"]


class LeakyReLU(Layer):
    """``max(x, 0) + slope · min(x, 0)``; its derivative is piecewise constant, so the tangents
    and both backwards are one product with the slope map, each one pass of ATen's
    ``leaky_relu_backward``. Cache: ``ref``, the output (a positive slope keeps every sign;
    the next layer keeps that tensor anyway) or else the input, and whether it is the output."""

    def __init__(self, slope):
        self.slope = float(slope)

    def fwd(self, k, p, x, c):
        y = F.leaky_relu(x, self.slope)
        c["ref"], c["is_out"] = (y, True) if self.slope > 0 else (x, False)
        return y

    def _d(self, g, c):
        return torch.ops.aten.leaky_relu_backward(g, c["ref"], self.slope, c["is_out"])

    def bwd(self, k, p, gy, c, gp, need_gx):
        return self._d(gy, c)

    def tfwd(self, k, p, rp, rx, c, s):
        return self._d(rx, c)

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        return self._d(rgy, c)


class GlobalAvgPool(Layer):
    """The mean over the spatial positions, ``[T, N, H, W, C] -> [T, N, C]`` (``x.mean((2, 3))``),
    or ``[T, N, 1, 1, C]`` with ``keep`` (``nn.AdaptiveAvgPool2d(1)``). Linear, so the tangent
    forward is the forward and the tangent backward the backward. Cache: ``shape``."""

    def __init__(self, keep=False):
        self.keep = keep

    def fwd(self, k, p, x, c):
        c["shape"] = x.shape
        return x.mean((2, 3), keepdim=self.keep)

    def bwd(self, k, p, gy, c, gp, need_gx):
        shape = c["shape"]
        g = gy / (shape[2] * shape[3])
        if not self.keep:
            g = g[:, :, None, None, :]
        return g.expand(shape).contiguous()

    def tfwd(self, k, p, rp, rx, c, s):
        return rx.mean((2, 3), keepdim=self.keep)

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        return self.bwd(k, p, rgy, c, rgp, need_gx)


class Residual(Layer):
    """``a(x) + b(x)``: two chains of layers from one input, summed (a residual block: the
    body and its shortcut; an empty chain is the identity). Each chain keeps the contract of the
    net's own chain; its caches and scratches are lists of dicts under ``c["a"]``/``c["b"]`` and
    ``s["a"]``/``s["b"]``. Inside a chain no cotangent is handed on as patches (``need_gx`` is
    ``True`` or ``False``, never ``"cols"``)."""

    def __init__(self, a, b):
        self.chains = (list(a), list(b))
        self.params = tuple(n for chain in self.chains for layer in chain for n in layer.params)
        if not any(layer.params for chain in self.chains for layer in chain):
            raise UnsupportedModel("a residual block without parameters")

    def native(self):
        return {k: v for chain in self.chains for layer in chain for k, v in layer.native().items()}

    def _split(self, p):
        """``p`` (this layer's views, :attr:`params` order) as one list per sub-layer, per chain."""
        out, i = [], 0
        for chain in self.chains:
            per = []
            for layer in chain:
                per.append(p[i:i + len(layer.params)])
                i += len(layer.params)
            out.append(per)
        return out

    def patches(self, k, x):
        """The data-only cache entries of each chain's first layer, when it is a convolution fed
        by the input (the net's first layer): made once per inner loop (see :meth:`Conv.patches`)."""
        return {"pre": tuple(chain[0].patches(k, x) if chain and isinstance(chain[0], Conv) else {} for chain in self.chains)}

    def fwd(self, k, p, x, c):
        pre = c.get("pre", ({}, {}))
        lean = {"lean": True} if c.get("lean") else {}
        out = []
        for name, chain, lp, first in zip("ab", self.chains, self._split(p), pre):
            caches = [{**lean, **first} if j == 0 else dict(lean) for j in range(len(chain))]  # `pre` is shared: copied
            h = x
            for layer, lc, q in zip(chain, caches, lp):
                h = layer.fwd(k, q, h, lc)
            c[name] = caches
            out.append(h)
        return out[0] + out[1]

    @staticmethod
    def _first(chain):
        return next((j for j, layer in enumerate(chain) if layer.params), len(chain))

    def _back(self, k, p, g, c, gp, need_gx, tangent, rp=None, s=None):
        gxs = []
        parts = zip("ab", self.chains, self._split(p), self._split(gp), self._split(rp) if tangent else (None, None))
        for name, chain, lp, lgp, lrp in parts:
            first, h = self._first(chain), g
            for j in range(len(chain) - 1, (0 if need_gx else first) - 1, -1):
                need = bool(need_gx) or j > first
                if tangent:
                    h = chain[j].tbwd(k, lp[j], lrp[j], h, c[name][j], s[name][j], lgp[j], need_gx=need)
                else:
                    h = chain[j].bwd(k, lp[j], h, c[name][j], lgp[j], need_gx=need)
            gxs.append(h)
        return gxs[0] + gxs[1] if need_gx else None

    def compact(self, c):
        for name, chain in zip("ab", self.chains):
            for layer, lc in zip(chain, c[name]):
                layer.compact(lc)

    def bwd(self, k, p, gy, c, gp, need_gx):
        return self._back(k, p, gy, c, gp, need_gx, tangent=False)

    def tfwd(self, k, p, rp, rx, c, s):
        out = []
        for name, chain, lp, lrp in zip("ab", self.chains, self._split(p), self._split(rp)):
            scratch = [{} for _ in chain]
            r = rx
            for layer, lc, ls, q, rq in zip(chain, c[name], scratch, lp, lrp):
                # Before a chain's first layer with parameters the tangent may be zero (data).
                r = layer.tfwd(k, q, rq, r, lc, ls) if (r is not None or layer.params) else None
            s[name] = scratch
            out.append(r)
        if out[0] is None or out[1] is None:
            return out[1] if out[0] is None else out[0]
        return out[0] + out[1]

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        return self._back(k, p, rgy, c, rgp, need_gx, tangent=True, rp=rp, s=s)


def leaf_layers(layers):
    """Every layer of ``layers``, the chains of :class:`Residual` blocks included, in order."""
    for layer in layers:
        if isinstance(layer, Residual):
            for chain in layer.chains:
                yield from leaf_layers(chain)
        else:
            yield layer


class Tanh(Layer):
    """Cache: ``y``; ``gy`` after ``bwd``. Scratch: ``ry``."""

    def fwd(self, k, p, x, c):
        y = torch.tanh(x)
        c["y"] = y
        return y

    def bwd(self, k, p, gy, c, gp, need_gx):
        c["gy"] = gy
        return gy * (1 - c["y"] * c["y"])

    def tfwd(self, k, p, rp, rx, c, s):
        ry = rx * (1 - c["y"] * c["y"])
        s["ry"] = ry
        return ry

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        y = c["y"]
        return rgy * (1 - y * y) - 2 * c["gy"] * y * s["ry"]


class MaxPool(Layer):
    """2×2 max-pool, stride 2, floor mode (odd rows/columns dropped, as in ``nn.MaxPool2d(2)``);
    the forward keeps the argmax (uint8) for the tangent (a gather) and the adjoint (a
    scatter). Cache: ``idx``, ``shape``."""

    def fwd(self, k, p, x, c):
        y, idx = k.maxpool_fwd(x)
        c.update(idx=idx, shape=x.shape)
        return y

    def bwd(self, k, p, gy, c, gp, need_gx):
        H, W = c["shape"][2], c["shape"][3]
        return k.maxpool_scatter(gy, c["idx"], H, W)

    def tfwd(self, k, p, rp, rx, c, s):
        return k.maxpool_gather(rx, c["idx"])

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        return self.bwd(k, p, rgy, c, rgp, need_gx)


class ZeroPad(Layer):
    """ZeroPad2d. Cache: ``shape``."""

    def __init__(self, m: nn.ZeroPad2d):
        self.padding = tuple(m.padding)
        self.l, self.r, self.t, self.b = m.padding

    def fwd(self, k, p, x, c):
        c["shape"] = x.shape
        return F.pad(x, (0, 0, self.l, self.r, self.t, self.b))

    def _crop(self, g):
        H, W = g.shape[2], g.shape[3]
        return g[:, :, self.t : H - self.b, self.l : W - self.r, :]

    def bwd(self, k, p, gy, c, gp, need_gx):
        return self._crop(gy)

    def tfwd(self, k, p, rp, rx, c, s):
        return F.pad(rx, (0, 0, self.l, self.r, self.t, self.b))

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        return self._crop(rgy)


class Flatten(Layer):
    """Flattens ``[T, N, H, W, C]`` (channels-last) to ``[T, N, H·W·C]``; the next Linear
    permutes its weight from the module's (C, H, W) order instead of the activations. Cache:
    ``shape``."""

    def fwd(self, k, p, x, c):
        c["shape"] = x.shape
        return x.reshape(x.shape[0], x.shape[1], -1)

    def bwd(self, k, p, gy, c, gp, need_gx):
        return gy.reshape(c["shape"])

    def tfwd(self, k, p, rp, rx, c, s):
        return rx.reshape(rx.shape[0], rx.shape[1], -1)

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        return rgy.reshape(c["shape"])


class Linear(Layer):
    """Cache: ``x`` (the input), ``w``; ``gy`` after ``bwd``; ``gb_done`` when the softmax kernel
    of the head already wrote the bias gradient (``softmax_ce_bias``). Scratch: ``rw``, ``rx``."""

    def __init__(self, m: nn.Linear, prefix, chw: Optional[tuple] = None):
        self.inf, self.outf = m.in_features, m.out_features
        self.bias = m.bias is not None
        self.chw = chw  # (C, H, W) of a channels-last input flattened by Flatten, else None
        self.params = (prefix + "weight",) + ((prefix + "bias",) if self.bias else ())

    def native(self):
        # After a channels-last Flatten the weight lives as [out, H, W, C] (the activations'
        # order) in the engine's layout.
        if self.chw is None or self.chw[0] == 1 or self.chw[1] * self.chw[2] == 1:
            return {}  # no input after a channels-last flatten, or one whose two orders agree
        C, H, W = self.chw
        w = self.params[0]
        return {w: (lambda t: t.view(t.shape[0], self.outf, C, H, W).permute(0, 1, 3, 4, 2),
                    lambda t: t.permute(0, 1, 4, 2, 3), (self.outf, H, W, C))}

    def _w(self, w):
        return w.reshape(w.shape[0], self.outf, self.inf)

    def fwd(self, k, p, x, c):
        w = self._w(p[0])
        c.update(x=x, w=w)
        x, w = lowp(x, c, "x_lp"), lowp(w, c, "w_lp")
        return P.baddbmm(p[1].unsqueeze(1), x, w.transpose(1, 2)) if self.bias else P.bmm(x, w.transpose(1, 2))

    def bwd(self, k, p, gy, c, gp, need_gx):
        c["gy"] = gy
        gy_lp = lowp(gy, c, "gy_lp")
        _bmm_into(gy_lp.transpose(1, 2), lowp(c["x"], c, "x_lp"), self._w(gp[0]))
        if self.bias and not c.get("gb_done"):  # the net's softmax may have written it
            _sum_into(gy, gp[1])
        return P.bmm(gy_lp, lowp(c["w"], c, "w_lp")) if need_gx else None

    def tfwd(self, k, p, rp, rx, c, s):
        rw = self._w(rp[0])
        s.update(rw=rw, rx=rx)
        x, rw = lowp(c["x"], c, "x_lp"), lowp(rw, s, "rw_lp")
        ry = P.baddbmm(rp[1].unsqueeze(1), x, rw.transpose(1, 2)) if self.bias else P.bmm(x, rw.transpose(1, 2))
        if rx is not None:
            P.baddbmm_(ry, lowp(rx, s, "rx_lp"), lowp(c["w"], c, "w_lp").transpose(1, 2))
        return ry

    def tbwd(self, k, p, rp, rgy, c, s, rgp, need_gx):
        gy, x = lowp(c["gy"], c, "gy_lp"), lowp(c["x"], c, "x_lp")
        rgy_lp = lowp(rgy)
        rgw = self._w(rgp[0])
        if s["rx"] is not None:
            _bmm_into(rgy_lp.transpose(1, 2), x, rgw, gy.transpose(1, 2), lowp(s["rx"], s, "rx_lp"))
        else:
            _bmm_into(rgy_lp.transpose(1, 2), x, rgw)
        if self.bias:
            _sum_into(rgy, rgp[1])
        if not need_gx:
            return None
        return P.baddbmm_(P.bmm(rgy_lp, lowp(c["w"], c, "w_lp")), gy, lowp(s["rw"], s, "rw_lp"))


class Branches:
    """A fork of a traced forward (:mod:`.trace`): two chains of ``(name, module)`` items from
    one input, summed; parsed into a :class:`Residual`."""

    def __init__(self, a, b):
        self.a, self.b = list(a), list(b)


class GlobalMean(nn.Module):
    """A traced ``x.mean((2, 3))`` (:mod:`.trace`): parsed into a :class:`GlobalAvgPool`."""


def parse_items(items, in_shape):
    """The layers of a model given as ``(name, module)`` items (an ``nn.Sequential``'s children,
    or :func:`.trace.traced_items`) and its number of classes (shape bookkeeping
    channels-last); raises :class:`UnsupportedModel` naming the first layer it cannot run."""
    shape = tuple(in_shape)  # per-example shape (C, H, W) or (D,)
    layers, shape, spatial = _parse_chain(items, shape, len(shape) == 3)
    if spatial or not layers:
        raise UnsupportedModel("the network must end in a Linear layer producing logits")
    return layers, shape[0]


def _parse_chain(mods, shape, spatial):
    layers = []
    i = 0
    while i < len(mods):
        name, m = mods[i]
        prefix = name + "."
        if isinstance(m, Branches):
            a, sa, pa = _parse_chain(m.a, shape, spatial)
            b, sb, pb = _parse_chain(m.b, shape, spatial)
            if (sa, pa) != (sb, pb):
                raise UnsupportedModel(f"the two sides of a residual sum have different shapes: {sa} and {sb}")
            layers.append(Residual(a, b))
            shape, spatial = sa, pa
        elif isinstance(m, nn.Conv2d):
            if not spatial or shape[0] != m.in_channels:
                raise UnsupportedModel(f"layer {name}: Conv2d input shape {shape} does not fit {m}")
            layer = Conv(m, prefix)
            if layers and isinstance(layers[-1], ZeroPad) and min(layers[-1].padding) >= 0:  # fold the pad into the conv
                pad = layers.pop()
                shape = (shape[0], shape[1] - pad.t - pad.b, shape[2] - pad.l - pad.r)
                layer.absorb(pad)
            shape = (m.out_channels, *layer.out_hw(shape[1], shape[2]))
            layers.append(layer)
        elif isinstance(m, nn.BatchNorm2d):
            relu = i + 1 < len(mods) and isinstance(mods[i + 1][1], nn.ReLU)
            layers.append(BatchNorm(m, prefix, relu))  # batch statistics (eval mode refused)
            if len(layers) > 1 and isinstance(layers[-2], Conv):
                layers[-2].dead_bias = True
            i += relu
        elif isinstance(m, nn.ReLU):
            layers.append(ReLU())
        elif isinstance(m, nn.LeakyReLU):
            layers.append(LeakyReLU(m.negative_slope))
        elif isinstance(m, (GlobalMean, nn.AdaptiveAvgPool2d)):
            keep = isinstance(m, nn.AdaptiveAvgPool2d)
            if keep and m.output_size not in (1, (1, 1)):
                raise UnsupportedModel(f"layer {name}: only AdaptiveAvgPool2d(1)")
            if not spatial:
                raise UnsupportedModel(f"layer {name}: a spatial mean of a non-spatial input")
            layers.append(GlobalAvgPool(keep))
            shape = (shape[0], 1, 1) if keep else (shape[0],)
            spatial = keep
        elif isinstance(m, nn.Tanh):
            layers.append(Tanh())
        elif isinstance(m, nn.MaxPool2d):
            if m.kernel_size not in (2, (2, 2)) or m.stride not in (2, (2, 2)) or m.padding not in (0, (0, 0)) or m.ceil_mode or m.dilation not in (1, (1, 1)):
                raise UnsupportedModel(f"layer {name}: only MaxPool2d(2)")
            layers.append(MaxPool())
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
        elif isinstance(m, nn.ZeroPad2d):
            layer = ZeroPad(m)
            layers.append(layer)
            shape = (shape[0], shape[1] + layer.t + layer.b, shape[2] + layer.l + layer.r)
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise UnsupportedModel(f"layer {name}: only Flatten(1, -1)")
            layers.append(Flatten())
        elif isinstance(m, nn.Linear):
            chw = shape if isinstance(layers[-1] if layers else None, Flatten) and spatial else None
            flat = shape[0] * shape[1] * shape[2] if spatial else shape[0]
            if flat != m.in_features:
                raise UnsupportedModel(f"layer {name}: Linear expects {m.in_features} inputs, gets {flat}")
            layers.append(Linear(m, prefix, chw))
            shape, spatial = (m.out_features,), False
        else:
            raise UnsupportedModel(f"layer {name}: {type(m).__name__} is not implemented by the engine")
        i += 1
    return layers, shape, spatial
