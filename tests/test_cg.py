"""Multi-task CG: every backend against torch.linalg.solve and the float64 reference."""

import pytest
import torch

import imaml_kernels as ik
from imaml_kernels import reference
from helpers import dense_solve, rel_err, spd_operator

CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if b in ik.available_backends("cpu")]


def test_cpu_backends_present():
    # The suite must exercise the C++ kernels and the Triton interpreter, not silently skip them.
    assert CPU_BACKENDS == ["reference", "cpu", "triton"], ik.available_backends("cpu")


SOLVE_CASES = [
    pytest.param(backend, T, P, cond, id=f"{backend}-T{T}-P{P}-cond{cond:g}")
    for backend in CPU_BACKENDS
    for T in (1, 3, 32)
    for P in (1, 127, 1000)
    for cond in (1e1, 1e4)
    # The Triton interpreter costs ~12 ms per program: P = 1000 iterations with T = 32 are
    # left to the iterate-by-iterate test below, which runs the same kernels at that size.
    if not (backend == "triton" and T * P > 3 * 127)
]


@pytest.mark.parametrize("backend,T,P,cond", SOLVE_CASES)
def test_matches_linalg_solve(backend, T, P, cond):
    op, b = spd_operator(T, P, cond, seed=T * 1000 + P)
    x_star = dense_solve(op.dense(), b)
    x, info = ik.cg_solve(op, b, iters=P, backend=backend)
    for t in range(T):
        assert rel_err(x[t], x_star[t]) <= 1e-8, (t, rel_err(x[t], x_star[t]))
    assert not info.breakdown.any()
    assert torch.isfinite(x).all()


ITER_CASES = [
    pytest.param(backend, T, P, dtype, id=f"{backend}-T{T}-P{P}-{str(dtype)[6:]}")
    for backend in CPU_BACKENDS
    for T, P in ((1, 1), (3, 127), (32, 1000), (2, 50000))  # 50000: several blocks per task
    for dtype in (torch.float64, torch.float32)
]


@pytest.mark.parametrize("backend,T,P,dtype", ITER_CASES)
def test_iterates_match_reference(backend, T, P, dtype):
    op, b = spd_operator(T, P, 10.0, seed=P + T)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for k in (1, 2, 5):
        x_ref, count_ref, _ = reference.cg_solve(op, b, iters=k)
        x, info = ik.cg_solve(op, b.to(dtype), iters=k, backend=backend)
        assert x.dtype == dtype
        assert rel_err(x, x_ref) <= tol, (k, rel_err(x, x_ref))
        assert torch.equal(info.iterations, count_ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tolerance_masks_converged_tasks(backend):
    # Task 0 is the identity (solved in one step), task 1 is ill-conditioned.
    op, b = spd_operator(2, 200, 1e3, seed=1)
    op.lam[0] = 1.0
    mv = op
    x5, info5 = ik.cg_solve(mv, b, iters=5, tol=1e-6, backend=backend)
    x9, info9 = ik.cg_solve(mv, b, iters=9, tol=1e-6, backend=backend)
    assert info5.iterations[0].item() == 1 and info9.iterations[0].item() == 1
    assert bool(info5.converged[0]) and not bool(info5.converged[1])
    assert info9.iterations[1].item() == 9
    assert torch.equal(x5[0], x9[0])  # frozen once converged
    assert rel_err(x9[0], b[0]) <= 1e-12
    assert not torch.equal(x5[1], x9[1])
    assert (info9.residual[0] <= 1e-6).item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_breakdown_on_indefinite_task_only(backend):
    T, P = 3, 64
    op, b = spd_operator(T, P, 1e2, seed=7)
    op.lam[1, : P // 2] *= -1.0  # task 1 indefinite: half its spectrum negative
    mv = op
    x, info = ik.cg_solve(mv, b, iters=P + 10, backend=backend)
    assert info.breakdown.tolist() == [False, True, False]
    assert not info.converged[1]
    x_star = dense_solve(op.dense(), b)
    for t in (0, 2):
        assert rel_err(x[t], x_star[t]) <= 1e-8
    # Task 1 keeps its last good iterate: the reference's iterate after as many steps.
    k = info.iterations[1].item()
    assert 0 < k < P + 10
    x_ref, count_ref, status_ref = reference.cg_solve(mv, b, iters=k)
    assert rel_err(x[1], x_ref[1]) <= 1e-10
    assert torch.isfinite(x[1]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_one_task(backend):
    op, b = spd_operator(3, 100, 10.0, seed=3)
    b[2, 17] = float("nan")
    x, info = ik.cg_solve(op, b, iters=100, backend=backend)
    assert info.breakdown.tolist() == [False, False, True]
    assert info.iterations[2].item() == 0
    assert torch.equal(x[2], torch.zeros_like(x[2]))  # never moved from x0 = 0
    x_star = dense_solve(op.dense()[:2], b[:2])
    assert rel_err(x[:2], x_star) <= 1e-8


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_x0(backend):
    mv, b = spd_operator(3, 50, 10.0, seed=11)
    x_star = dense_solve(mv.dense(), b)
    x, info = ik.cg_solve(mv, b, iters=3, tol=1e-10, x0=x_star.clone(), backend=backend)
    assert info.converged.all() and (info.iterations == 0).all()
    assert torch.equal(x, x_star)
    x0 = torch.randn_like(b)
    x, info = ik.cg_solve(mv, b, iters=50, x0=x0, backend=backend)
    assert rel_err(x, x_star) <= 1e-8
    x_ref, _, _ = reference.cg_solve(mv, b, iters=4, x0=x0)
    x4, _ = ik.cg_solve(mv, b, iters=4, x0=x0, backend=backend)
    assert rel_err(x4, x_ref) <= 1e-12


def test_zero_rhs_and_zero_iters():
    op, b = spd_operator(2, 10, 10.0)
    b[0] = 0
    x, info = ik.cg_solve(op, b, iters=4)
    assert torch.equal(x[0], torch.zeros(10, dtype=b.dtype)) and bool(info.converged[0])
    assert info.residual[0].item() == 0.0
    x, info = ik.cg_solve(op, b, iters=0)
    assert torch.equal(x, torch.zeros_like(b)) and (info.iterations == 0).all()


def test_cpu_kernels_deterministic():
    T, P = 4, 40000
    g = torch.Generator().manual_seed(0)
    d = torch.rand(T, P, generator=g) + 0.5
    b = torch.randn(T, P, generator=g)
    mv = lambda v: d * v  # noqa: E731
    x1, _ = ik.cg_solve(mv, b, iters=5, backend="cpu")
    x2, _ = ik.cg_solve(mv, b, iters=5, backend="cpu")
    assert torch.equal(x1, x2)


def test_float32_diagonal_many_blocks():
    # P not a multiple of any block size, several blocks per task on every backend.
    T, P = 3, 3 * 16384 + 77
    g = torch.Generator().manual_seed(1)
    d = torch.rand(T, P, generator=g, dtype=torch.float64) * 9 + 1
    b = torch.randn(T, P, generator=g, dtype=torch.float64)
    x_ref, _, _ = reference.cg_solve(lambda v: d * v, b, iters=4)
    d32, b32 = d.float(), b.float()
    for backend in CPU_BACKENDS:
        x, _ = ik.cg_solve(lambda v: d32 * v, b32, iters=4, backend=backend)
        assert rel_err(x, x_ref) <= 1e-5, backend


def test_matvec_errors():
    b = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="matvec must map"):
        ik.cg_solve(lambda v: v[:, :3], b, iters=2)
    with pytest.raises(ValueError, match="matvec must map"):
        ik.cg_solve(lambda v: v.float(), b, iters=2)
    # identity matvec returns p itself: must still work (copied, no aliasing)
    x, info = ik.cg_solve(lambda v: v, b, iters=2, backend="cpu")
    assert torch.allclose(x, b)


def test_argument_errors():
    b = torch.randn(2, 5)
    with pytest.raises(ValueError, match="b must be a \\[T, P\\]"):
        ik.cg_solve(lambda v: v, b[0])
    with pytest.raises(TypeError, match="float32 or float64"):
        ik.cg_solve(lambda v: v, b.half())
    with pytest.raises(ValueError, match="iters"):
        ik.cg_solve(lambda v: v, b, iters=-1)
    with pytest.raises(ValueError, match="tol"):
        ik.cg_solve(lambda v: v, b, tol=-1.0)
    with pytest.raises(ValueError, match="x0 must match"):
        ik.cg_solve(lambda v: v, b, x0=torch.zeros(2, 4))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    op, b = spd_operator(3, 40, 10.0, seed=2)
    A, b = op.dense().float(), b.float()

    def solve(A, b):
        x, info = ik.cg_solve(lambda v: torch.einsum("tij,tj->ti", A, v), b, iters=6, backend=backend)
        return x, info.iterations, info.residual

    x_c, it_c, res_c = torch.compile(solve, fullgraph=True)(A, b)
    x_e, info = ik.cg_solve(lambda v: torch.einsum("tij,tj->ti", A, v), b, iters=6, backend=backend)
    assert rel_err(x_c, x_e) <= 1e-5
    assert torch.equal(it_c, info.iterations)


@pytest.mark.parametrize("P", [5, 1024, 3 * 1024 + 17, 200_000])
@pytest.mark.parametrize("T", [1, 3])
def test_row_norms_match_float64_norms(T, P):
    """CG's norms: float32 rows in blocks (a float64 accumulator over one long float32 row is
    35-70x slower on the CPU), within float32's own rounding of a float64 reference; float64
    rows exactly as ``vector_norm``; a strided row by the plain path."""
    from imaml_kernels.cg import row_norms

    g = torch.Generator().manual_seed(P + T)
    x = torch.randn(T, P, generator=g, dtype=torch.float64) * torch.logspace(-4, 4, P, dtype=torch.float64)
    ref = torch.linalg.vector_norm(x, dim=-1)
    got = row_norms(x.float())
    assert got.dtype == torch.float64 and got.shape == (T,)
    assert rel_err(got, torch.linalg.vector_norm(x.float().double(), dim=-1)) < 1e-6
    assert rel_err(got, ref) < 1e-6
    assert torch.equal(row_norms(x), ref)
    strided = torch.randn(P, T, generator=g).t()
    assert rel_err(row_norms(strided), torch.linalg.vector_norm(strided.double(), dim=-1)) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_overwrite_b_uses_b_as_the_residual(backend):
    """``overwrite_b=True``: the same iterates and report, with ``b``'s buffer as the residual
    (it ends holding the last residual: one [T, P] buffer fewer); without it ``b`` is untouched."""
    op, b = spd_operator(3, 40, 10.0, seed=7)
    keep = b.clone()
    x, info = ik.cg_solve(op, b, iters=4, backend=backend)
    assert torch.equal(b, keep)
    own = b.clone()
    x2, info2 = ik.cg_solve(op, own, iters=4, backend=backend, overwrite_b=True)
    assert torch.equal(x2, x) and torch.equal(info2.residual, info.residual) and torch.equal(info2.iterations, info.iterations)
    assert not torch.equal(own, keep)
    assert rel_err(own, keep - op(x)) < 1e-10  # the residual b - A x
    x3, _ = ik.CG(iters=4, backend=backend)(op, keep.clone(), overwrite_b=True)
    assert torch.equal(x3, x)
