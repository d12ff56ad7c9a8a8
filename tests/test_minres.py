"""MINRES (imaml_kernels/minres.py): T symmetric indefinite systems at once, against dense
float64 solves; where (I + H/λ) is indefinite the implicit op's meta-gradient with
solve=MINRES equals the dense solve while CG's breaks down."""

import pytest
import torch
from torch import nn

import imaml_kernels as ik

from helpers import HouseholderSPD, rel_err

DT = torch.float64


def _indefinite(T=3, P=40, seed=0):
    lam = torch.linspace(-3, 5, P, dtype=DT).expand(T, P).clone() + 0.05  # eigenvalues of both signs, none 0
    op = HouseholderSPD(lam, seed=seed + 1)
    return op, torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("dtype", [DT, torch.float32], ids=["fp64", "fp32"])
def test_minres_solves_symmetric_indefinite_systems(dtype):
    op, b = _indefinite()
    want = torch.linalg.solve(op.dense(), b)
    x, info = ik.minres_solve(op, b.to(dtype), iters=60)
    assert x.dtype == dtype
    assert rel_err(x, want) < (1e-12 if dtype == DT else 1e-5)
    true = torch.linalg.vector_norm(b - op(x.double()), dim=1) / torch.linalg.vector_norm(b, dim=1)
    if dtype == DT:  # the residual MINRES keeps is the true one (exact arithmetic)
        torch.testing.assert_close(info.residual, true, rtol=1e-3, atol=1e-13)
    assert not info.breakdown.any()
    _, cg = ik.cg_solve(op, b, iters=60)
    assert cg.breakdown.all()  # where CG stops


def test_minres_stops_converged_tasks_and_handles_zero_rhs():
    op, b = _indefinite()
    b[1] = 0.0
    x, info = ik.minres_solve(op, b, iters=80, tol=1e-8)
    assert (x[1] == 0).all() and info.iterations[1] == 0 and info.residual[1] == 0
    assert info.converged.all() and (info.iterations[[0, 2]] < 80).all()
    assert (info.residual <= 1e-8).all()


def test_implicit_meta_gradient_with_minres_on_an_indefinite_system():
    """λ small on a non-convex task: (I + H/λ) indefinite at φ; MINRES gives the dense solve's
    meta-gradient, CG breaks down and is far off."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    for p in model.parameters():
        p.data.mul_(6.0)
    x, y = torch.randn(2, 10, 2, dtype=DT), torch.randint(0, 3, (2, 10))
    xq, yq = torch.randn(2, 10, 2, dtype=DT), torch.randint(0, 3, (2, 10))
    theta = dict(model.named_parameters())
    lam, P = 0.05, sum(p.numel() for p in theta.values())
    inner = ik.GD(2, 0.01)
    got = {}
    for name, solve in (("minres", ik.MINRES(3 * P)), ("cg", ik.CG(3 * P))):
        g, info = ik.implicit_meta_grad(model, theta, (x, y), (xq, yq), lam=lam, inner=inner, solve=solve, engine=False)
        got[name] = (torch.cat([g[k].reshape(-1) for k in theta]), info)
    # Dense: x_t = (I + H_t/λ)⁻¹ g_t at the same φ.
    phi = ik.implicit_adapt(model, {k: v.detach() for k, v in theta.items()}, (x, y), lam=lam, inner=inner, engine=False)
    f = ik.task_loss_fn(model)
    names = list(theta)
    want, indefinite = 0, False
    for t in range(2):
        p_t = torch.cat([phi[k][t].reshape(-1) for k in names])

        def flat(v, xx, yy):
            parts, off = {}, 0
            for k in names:
                n = theta[k].numel()
                parts[k] = v[off:off + n].view(theta[k].shape)
                off += n
            return f(parts, xx, yy)

        H = torch.func.hessian(lambda v: flat(v, x[t], y[t]))(p_t)
        A = torch.eye(P, dtype=DT) + H / lam
        indefinite |= bool(torch.linalg.eigvalsh(A).min() < 0)
        want = want + torch.linalg.solve(A, torch.func.grad(lambda v: flat(v, xq[t], yq[t]))(p_t)) / 1.0
    assert indefinite
    assert rel_err(got["minres"][0], want) < 1e-6
    assert got["cg"][1]["cg"].breakdown.any() and rel_err(got["cg"][0], want) > 1e-2
