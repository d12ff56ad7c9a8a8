"""The engine's fused elementwise stages as ``imaml::`` ops, one per kernel and backend.

Each stage computes a primal and its tangent (or a cotangent) in one pass over the data:

- ``bn_fwd`` / ``bn_bwd`` / ``bn_tfwd`` / ``bn_tbwd``: BatchNorm with batch statistics per
  ``(task, channel)`` over ``x [T, R, C]`` (channels-last rows), optionally followed by ReLU;
- ``softmax_ce`` (loss, softmax and gradient together) and ``softmax_ce_tangent``;
- ``im2col`` (zero padding fused) and its adjoint ``col2im`` (a gather, no atomics);
- ``maxpool_fwd`` (2×2 max and its argmax) with its tangent ``maxpool_gather`` and adjoint
  ``maxpool_scatter``;
- ``prox_step``: the proximal gradient step of the fused inner loop, in place.

Backends, chosen by :func:`engine_backend` from static facts (the one dispatch point,
:mod:`imaml_kernels.dispatch`): C++ (OpenMP) on CPU tensors (``imaml::<name>``), Triton on
CUDA tensors (``imaml::<name>_triton``; on the CPU only through the interpreter and only when
named), and the pure-PyTorch twins of :mod:`imaml_kernels.fused_reference` anywhere. The
engine has no hand-written CUDA C++ kernels: on a GPU, "cuda" resolves to Triton. Every op has
a fake implementation, so ``torch.compile(fullgraph=True)`` traces the engine.
"""

import os
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from . import _ext
from . import fused_reference as ref
from .dispatch import backend_problems, select_backend
from .ops import _dtype_code, _expect

# --------------------------------------------------------------------------- dispatch


def _cpu_kernels_built():
    return _ext.HAS_EXT and hasattr(_ext._C, "maxpool_fwd_cpu")


def engine_backend(t: Tensor, backend: Optional[str] = None) -> str:
    """``"cpu"``, ``"triton"`` or ``"reference"`` for the engine's stages on ``t``'s device/dtype.

    The CG kernels' dispatch decides (explicit argument, then ``IMAML_BACKEND``, then the
    automatic order); "cuda" maps to "triton" here (the engine's GPU kernels are Triton),
    and "cpu" falls back to the reference when the extension predates the engine kernels."""
    name = select_backend(t.device, t.dtype, backend)
    if name == "cuda":
        name = "reference" if backend_problems("triton", t.device, t.dtype) else "triton"
    if name == "cpu" and not _cpu_kernels_built():
        if (backend or os.environ.get("IMAML_BACKEND")) == "cpu":
            raise RuntimeError("imaml_kernels: backend 'cpu': the native extension lacks the engine kernels (rebuild it)")
        name = "reference"
    return name


# --------------------------------------------------------------------------- validation


def _check_rows(name, t, like=None):
    _expect(isinstance(t, Tensor), TypeError, f"{name} must be a tensor, got {type(t).__name__}")
    _expect(t.dim() == 3, ValueError, f"{name} must be [T, R, C], got shape {tuple(t.shape)}")
    _expect(t.dtype in (torch.float32, torch.float64), TypeError, f"{name} must be float32 or float64, got {t.dtype}")
    _expect(t.is_contiguous(), ValueError, f"{name} must be contiguous")
    if like is not None:
        _expect(t.shape == like.shape, ValueError, f"{name} must have shape {tuple(like.shape)}, got {tuple(t.shape)}")
        _expect(t.dtype == like.dtype, TypeError, f"{name} must have dtype {like.dtype}, got {t.dtype}")
        _expect(t.device == like.device, ValueError, f"{name} must be on {like.device}, got {t.device}")


def _check_stat(name, t, like):
    T, _, C = like.shape
    _expect(isinstance(t, Tensor), TypeError, f"{name} must be a tensor, got {type(t).__name__}")
    _expect(tuple(t.shape) == (T, C), ValueError, f"{name} must have shape ({T}, {C}), got {tuple(t.shape)}")
    _expect(t.dtype == like.dtype, TypeError, f"{name} must have dtype {like.dtype}, got {t.dtype}")
    _expect(t.device == like.device, ValueError, f"{name} must be on {like.device}, got {t.device}")
    _expect(t.is_contiguous(), ValueError, f"{name} must be contiguous")


def _check_bn(rows, stats, relu_y, like):
    for name, t in rows:
        _check_rows(name, t, like)
    for name, t in stats:
        _check_stat(name, t, like)
    if relu_y is not None:
        _check_rows("relu_y", relu_y, like)


def _check_logits(name, t, like=None):
    _check_rows(name, t, like)


def _check_labels(y, logits):
    _expect(isinstance(y, Tensor) and y.dtype == torch.int64, TypeError, "y must be an int64 tensor of class labels")
    _expect(tuple(y.shape) == tuple(logits.shape[:2]), ValueError, f"y must have shape {tuple(logits.shape[:2])}, got {tuple(y.shape)}")
    _expect(y.is_contiguous() and y.device == logits.device, ValueError, "y must be contiguous and on the logits' device")


def _addr(t):
    return 0 if t is None else t.data_ptr()


def _stats(x):
    return x.new_empty(x.shape[0], x.shape[2])


def _triton():
    from .triton import engine as k

    return k


# --------------------------------------------------------------------------- BatchNorm(+ReLU)


def _bn_fwd_fake(x, gamma, beta, eps, relu):
    _check_bn([("x", x)], [("gamma", gamma), ("beta", beta)], None, x)
    return torch.empty_like(x), torch.empty_like(x), _stats(x)


@custom_op("imaml::bn_fwd", mutates_args=())
def _bn_fwd_cpu(x: Tensor, gamma: Tensor, beta: Tensor, eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    y, xhat, rstd = _bn_fwd_fake(x, gamma, beta, eps, relu)
    T, R, C = x.shape
    _ext._C.bn_fwd_cpu(_dtype_code(x), x.data_ptr(), gamma.data_ptr(), beta.data_ptr(), y.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), T, R, C, eps, relu)
    return y, xhat, rstd


@triton_op("imaml::bn_fwd_triton", mutates_args=())
def _bn_fwd_triton(x: Tensor, gamma: Tensor, beta: Tensor, eps: float, relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    y, xhat, rstd = _bn_fwd_fake(x, gamma, beta, eps, relu)
    _triton().bn_fwd(x, gamma, beta, y, xhat, rstd, eps, relu, wrap=wrap_triton)
    return y, xhat, rstd


_bn_fwd_cpu.register_fake(_bn_fwd_fake)
_bn_fwd_triton.register_fake(_bn_fwd_fake)


def _bn_bwd_fake(gy, xhat, rstd, gamma, relu_y):
    _check_bn([("gy", gy), ("xhat", xhat)], [("rstd", rstd), ("gamma", gamma)], relu_y, gy)
    return torch.empty_like(gy), _stats(gy), _stats(gy)


@custom_op("imaml::bn_bwd", mutates_args=())
def _bn_bwd_cpu(gy: Tensor, xhat: Tensor, rstd: Tensor, gamma: Tensor, relu_y: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    gx, gg, gb = _bn_bwd_fake(gy, xhat, rstd, gamma, relu_y)
    T, R, C = gy.shape
    _ext._C.bn_bwd_cpu(_dtype_code(gy), gy.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), gamma.data_ptr(), _addr(relu_y), gx.data_ptr(), gg.data_ptr(), gb.data_ptr(), T, R, C)
    return gx, gg, gb


@triton_op("imaml::bn_bwd_triton", mutates_args=())
def _bn_bwd_triton(gy: Tensor, xhat: Tensor, rstd: Tensor, gamma: Tensor, relu_y: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    gx, gg, gb = _bn_bwd_fake(gy, xhat, rstd, gamma, relu_y)
    _triton().bn_bwd(gy, xhat, rstd, gamma, relu_y, gx, gg, gb, wrap=wrap_triton)
    return gx, gg, gb


_bn_bwd_cpu.register_fake(_bn_bwd_fake)
_bn_bwd_triton.register_fake(_bn_bwd_fake)


def _bn_tfwd_fake(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y):
    _check_bn([("rx", rx), ("xhat", xhat)], [("rstd", rstd), ("gamma", gamma), ("rgamma", rgamma), ("rbeta", rbeta)], relu_y, rx)
    return torch.empty_like(rx), torch.empty_like(rx), _stats(rx)


@custom_op("imaml::bn_tfwd", mutates_args=())
def _bn_tfwd_cpu(
    rx: Tensor, xhat: Tensor, rstd: Tensor, gamma: Tensor, rgamma: Tensor, rbeta: Tensor, relu_y: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    ry, rxhat, a = _bn_tfwd_fake(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y)
    T, R, C = rx.shape
    _ext._C.bn_tfwd_cpu(
        _dtype_code(rx), rx.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), gamma.data_ptr(), rgamma.data_ptr(), rbeta.data_ptr(),
        _addr(relu_y), ry.data_ptr(), rxhat.data_ptr(), a.data_ptr(), T, R, C,
    )
    return ry, rxhat, a


@triton_op("imaml::bn_tfwd_triton", mutates_args=())
def _bn_tfwd_triton(
    rx: Tensor, xhat: Tensor, rstd: Tensor, gamma: Tensor, rgamma: Tensor, rbeta: Tensor, relu_y: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    ry, rxhat, a = _bn_tfwd_fake(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y)
    _triton().bn_tfwd(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y, ry, rxhat, a, wrap=wrap_triton)
    return ry, rxhat, a


_bn_tfwd_cpu.register_fake(_bn_tfwd_fake)
_bn_tfwd_triton.register_fake(_bn_tfwd_fake)


def _bn_tbwd_fake(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y):
    _check_bn(
        [("gy", gy), ("rgy", rgy), ("xhat", xhat), ("rxhat", rxhat)],
        [("rstd", rstd), ("a", a), ("gamma", gamma), ("rgamma", rgamma)],
        relu_y,
        gy,
    )
    return torch.empty_like(gy), _stats(gy), _stats(gy)


@custom_op("imaml::bn_tbwd", mutates_args=())
def _bn_tbwd_cpu(
    gy: Tensor, rgy: Tensor, xhat: Tensor, rxhat: Tensor, rstd: Tensor, a: Tensor, gamma: Tensor, rgamma: Tensor,
    relu_y: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    rgx, rgg, rgb = _bn_tbwd_fake(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y)
    T, R, C = gy.shape
    _ext._C.bn_tbwd_cpu(
        _dtype_code(gy), gy.data_ptr(), rgy.data_ptr(), xhat.data_ptr(), rxhat.data_ptr(), rstd.data_ptr(), a.data_ptr(),
        gamma.data_ptr(), rgamma.data_ptr(), _addr(relu_y), rgx.data_ptr(), rgg.data_ptr(), rgb.data_ptr(), T, R, C,
    )
    return rgx, rgg, rgb


@triton_op("imaml::bn_tbwd_triton", mutates_args=())
def _bn_tbwd_triton(
    gy: Tensor, rgy: Tensor, xhat: Tensor, rxhat: Tensor, rstd: Tensor, a: Tensor, gamma: Tensor, rgamma: Tensor,
    relu_y: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    rgx, rgg, rgb = _bn_tbwd_fake(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y)
    _triton().bn_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rgx, rgg, rgb, wrap=wrap_triton)
    return rgx, rgg, rgb


_bn_tbwd_cpu.register_fake(_bn_tbwd_fake)
_bn_tbwd_triton.register_fake(_bn_tbwd_fake)


# --------------------------------------------------------------------------- softmax cross-entropy


def _softmax_ce_fake(logits, y):
    _check_logits("logits", logits)
    _check_labels(y, logits)
    return logits.new_empty(logits.shape[0]), torch.empty_like(logits), torch.empty_like(logits)


@custom_op("imaml::softmax_ce", mutates_args=())
def _softmax_ce_cpu(logits: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    loss, prob, grad = _softmax_ce_fake(logits, y)
    T, N, K = logits.shape
    _ext._C.softmax_ce_cpu(_dtype_code(logits), logits.data_ptr(), y.data_ptr(), loss.data_ptr(), prob.data_ptr(), grad.data_ptr(), T, N, K)
    return loss, prob, grad


@triton_op("imaml::softmax_ce_triton", mutates_args=())
def _softmax_ce_triton(logits: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    loss, prob, grad = _softmax_ce_fake(logits, y)
    _triton().softmax_ce(logits, y, loss, prob, grad, wrap=wrap_triton)
    return loss, prob, grad


_softmax_ce_cpu.register_fake(_softmax_ce_fake)
_softmax_ce_triton.register_fake(_softmax_ce_fake)


def _softmax_ce_tangent_fake(prob, rlogits):
    _check_logits("prob", prob)
    _check_logits("rlogits", rlogits, prob)
    return torch.empty_like(prob)


@custom_op("imaml::softmax_ce_tangent", mutates_args=())
def _softmax_ce_tangent_cpu(prob: Tensor, rlogits: Tensor) -> Tensor:
    rg = _softmax_ce_tangent_fake(prob, rlogits)
    T, N, K = prob.shape
    _ext._C.softmax_ce_tangent_cpu(_dtype_code(prob), prob.data_ptr(), rlogits.data_ptr(), rg.data_ptr(), T, N, K)
    return rg


@triton_op("imaml::softmax_ce_tangent_triton", mutates_args=())
def _softmax_ce_tangent_triton(prob: Tensor, rlogits: Tensor) -> Tensor:
    rg = _softmax_ce_tangent_fake(prob, rlogits)
    _triton().softmax_ce_tangent(prob, rlogits, rg, wrap=wrap_triton)
    return rg


_softmax_ce_tangent_cpu.register_fake(_softmax_ce_tangent_fake)
_softmax_ce_tangent_triton.register_fake(_softmax_ce_tangent_fake)


# --------------------------------------------------------------------------- max-pool 2x2


def _check_pool_in(name, x):
    _expect(isinstance(x, Tensor) and x.dim() == 5, ValueError, f"{name} must be [T, N, H, W, C], got {tuple(getattr(x, 'shape', ()))}")
    _expect(x.dtype in (torch.float32, torch.float64), TypeError, f"{name} must be float32 or float64, got {x.dtype}")
    _expect(x.is_contiguous(), ValueError, f"{name} must be contiguous")


def _check_pool_idx(idx, shape):
    _expect(isinstance(idx, Tensor) and idx.dtype == torch.uint8 and tuple(idx.shape) == tuple(shape) and idx.is_contiguous(),
            ValueError, f"idx must be a contiguous uint8 tensor of shape {tuple(shape)}")


def _pooled(x):
    T, N, H, W, C = x.shape
    return (T, N, H // 2, W // 2, C)


def _maxpool_fwd_fake(x):
    _check_pool_in("x", x)
    shape = _pooled(x)
    return x.new_empty(shape), torch.empty(shape, dtype=torch.uint8, device=x.device)


@custom_op("imaml::maxpool_fwd", mutates_args=())
def _maxpool_fwd_cpu(x: Tensor) -> Tuple[Tensor, Tensor]:
    y, idx = _maxpool_fwd_fake(x)
    _ext._C.maxpool_fwd_cpu(_dtype_code(x), x.data_ptr(), y.data_ptr(), idx.data_ptr(), *x.shape)
    return y, idx


@triton_op("imaml::maxpool_fwd_triton", mutates_args=())
def _maxpool_fwd_triton(x: Tensor) -> Tuple[Tensor, Tensor]:
    y, idx = _maxpool_fwd_fake(x)
    _triton().maxpool_fwd(x, y, idx, wrap=wrap_triton)
    return y, idx


_maxpool_fwd_cpu.register_fake(_maxpool_fwd_fake)
_maxpool_fwd_triton.register_fake(_maxpool_fwd_fake)


def _maxpool_gather_fake(x, idx):
    _check_pool_in("x", x)
    _check_pool_idx(idx, _pooled(x))
    return x.new_empty(_pooled(x))


@custom_op("imaml::maxpool_gather", mutates_args=())
def _maxpool_gather_cpu(x: Tensor, idx: Tensor) -> Tensor:
    y = _maxpool_gather_fake(x, idx)
    _ext._C.maxpool_gather_cpu(_dtype_code(x), x.data_ptr(), idx.data_ptr(), y.data_ptr(), *x.shape)
    return y


@triton_op("imaml::maxpool_gather_triton", mutates_args=())
def _maxpool_gather_triton(x: Tensor, idx: Tensor) -> Tensor:
    y = _maxpool_gather_fake(x, idx)
    _triton().maxpool_gather(x, idx, y, wrap=wrap_triton)
    return y


_maxpool_gather_cpu.register_fake(_maxpool_gather_fake)
_maxpool_gather_triton.register_fake(_maxpool_gather_fake)


def _maxpool_scatter_fake(gy, idx, H: int, W: int):
    _check_pool_in("gy", gy)
    T, N, Ho, Wo, C = gy.shape
    _expect(H // 2 == Ho and W // 2 == Wo, ValueError, f"H={H}, W={W} do not pool to {Ho}x{Wo}")
    _check_pool_idx(idx, gy.shape)
    return gy.new_empty(T, N, H, W, C)


@custom_op("imaml::maxpool_scatter", mutates_args=())
def _maxpool_scatter_cpu(gy: Tensor, idx: Tensor, H: int, W: int) -> Tensor:
    gx = _maxpool_scatter_fake(gy, idx, H, W)
    T, N, _, _, C = gy.shape
    _ext._C.maxpool_scatter_cpu(_dtype_code(gy), gy.data_ptr(), idx.data_ptr(), gx.data_ptr(), T, N, H, W, C)
    return gx


@triton_op("imaml::maxpool_scatter_triton", mutates_args=())
def _maxpool_scatter_triton(gy: Tensor, idx: Tensor, H: int, W: int) -> Tensor:
    gx = _maxpool_scatter_fake(gy, idx, H, W)
    _triton().maxpool_scatter(gy, idx, gx, wrap=wrap_triton)
    return gx


_maxpool_scatter_cpu.register_fake(_maxpool_scatter_fake)
_maxpool_scatter_triton.register_fake(_maxpool_scatter_fake)


# --------------------------------------------------------------------------- im2col / col2im


def _im2col_fake(x, Ho: int, Wo: int, k: int, s: int, ph: int, pw: int):
    _expect(isinstance(x, Tensor) and x.dim() == 5, ValueError, f"x must be [T, N, H, W, C], got {tuple(getattr(x, 'shape', ()))}")
    _expect(x.dtype in (torch.float32, torch.float64), TypeError, f"x must be float32 or float64, got {x.dtype}")
    _expect(x.is_contiguous(), ValueError, "x must be contiguous")
    _expect(k >= 1 and s >= 1 and ph >= 0 and pw >= 0 and Ho >= 1 and Wo >= 1, ValueError,
            f"bad geometry Ho={Ho} Wo={Wo} k={k} s={s} ph={ph} pw={pw}")
    T, N, _, _, C = x.shape
    return x.new_empty(T, N, Ho, Wo, k, k, C)


@custom_op("imaml::im2col", mutates_args=())
def _im2col_cpu(x: Tensor, Ho: int, Wo: int, k: int, s: int, ph: int, pw: int) -> Tensor:
    cols = _im2col_fake(x, Ho, Wo, k, s, ph, pw)
    T, N, H, W, C = x.shape
    _ext._C.im2col_cpu(_dtype_code(x), x.data_ptr(), cols.data_ptr(), T, N, H, W, C, Ho, Wo, k, s, ph, pw)
    return cols


@triton_op("imaml::im2col_triton", mutates_args=())
def _im2col_triton(x: Tensor, Ho: int, Wo: int, k: int, s: int, ph: int, pw: int) -> Tensor:
    cols = _im2col_fake(x, Ho, Wo, k, s, ph, pw)
    _triton().im2col(x, cols, k, s, ph, pw, wrap=wrap_triton)
    return cols


_im2col_cpu.register_fake(_im2col_fake)
_im2col_triton.register_fake(_im2col_fake)


def _col2im_fake(gcols, H: int, W: int, s: int, ph: int, pw: int):
    _expect(gcols.dim() == 7 and gcols.shape[4] == gcols.shape[5], ValueError, f"gcols must be [T, N, Ho, Wo, k, k, C], got {tuple(gcols.shape)}")
    _expect(gcols.is_contiguous(), ValueError, "gcols must be contiguous")
    _expect(s >= 1 and ph >= 0 and pw >= 0 and H >= 1 and W >= 1, ValueError, f"bad geometry H={H} W={W} s={s} ph={ph} pw={pw}")
    T, N, _, _, _, _, C = gcols.shape
    return gcols.new_empty(T, N, H, W, C)


@custom_op("imaml::col2im", mutates_args=())
def _col2im_cpu(gcols: Tensor, H: int, W: int, s: int, ph: int, pw: int) -> Tensor:
    gx = _col2im_fake(gcols, H, W, s, ph, pw)
    T, N, Ho, Wo, k, _, C = gcols.shape
    _ext._C.col2im_cpu(_dtype_code(gcols), gcols.data_ptr(), gx.data_ptr(), T, N, H, W, C, Ho, Wo, k, s, ph, pw)
    return gx


@triton_op("imaml::col2im_triton", mutates_args=())
def _col2im_triton(gcols: Tensor, H: int, W: int, s: int, ph: int, pw: int) -> Tensor:
    gx = _col2im_fake(gcols, H, W, s, ph, pw)
    _triton().col2im(gcols, gx, gcols.shape[4], s, ph, pw, wrap=wrap_triton)
    return gx


_col2im_cpu.register_fake(_col2im_fake)
_col2im_triton.register_fake(_col2im_fake)


# --------------------------------------------------------------------------- proximal step


def _check_prox(phi, grad, theta, lam):
    _expect(phi.dim() == 2 and phi.is_contiguous(), ValueError, f"phi must be a contiguous [T, P], got {tuple(phi.shape)}")
    _expect(phi.dtype in (torch.float32, torch.float64), TypeError, f"phi must be float32 or float64, got {phi.dtype}")
    _expect(grad.shape == phi.shape and grad.dtype == phi.dtype and grad.is_contiguous(), ValueError, "grad must match phi (shape, dtype, contiguous)")
    _expect(
        (theta.dim() == 1 and theta.shape[0] == phi.shape[1]) or theta.shape == phi.shape,
        ValueError, f"theta must be [P] or [T, P] with P={phi.shape[1]}, got {tuple(theta.shape)}",
    )
    _expect(theta.dtype == phi.dtype and theta.is_contiguous(), ValueError, "theta must match phi's dtype and be contiguous")
    _expect(tuple(lam.shape) == (phi.shape[0],) and lam.dtype == phi.dtype, ValueError, f"lam must be [{phi.shape[0]}] of dtype {phi.dtype}")


@custom_op("imaml::prox_step", mutates_args=("phi",))
def _prox_step_cpu(phi: Tensor, grad: Tensor, theta: Tensor, lam: Tensor, lr: float) -> None:
    _check_prox(phi, grad, theta, lam)
    T, P = phi.shape
    _ext._C.prox_step_cpu(_dtype_code(phi), phi.data_ptr(), grad.data_ptr(), theta.data_ptr(), 0 if theta.dim() == 1 else P, lam.data_ptr(), lr, T, P)


@triton_op("imaml::prox_step_triton", mutates_args={"phi"})
def _prox_step_triton(phi: Tensor, grad: Tensor, theta: Tensor, lam: Tensor, lr: float) -> None:
    _check_prox(phi, grad, theta, lam)
    _triton().prox_step(phi, grad, theta, lam, lr, wrap=wrap_triton)


@_prox_step_cpu.register_fake
def _(phi, grad, theta, lam, lr):
    _check_prox(phi, grad, theta, lam)


@_prox_step_triton.register_fake
def _(phi, grad, theta, lam, lr):
    _check_prox(phi, grad, theta, lam)


# --------------------------------------------------------------------------- public functions


def _c(t):
    return None if t is None else t.contiguous()


def bn_fwd(x, gamma, beta, eps: float, relu: bool, backend=None):
    """BatchNorm (batch statistics) [+ ReLU]: ``x [T,R,C]``, ``gamma, beta [T,C]`` ->
    ``(y, xhat [T,R,C], rstd [T,C])``."""
    b = engine_backend(x, backend)
    args = (x.contiguous(), gamma.contiguous(), beta.contiguous(), float(eps), bool(relu))
    if b == "cpu":
        return torch.ops.imaml.bn_fwd(*args)
    if b == "triton":
        return torch.ops.imaml.bn_fwd_triton(*args)
    return ref.bn_fwd(*args)


def bn_bwd(gy, xhat, rstd, gamma, relu_y, backend=None):
    """-> ``(gx [T,R,C], ggamma [T,C], gbeta [T,C])`` (``relu_y``: the stage's output when a
    ReLU follows, else ``None``)."""
    b = engine_backend(gy, backend)
    args = (gy.contiguous(), xhat, rstd, gamma.contiguous(), _c(relu_y))
    if b == "cpu":
        return torch.ops.imaml.bn_bwd(*args)
    if b == "triton":
        return torch.ops.imaml.bn_bwd_triton(*args)
    return ref.bn_bwd(*args)


def bn_tfwd(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y, backend=None):
    """Tangent forward -> ``(ry, rxhat [T,R,C], a [T,C])``."""
    b = engine_backend(rx, backend)
    args = (rx.contiguous(), xhat, rstd, gamma.contiguous(), rgamma.contiguous(), rbeta.contiguous(), _c(relu_y))
    if b == "cpu":
        return torch.ops.imaml.bn_tfwd(*args)
    if b == "triton":
        return torch.ops.imaml.bn_tfwd_triton(*args)
    return ref.bn_tfwd(*args)


def bn_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, backend=None):
    """Tangent backward -> ``(rgx [T,R,C], rggamma [T,C], rgbeta [T,C])``."""
    b = engine_backend(gy, backend)
    args = (gy.contiguous(), rgy.contiguous(), xhat, rxhat, rstd, a, gamma.contiguous(), rgamma.contiguous(), _c(relu_y))
    if b == "cpu":
        return torch.ops.imaml.bn_tbwd(*args)
    if b == "triton":
        return torch.ops.imaml.bn_tbwd_triton(*args)
    return ref.bn_tbwd(*args)


def softmax_ce(logits, y, backend=None):
    """``logits [T,N,K]``, ``y [T,N]`` -> ``(loss [T], prob [T,N,K], grad [T,N,K])``: the mean
    cross-entropy per task, the softmax and ``∂loss_t/∂logits``."""
    b = engine_backend(logits, backend)
    logits, y = logits.contiguous(), y.to(torch.int64).contiguous()
    if b == "cpu":
        return torch.ops.imaml.softmax_ce(logits, y)
    if b == "triton":
        return torch.ops.imaml.softmax_ce_triton(logits, y)
    loss, prob = ref.softmax_ce(logits, y)
    return loss, prob, ref.softmax_ce_grad(prob, y)


def softmax_ce_tangent(prob, rlogits, backend=None):
    """``p ⊙ (ṡ − ⟨p, ṡ⟩) / N``: ``[T,N,K]``."""
    b = engine_backend(prob, backend)
    rlogits = rlogits.contiguous()
    if b == "cpu":
        return torch.ops.imaml.softmax_ce_tangent(prob, rlogits)
    if b == "triton":
        return torch.ops.imaml.softmax_ce_tangent_triton(prob, rlogits)
    return ref.softmax_ce_tangent(prob, rlogits)


def maxpool_fwd(x, backend=None):
    """2×2 max-pool, stride 2, floor mode: ``x [T,N,H,W,C]`` -> ``(y, idx)``, both
    ``[T,N,H//2,W//2,C]`` (``idx`` uint8 ``2·di + dj`` of the first maximum)."""
    b = engine_backend(x, backend)
    x = x.contiguous()
    if b == "cpu":
        return torch.ops.imaml.maxpool_fwd(x)
    if b == "triton":
        return torch.ops.imaml.maxpool_fwd_triton(x)
    return ref.maxpool_fwd(x)


def maxpool_gather(x, idx, backend=None):
    """The max-pool's tangent: ``x [T,N,H,W,C]`` at ``idx`` -> ``[T,N,H//2,W//2,C]``."""
    b = engine_backend(x, backend)
    x = x.contiguous()
    if b == "cpu":
        return torch.ops.imaml.maxpool_gather(x, idx)
    if b == "triton":
        return torch.ops.imaml.maxpool_gather_triton(x, idx)
    return ref.maxpool_gather(x, idx)


def maxpool_scatter(gy, idx, H: int, W: int, backend=None):
    """The max-pool's adjoint: ``gy`` at ``idx`` -> ``[T,N,H,W,C]`` (0 elsewhere)."""
    b = engine_backend(gy, backend)
    gy = gy.contiguous()
    if b == "cpu":
        return torch.ops.imaml.maxpool_scatter(gy, idx, H, W)
    if b == "triton":
        return torch.ops.imaml.maxpool_scatter_triton(gy, idx, H, W)
    return ref.maxpool_scatter(gy, idx, H, W)


def im2col(x, Ho: int, Wo: int, k: int, s: int, ph: int, pw: int, backend=None):
    """``x [T,N,H,W,C]`` -> the zero-padded conv patches ``[T,N,Ho,Wo,k,k,C]``."""
    b = engine_backend(x, backend)
    x = x.contiguous()
    if b == "cpu":
        return torch.ops.imaml.im2col(x, Ho, Wo, k, s, ph, pw)
    if b == "triton":
        return torch.ops.imaml.im2col_triton(x, Ho, Wo, k, s, ph, pw)
    return ref.im2col(x, Ho, Wo, k, s, ph, pw)


def col2im(gcols, H: int, W: int, s: int, ph: int, pw: int, backend=None):
    """``gcols [T,N,Ho,Wo,k,k,C]`` -> the unpadded input gradient ``[T,N,H,W,C]``."""
    b = engine_backend(gcols, backend)
    gcols = gcols.contiguous()
    if b == "cpu":
        return torch.ops.imaml.col2im(gcols, H, W, s, ph, pw)
    if b == "triton":
        return torch.ops.imaml.col2im_triton(gcols, H, W, s, ph, pw)
    return ref.col2im(gcols, H, W, s, ph, pw)


def prox_step(phi, grad, theta, lam, lr: float, backend=None):
    """In place ``φ ← φ − lr (g + λ (φ − θ))``: ``phi, grad [T,P]``, ``theta [P]`` or
    ``[T,P]``, ``lam [T]``."""
    b = engine_backend(phi, backend)
    if b == "cpu":
        torch.ops.imaml.prox_step(phi, grad, theta, lam, float(lr))
    elif b == "triton":
        torch.ops.imaml.prox_step_triton(phi, grad, theta, lam, float(lr))
    else:
        ref.prox_step(phi, grad, theta if theta.dim() == 2 else theta.unsqueeze(0), lam.unsqueeze(1), lr)
    return phi
