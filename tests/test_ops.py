"""torch.library ops: opcheck, validation errors, dispatch."""

import pytest
import torch

import imaml_kernels as ik
from imaml_kernels import ops, reference
from imaml_kernels.dispatch import backend_problems, select_backend


def _cg_args(T=3, P=5000, dtype=torch.float32, chunk=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, r, p, Ap = (torch.randn(T, P, generator=g, dtype=dtype) for _ in range(4))
    nb = -(-P // chunk)
    partials = torch.full((T, nb, 4), float("nan"), dtype=torch.float64)  # poisoned
    status_in = torch.zeros(T, dtype=torch.int32)
    status_out = torch.full((T,), -7, dtype=torch.int32)  # poisoned
    iters = torch.zeros(T, dtype=torch.int32)
    thresh = torch.zeros(T, dtype=torch.float64)
    return x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk


OPS = [
    pytest.param(ops.cg_dots, ops.cg_update, 4096, "all", id="cpp-chunk4096"),
    pytest.param(ops.cg_dots, ops.cg_update, 16384, "all", id="cpp-chunk16384"),
    # Under TRITON_INTERPRET the kernel body runs on real pointers, which the AOT-dispatch
    # checks (FakeTensor/functional tracing through the triton_op body) cannot provide; on a
    # GPU gpu_check.sh runs the full opcheck.
    pytest.param(ops.cg_dots_triton, ops.cg_update_triton, 4096, "interp", id="triton"),
]
INTERP_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("dots,update,chunk,utils", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_and_values(dots, update, chunk, utils, dtype):
    x, r, p, Ap, partials, s_in, s_out, iters, thresh, _ = _cg_args(dtype=dtype, chunk=chunk)
    kw = {} if utils == "all" else {"test_utils": INTERP_UTILS}
    torch.library.opcheck(dots, (r, p, Ap, partials, chunk), **kw)
    dots(r, p, Ap, partials, chunk)
    ref = torch.empty_like(partials)
    reference.cg_dots(r, p, Ap, ref, chunk)
    assert torch.allclose(partials, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    args = (x.clone(), r.clone(), p.clone(), Ap, partials, s_in, s_out, iters, thresh, chunk)
    torch.library.opcheck(update, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), **kw)
    ref_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    update(*args)
    reference.cg_update(*ref_args)
    for got, want in zip(args[:3] + args[6:8], ref_args[:3] + ref_args[6:8]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    assert (args[6] != -7).all()


def test_update_skips_broken_and_converged_tasks():
    x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk = _cg_args(T=3, P=100, dtype=torch.float64)
    ops.cg_dots(r, p, Ap, partials, chunk)
    s_in[0] = reference.CG_BREAKDOWN
    thresh[1] = float("inf")  # converged
    Ap[2] = -p[2]  # negative curvature -> breakdown now
    ops.cg_dots(r, p, Ap, partials, chunk)
    x0, r0, p0 = x.clone(), r.clone(), p.clone()
    ops.cg_update(x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk)
    assert s_out.tolist() == [2, 1, 2] and iters.tolist() == [0, 0, 0]
    assert torch.equal(x, x0) and torch.equal(r, r0) and torch.equal(p, p0)


BAD = [
    ("r", lambda a: a.__setitem__(1, a[1][:, :-1].contiguous()), ValueError, "p must have shape"),
    ("dtype", lambda a: a.__setitem__(2, a[2].double()), TypeError, "Ap must have dtype"),
    ("contig", lambda a: a.__setitem__(1, a[1].t().contiguous().t()), ValueError, "p must be contiguous"),
    ("partials", lambda a: a.__setitem__(3, a[3][:, :, :3].contiguous()), ValueError, "partials must have shape"),
    ("partials-dtype", lambda a: a.__setitem__(3, a[3].float()), TypeError, "partials must be float64"),
    ("rank", lambda a: a.__setitem__(0, a[0][0]), ValueError, "r must be \\[T, P\\]"),
    ("half", lambda a: a.__setitem__(0, a[0].half()), TypeError, "r must be float32 or float64"),
]


@pytest.mark.parametrize("name,mutate,exc,msg", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("op", [ops.cg_dots, ops.cg_dots_triton], ids=["cpp", "triton"])
def test_cg_dots_validation(name, mutate, exc, msg, op):
    _, r, p, Ap, partials, *_ = _cg_args(T=2, P=64, chunk=4096)
    args = [r, p, Ap, partials, 4096]
    mutate(args)
    with pytest.raises(exc, match=msg):
        op(*args)


def test_cg_update_validation():
    x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk = _cg_args(T=2, P=64)
    with pytest.raises(TypeError, match="status_in must have dtype torch.int32"):
        ops.cg_update(x, r, p, Ap, partials, s_in.long(), s_out, iters, thresh, chunk)
    with pytest.raises(ValueError, match="thresh must have shape \\(2,\\)"):
        ops.cg_update(x, r, p, Ap, partials, s_in, s_out, iters, thresh[:1], chunk)
    with pytest.raises(ValueError, match="chunk must be 4096"):
        ops.cg_update_triton(x, r, p, Ap, partials, s_in, s_out, iters, thresh, 2048)


def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv("IMAML_BACKEND", raising=False)
    assert select_backend("cpu", torch.float32) == "cpu"
    assert select_backend("cpu", torch.float32, "reference") == "reference"
    assert select_backend("cpu", torch.float64, "triton") == "triton"  # interpreter is on in tests
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here: .*not a CUDA device"):
        select_backend("cpu", torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="unknown backend 'fast'"):
        select_backend("cpu", torch.float32, "fast")
    with pytest.raises(RuntimeError, match="dtype torch.float16 is not supported"):
        select_backend("cpu", torch.float16, "cpu")
    monkeypatch.setenv("IMAML_BACKEND", "reference")
    assert select_backend("cpu", torch.float32) == "reference"
    monkeypatch.setenv("IMAML_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="IMAML_BACKEND='cuda'"):
        select_backend("cpu", torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("TRITON_INTERPRET" in p for p in backend_problems("triton", "cpu", torch.float32))
    # Automatic choice for a CUDA device never picks CPU-only backends.
    monkeypatch.delenv("IMAML_BACKEND")
    assert select_backend("cuda", torch.float32) in ("cuda", "triton", "reference")


def test_cg_solve_respects_env_backend(monkeypatch):
    monkeypatch.setenv("IMAML_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        ik.cg_solve(lambda v: v, torch.ones(2, 3))
