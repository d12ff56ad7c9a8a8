"""The C++ (OpenMP) kernels of the engine's fused stages against their pure-PyTorch twins in
:mod:`imaml_kernels.reference`, called through the raw bindings (integer addresses).

Outputs are pre-filled with NaN (every element must be written). float64 must match the
float64 reference to ~1e-12 (relative to the output's scale); float32 is compared with the
float64 reference computed from the same float32 inputs and may be off by at most a few times
PyTorch-float32's own error (or 2e-6 relative; ours are ~1e-7)."""

import itertools
import math

import pytest
import torch

from imaml_kernels import _ext
from imaml_kernels import reference as ref

if not _ext.HAS_EXT or not hasattr(_ext._C, "bn_fwd_cpu"):
    pytest.skip("native extension imaml_kernels._C (with the engine kernels) not built", allow_module_level=True)

C_ = _ext._C
DTYPES = [torch.float64, torch.float32]
CODE = {torch.float32: 0, torch.float64: 1}
EPS = 1e-5

BN_SHAPES = list(itertools.product([1, 3], [1, 7, 100], [1, 5, 64])) + [
    # big enough to run in parallel: one job per (task, channel block) ...
    (2, 1000, 80),  # (blocks of 64 and 16 channels)
    # ... or, with few tasks, rows split among the threads (partial sums combined)
    (1, 1001, 64),
    (3, 333, 64),
    (1, 300, 130),
]


def _addr(t):
    return 0 if t is None else t.data_ptr()


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _relerr(out, want):
    """Max-norm error relative to the reference's max-norm (0 when both are exactly zero)."""
    out, want = out.double(), want.double()
    assert out.shape == want.shape
    assert torch.isfinite(out).all(), "output not fully written (NaN left) or not finite"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (out - want).abs().max().item() if want.numel() else 0.0
    if scale == 0.0:
        return err
    return err / scale


def _check(name, outs, ref_fn, inputs, dtype):
    """Compare ``outs`` with ``ref_fn`` on ``inputs`` (float64 reference; float32 bound by
    PyTorch-float32's own error)."""
    want = ref_fn(*[x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs])
    if dtype == torch.float32:
        torch32 = ref_fn(*inputs)
    for i, (o, w) in enumerate(zip(outs, want)):
        err = _relerr(o, w)
        if dtype == torch.float64:
            tol = 1e-12
        else:
            tol = max(4 * _relerr(torch32[i], w), 2e-6)
        assert err <= tol, f"{name} output {i}: relative error {err:.3g} > {tol:.3g}"


def _rand(*shape, dtype, gen, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)


def _bn_inputs(T, R, C, dtype, seed, relu):
    """x, gamma, beta and the consistent (xhat, rstd, y) of the float64 forward, cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    x = _rand(T, R, C, dtype=dtype, gen=g, scale=2.0, shift=0.5)
    gamma = _rand(T, C, dtype=dtype, gen=g, scale=0.5, shift=1.0)
    beta = _rand(T, C, dtype=dtype, gen=g, scale=0.5)
    y, xhat, rstd = ref.bn_fwd(x.double(), gamma.double(), beta.double(), EPS, relu)
    return g, x, gamma, beta, y.to(dtype), xhat.to(dtype), rstd.to(dtype)


# ----------------------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_bn_fwd(dtype, relu):
    for seed, (T, R, C) in enumerate(BN_SHAPES):
        _, x, gamma, beta, _, _, _ = _bn_inputs(T, R, C, dtype, seed, relu)
        y, xhat, rstd = _nan((T, R, C), dtype), _nan((T, R, C), dtype), _nan((T, C), dtype)
        C_.bn_fwd_cpu(CODE[dtype], x.data_ptr(), gamma.data_ptr(), beta.data_ptr(), y.data_ptr(),
                      xhat.data_ptr(), rstd.data_ptr(), T, R, C, EPS, relu)
        _check(f"bn_fwd{(T, R, C)}", (y, xhat, rstd), lambda *a: ref.bn_fwd(*a, EPS, relu), (x, gamma, beta), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_bn_bwd(dtype, relu):
    for seed, (T, R, C) in enumerate(BN_SHAPES):
        g, _, gamma, _, y, xhat, rstd = _bn_inputs(T, R, C, dtype, seed, relu)
        gy = _rand(T, R, C, dtype=dtype, gen=g)
        relu_y = y if relu else None
        gx, gg, gb = _nan((T, R, C), dtype), _nan((T, C), dtype), _nan((T, C), dtype)
        C_.bn_bwd_cpu(CODE[dtype], gy.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), gamma.data_ptr(),
                      _addr(relu_y), gx.data_ptr(), gg.data_ptr(), gb.data_ptr(), T, R, C)
        _check(f"bn_bwd{(T, R, C)}", (gx, gg, gb), ref.bn_bwd, (gy, xhat, rstd, gamma, relu_y), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_bn_tfwd(dtype, relu):
    for seed, (T, R, C) in enumerate(BN_SHAPES):
        g, _, gamma, _, y, xhat, rstd = _bn_inputs(T, R, C, dtype, seed, relu)
        rx = _rand(T, R, C, dtype=dtype, gen=g)
        rgamma, rbeta = _rand(T, C, dtype=dtype, gen=g), _rand(T, C, dtype=dtype, gen=g)
        relu_y = y if relu else None
        ry, rxhat, a = _nan((T, R, C), dtype), _nan((T, R, C), dtype), _nan((T, C), dtype)
        C_.bn_tfwd_cpu(CODE[dtype], rx.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), gamma.data_ptr(),
                       rgamma.data_ptr(), rbeta.data_ptr(), _addr(relu_y), ry.data_ptr(), rxhat.data_ptr(),
                       a.data_ptr(), T, R, C)
        _check(f"bn_tfwd{(T, R, C)}", (ry, rxhat, a), ref.bn_tfwd,
               (rx, xhat, rstd, gamma, rgamma, rbeta, relu_y), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_bn_tbwd(dtype, relu):
    for seed, (T, R, C) in enumerate(BN_SHAPES):
        g, _, gamma, _, y, xhat, rstd = _bn_inputs(T, R, C, dtype, seed, relu)
        rx = _rand(T, R, C, dtype=dtype, gen=g)
        rgamma, rbeta = _rand(T, C, dtype=dtype, gen=g), _rand(T, C, dtype=dtype, gen=g)
        relu_y = y if relu else None
        _, rxhat, a = ref.bn_tfwd(rx.double(), xhat.double(), rstd.double(), gamma.double(),
                                  rgamma.double(), rbeta.double(), None)
        rxhat, a = rxhat.to(dtype), a.to(dtype)
        gy, rgy = _rand(T, R, C, dtype=dtype, gen=g), _rand(T, R, C, dtype=dtype, gen=g)
        rgx, rgg, rgb = _nan((T, R, C), dtype), _nan((T, C), dtype), _nan((T, C), dtype)
        C_.bn_tbwd_cpu(CODE[dtype], gy.data_ptr(), rgy.data_ptr(), xhat.data_ptr(), rxhat.data_ptr(),
                       rstd.data_ptr(), a.data_ptr(), gamma.data_ptr(), rgamma.data_ptr(), _addr(relu_y),
                       rgx.data_ptr(), rgg.data_ptr(), rgb.data_ptr(), T, R, C)
        _check(f"bn_tbwd{(T, R, C)}", (rgx, rgg, rgb), ref.bn_tbwd,
               (gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y), dtype)


def test_bn_tbwd_is_the_tangent_of_bn_bwd():
    """Independent of the reference's algebra: bn_tbwd == d/dε bn_bwd along (ẋ, γ̇, ġy) (float64
    central difference through bn_fwd/bn_bwd kernels)."""
    T, R, C = 2, 50, 5
    g = torch.Generator().manual_seed(7)
    x, rx = _rand(T, R, C, dtype=torch.float64, gen=g), _rand(T, R, C, dtype=torch.float64, gen=g)
    gam, rgam = _rand(T, C, dtype=torch.float64, gen=g, shift=1.0), _rand(T, C, dtype=torch.float64, gen=g)
    beta = _rand(T, C, dtype=torch.float64, gen=g)
    gy, rgy = _rand(T, R, C, dtype=torch.float64, gen=g), _rand(T, R, C, dtype=torch.float64, gen=g)
    d = CODE[torch.float64]

    def fwd(xx, gg):
        y, xh, rs = torch.empty(T, R, C, dtype=torch.float64), torch.empty(T, R, C, dtype=torch.float64), torch.empty(T, C, dtype=torch.float64)
        C_.bn_fwd_cpu(d, xx.data_ptr(), gg.data_ptr(), beta.data_ptr(), y.data_ptr(), xh.data_ptr(), rs.data_ptr(), T, R, C, EPS, False)
        return xh, rs

    def bwd(e):
        xh, rs = fwd(x + e * rx, gam + e * rgam)
        gx, gg, gb = (torch.empty(T, R, C, dtype=torch.float64), torch.empty(T, C, dtype=torch.float64), torch.empty(T, C, dtype=torch.float64))
        gye, game = gy + e * rgy, gam + e * rgam  # named: a temporary's data_ptr() would dangle
        C_.bn_bwd_cpu(d, gye.data_ptr(), xh.data_ptr(), rs.data_ptr(), game.data_ptr(), 0,
                      gx.data_ptr(), gg.data_ptr(), gb.data_ptr(), T, R, C)
        return gx, gg, gb

    xh, rs = fwd(x, gam)
    ry, rxh, a = _nan((T, R, C), torch.float64), _nan((T, R, C), torch.float64), _nan((T, C), torch.float64)
    zero = torch.zeros(T, C, dtype=torch.float64)
    C_.bn_tfwd_cpu(d, rx.data_ptr(), xh.data_ptr(), rs.data_ptr(), gam.data_ptr(), rgam.data_ptr(), zero.data_ptr(), 0,
                   ry.data_ptr(), rxh.data_ptr(), a.data_ptr(), T, R, C)
    out = [_nan((T, R, C), torch.float64), _nan((T, C), torch.float64), _nan((T, C), torch.float64)]
    C_.bn_tbwd_cpu(d, gy.data_ptr(), rgy.data_ptr(), xh.data_ptr(), rxh.data_ptr(), rs.data_ptr(), a.data_ptr(),
                   gam.data_ptr(), rgam.data_ptr(), 0, *[o.data_ptr() for o in out], T, R, C)
    h = 1e-5
    for o, p, m in zip(out, bwd(h), bwd(-h)):
        assert _relerr(o, (p - m) / (2 * h)) < 1e-7


# ----------------------------------------------------------------------------- prox_step


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shared_theta", [True, False], ids=["shared", "per_task"])
def test_prox_step(dtype, shared_theta):
    for seed, (T, P) in enumerate([(1, 1), (3, 1000), (3, 40_000), (2, 16_385)]):
        g = torch.Generator().manual_seed(seed)
        phi, grad = _rand(T, P, dtype=dtype, gen=g), _rand(T, P, dtype=dtype, gen=g)
        theta = _rand(*((P,) if shared_theta else (T, P)), dtype=dtype, gen=g)
        lam = _rand(T, dtype=dtype, gen=g).abs() + 0.1
        lr = 0.37
        out = phi.clone()
        C_.prox_step_cpu(CODE[dtype], out.data_ptr(), grad.data_ptr(), theta.data_ptr(), 0 if shared_theta else P,
                         lam.data_ptr(), lr, T, P)
        _check(f"prox_step{(T, P)}", (out,), lambda p, gr, th, la: (ref.prox_step(p.clone(), gr, th, la[:, None], lr),),
               (phi, grad, theta, lam), dtype)


# ----------------------------------------------------------------------------- softmax CE

SM_SHAPES = list(itertools.product([1, 3], [1, 5, 25], [1, 5, 20]))


def _sm_inputs(T, N, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = _rand(T, N, K, dtype=dtype, gen=g, scale=3.0, shift=1.0)
    y = torch.randint(0, K, (T, N), generator=g, dtype=torch.int64)
    return g, logits, y


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_softmax_ce(dtype):
    for seed, (T, N, K) in enumerate(SM_SHAPES):
        _, logits, y = _sm_inputs(T, N, K, dtype, seed)
        loss, prob, grad = _nan((T,), dtype), _nan((T, N, K), dtype), _nan((T, N, K), dtype)
        C_.softmax_ce_cpu(CODE[dtype], logits.data_ptr(), y.data_ptr(), loss.data_ptr(), prob.data_ptr(),
                          grad.data_ptr(), T, N, K)

        def both(lg, yy):
            lo, p = ref.softmax_ce(lg, yy)
            return lo, p, ref.softmax_ce_grad(p, yy)

        _check(f"softmax_ce{(T, N, K)}", (loss, prob, grad), both, (logits, y), dtype)


def test_softmax_ce_extreme_logits_and_bad_labels():
    logits = torch.tensor([[[1000.0, -1000.0, 0.0], [-50.0, -50.0, -50.0]]], dtype=torch.float32)
    y = torch.tensor([[1, 2]])
    loss, prob, grad = _nan((1,), torch.float32), _nan((1, 2, 3), torch.float32), _nan((1, 2, 3), torch.float32)
    C_.softmax_ce_cpu(0, logits.data_ptr(), y.data_ptr(), loss.data_ptr(), prob.data_ptr(), grad.data_ptr(), 1, 2, 3)
    assert math.isclose(loss.item(), (2000.0 + math.log(3.0)) / 2, rel_tol=1e-6)
    assert torch.isfinite(prob).all() and torch.isfinite(grad).all()
    bad = torch.tensor([[1, 3]])
    with pytest.raises(IndexError, match="outside"):
        C_.softmax_ce_cpu(0, logits.data_ptr(), bad.data_ptr(), loss.data_ptr(), prob.data_ptr(), grad.data_ptr(), 1, 2, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_softmax_ce_tangent(dtype):
    for seed, (T, N, K) in enumerate(SM_SHAPES):
        g, logits, _ = _sm_inputs(T, N, K, dtype, seed)
        prob = torch.softmax(logits.double(), -1).to(dtype)
        rl = _rand(T, N, K, dtype=dtype, gen=g)
        rg = _nan((T, N, K), dtype)
        C_.softmax_ce_tangent_cpu(CODE[dtype], prob.data_ptr(), rl.data_ptr(), rg.data_ptr(), T, N, K)
        _check(f"softmax_ce_tangent{(T, N, K)}", (rg,), lambda p, r: (ref.softmax_ce_tangent(p, r),), (prob, rl), dtype)


def test_bad_dtype_code():
    x = torch.zeros(1, 1, 1)
    with pytest.raises(ValueError):
        C_.bn_fwd_cpu(2, x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(),
                      1, 1, 1, EPS, False)
