"""Triton kernels of the fused engine stages (imaml_kernels.triton.*) against the
pure-PyTorch twins in imaml_kernels.reference, through the Triton interpreter.

Every output is pre-filled with NaN (so an unwritten element fails), inputs are random and
non-zero, and each case runs in float64 (vs the reference: rtol 1e-10) and float32 (vs the
float64 reference on the same rounded inputs: 1e-5 relative on norms). Sizes stay small: the
interpreter costs ~10 ms per program instance.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does it too)

import struct  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # noqa: E402
    from imaml_kernels import reference as ref
    ref.bn_fwd  # noqa: B018 - the per-family references (imaml_kernels.reference.<family>)
except (ImportError, AttributeError):  # before the move
    from imaml_kernels import fused_reference as ref
from imaml_kernels.triton import _common, batchnorm, conv, prox, softmax_ce  # noqa: E402

DTYPES = (torch.float64, torch.float32)
# The interpreter turns a runtime loop bound (a 1-element array) into a Python int the way
# NumPy >= 1.25 deprecates; one warning per loop, harmless.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
EPS = 1e-5  # not fp32-exact: exercises the hi/lo scalar split


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _cast(t, dtype):
    return t.to(dtype) if t is not None and t.is_floating_point() else t


def _up(t):
    return t.double() if t is not None and t.is_floating_point() else t


def _close(out, want, what=""):
    """``out`` (float32 or float64) against the float64 ``want``."""
    assert not torch.isnan(out).any(), f"{what}: unwritten or NaN elements"
    if out.dtype == torch.float64:
        scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12 * scale, msg=lambda m: f"{what}: {m}")
    else:
        err = (out.double() - want).norm().item()
        assert err <= 1e-5 * want.norm().item() + 1e-30, (what, err, want.norm().item())


def _run(launch, reference, inputs, out_shapes, dtype, names):
    """Casts ``inputs`` to ``dtype``, launches into NaN-filled outputs, compares every output
    with ``reference`` evaluated in float64 on the cast inputs."""
    xs = [_cast(t, dtype) for t in inputs]
    outs = [_nan(*s, dtype=dtype) for s in out_shapes]
    launch(*xs, *outs)
    wants = reference(*[_up(t) for t in xs])
    for name, o, w in zip(names, outs, wants):
        _close(o, w, f"{name} {dtype}")
    return outs


# --------------------------------------------------------------------------- BatchNorm


def _bn_state(T, R, C, relu, seed):
    """Consistent inputs: forward and tangent-forward of the reference on random data."""
    g = _gen(seed)
    x = _randn(g, T, R, C, scale=2.0, shift=0.5)
    gamma, beta = _randn(g, T, C, shift=0.3), _randn(g, T, C, scale=0.5)
    rx = _randn(g, T, R, C)
    rgamma, rbeta = _randn(g, T, C), _randn(g, T, C)
    gy, rgy = _randn(g, T, R, C), _randn(g, T, R, C)
    y, xhat, rstd = ref.bn_fwd(x, gamma, beta, EPS, relu)
    relu_y = y if relu else None
    _, rxhat, a = ref.bn_tfwd(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y)
    return dict(x=x, gamma=gamma, beta=beta, rx=rx, rgamma=rgamma, rbeta=rbeta, gy=gy, rgy=rgy,
                y=y, xhat=xhat, rstd=rstd, relu_y=relu_y, rxhat=rxhat, a=a)


# --------------------------------------------------------------------------- prox step


@pytest.mark.parametrize("T,P", [(1, 1), (2, 37), (2, 5000)])  # 5000: 3 / 5 blocks per task
@pytest.mark.parametrize("shared", (False, True), ids=("theta", "shared-theta"))
@pytest.mark.parametrize("dtype", DTYPES, ids=("f64", "f32"))
def test_prox_step(T, P, shared, dtype):
    g = _gen(T * 7 + P)
    phi, grad = _randn(g, T, P).to(dtype), _randn(g, T, P).to(dtype)
    theta = (_randn(g, P) if shared else _randn(g, T, P)).to(dtype)
    lam = (torch.rand(T, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    lr = 0.1  # not fp32-exact
    want = ref.prox_step(phi.double().clone(), grad.double(), theta.double(), lam.double()[:, None], lr)
    out = phi.clone()
    prox.prox_step(out, grad, theta, lam, lr)
    _close(out, want, f"phi {dtype}")


# --------------------------------------------------------------------------- softmax cross-entropy


def _softmax_inputs(T, N, K, shift=0.0):
    g = _gen(17 * T + 3 * N + K)
    logits = _randn(g, T, N, K, scale=3.0, shift=shift)
    y = torch.randint(0, K, (T, N), generator=g)
    return logits, y


def _softmax_ref(logits, y):
    loss, prob = ref.softmax_ce(logits, y)
    return loss, prob, ref.softmax_ce_grad(prob, y)


# --------------------------------------------------------------------------- scalars, triton_op


@pytest.mark.parametrize("v", (1e-5, 0.1, 1e-3, 3.0, 0.0, -0.7, 1.0 / 3.0, 123456.789))
def test_scalar_split(v):
    # Each half survives the fp32 argument a CUDA kernel receives for a Python float; the
    # sum keeps ~48 bits (the interpreter passes floats exactly, so it cannot check this).
    hi, lo = _common.split_f64(v)
    for h in (hi, lo):
        assert struct.unpack("f", struct.pack("f", h))[0] == h
    assert abs((hi + lo) - v) <= 2.0**-46 * abs(v)


@torch.library.triton_op("imaml_fused_test::bn_fwd", mutates_args={"y", "xhat", "rstd"})
def _bn_fwd_op(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float, relu: bool, y: torch.Tensor,
               xhat: torch.Tensor, rstd: torch.Tensor) -> None:
    batchnorm.bn_fwd(x, gamma, beta, eps, relu, y, xhat, rstd, wrap=torch.library.wrap_triton)


@torch.library.triton_op("imaml_fused_test::bn_bwd", mutates_args={"gx", "ggamma", "gbeta"})
def _bn_bwd_op(gy: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor,
               relu_y: torch.Tensor | None, ggamma: torch.Tensor, gbeta: torch.Tensor, gx: torch.Tensor) -> None:
    batchnorm.bn_bwd(gy, xhat, rstd, gamma, relu_y, ggamma, gbeta, gx, wrap=torch.library.wrap_triton)


@torch.library.triton_op("imaml_fused_test::prox_step", mutates_args={"phi"})
def _prox_op(phi: torch.Tensor, grad: torch.Tensor, theta: torch.Tensor, lam: torch.Tensor, lr: float) -> None:
    prox.prox_step(phi, grad, theta, lam, lr, wrap=torch.library.wrap_triton)


@torch.library.triton_op("imaml_fused_test::col2im", mutates_args={"gx"})
def _col2im_op(gcols: torch.Tensor, H: int, W: int, s: int, ph: int, pw: int, gx: torch.Tensor) -> None:
    conv.col2im(gcols, H, W, s, ph, pw, gx, wrap=torch.library.wrap_triton)


@torch.library.triton_op("imaml_fused_test::softmax_ce", mutates_args={"loss", "prob", "grad"})
def _softmax_ce_op(logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor, prob: torch.Tensor,
                   grad: torch.Tensor) -> None:
    softmax_ce.softmax_ce(logits, y, loss, prob, grad, wrap=torch.library.wrap_triton)


def test_launch_inside_triton_op():
    """The launchers run with wrap=torch.library.wrap_triton inside a triton_op (floats,
    bools, ints, an optional tensor, constexpr keywords) and give the direct launch's bits."""
    T, R, C = 2, 7, 5
    s = _bn_state(T, R, C, True, seed=5)
    outs = [_nan(*sh, dtype=torch.float64) for sh in ((T, R, C), (T, R, C), (T, C))]
    _bn_fwd_op(s["x"], s["gamma"], s["beta"], EPS, True, *outs)
    want = [_nan(*o.shape, dtype=torch.float64) for o in outs]
    batchnorm.bn_fwd(s["x"], s["gamma"], s["beta"], EPS, True, *want)
    assert all(torch.equal(o, w) for o, w in zip(outs, want))

    for relu_y in (s["relu_y"], None):
        outs = [_nan(*sh, dtype=torch.float64) for sh in ((T, R, C), (T, C), (T, C))]
        _bn_bwd_op(s["gy"], s["xhat"], s["rstd"], s["gamma"], relu_y, outs[1], outs[2], outs[0])  # outs: gx, ggamma, gbeta
        for o, w in zip(outs, ref.bn_bwd(s["gy"], s["xhat"], s["rstd"], s["gamma"], relu_y)):
            _close(o, w, "bn_bwd op")

    phi, grad, theta = s["x"][0], s["gy"][0], s["rx"][0, 0]  # [7, 5] tasks, shared theta [5]
    lam = torch.rand(R, dtype=torch.float64) + 0.5
    out = phi.clone()
    _prox_op(out, grad, theta, lam, 0.1)
    _close(out, ref.prox_step(phi.clone(), grad, theta, lam[:, None], 0.1), "prox op")

    gcols = _randn(_gen(9), 1, 2, 3, 3, 3, 3, C)
    gx = _nan(1, 2, 5, 5, C, dtype=torch.float64)
    _col2im_op(gcols, 5, 5, 2, 1, 1, gx)
    _close(gx, ref.col2im(gcols, 5, 5, 2, 1, 1), "col2im op")

    logits, y = _softmax_inputs(2, 7, 5)
    outs = [_nan(*sh, dtype=torch.float64) for sh in ((2,), (2, 7, 5), (2, 7, 5))]
    _softmax_ce_op(logits, y, *outs)
    for o, w, n in zip(outs, _softmax_ref(logits, y), ("loss", "prob", "grad")):
        _close(o, w, f"softmax_ce op {n}")
