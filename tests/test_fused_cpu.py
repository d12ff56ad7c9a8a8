"""The C++ (OpenMP) kernels of the engine's fused stages against their pure-PyTorch twins in
:mod:`imaml_kernels.reference`, called through the raw bindings (integer addresses).

Outputs are pre-filled with NaN (every element must be written). float64 must match the
float64 reference to ~1e-12 (relative to the output's scale); float32 is compared with the
float64 reference computed from the same float32 inputs and may be off by at most a few times
PyTorch-float32's own error (or 2e-6 relative; ours are ~1e-7)."""


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
