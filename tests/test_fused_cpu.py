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
