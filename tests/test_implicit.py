"""The implicit-gradient op against closed forms and dense Hessians (float64); batched HVPs
alone are tested in test_hvp.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, vmap

import imaml_kernels as ik
from imaml_kernels.nets import MLP

DT = torch.float64


def mse(pred, y):
    return 0.5 * ((pred - y) ** 2).mean()


def linear(params, x):
    return x @ params["w"] + params["b"]


def ridge_data(T=4, n=12, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n, d, generator=g, dtype=DT)
    y = torch.randn(T, n, generator=g, dtype=DT)
    Xq = torch.randn(T, n, d, generator=g, dtype=DT)
    yq = torch.randn(T, n, generator=g, dtype=DT)
    theta = {"w": torch.randn(d, generator=g, dtype=DT).requires_grad_(), "b": torch.randn((), generator=g, dtype=DT).requires_grad_()}
    return X, y, Xq, yq, theta


def ridge_closed_form(theta, X, y, lam):
    # phi = (A^T A / n + lam I)^-1 (A^T y / n + lam theta), A = [X, 1] (w and b together).
    T, n, d = X.shape
    A = torch.cat([X, torch.ones(T, n, 1, dtype=DT)], -1)
    th = torch.cat([theta["w"], theta["b"].reshape(1)])
    lam = torch.as_tensor(lam, dtype=DT).reshape(-1, 1, 1) if torch.is_tensor(lam) else lam
    M = A.transpose(1, 2) @ A / n + lam * torch.eye(d + 1, dtype=DT)
    rhs = A.transpose(1, 2) @ y.unsqueeze(-1) / n + (lam * th.view(1, -1, 1) if not torch.is_tensor(lam) else lam * th.view(1, -1, 1))
    phi = torch.linalg.solve(M, rhs).squeeze(-1)
    return {"w": phi[:, :d], "b": phi[:, d]}


def outer(phi, Xq, yq):
    return vmap(lambda p, x, y: mse(linear(p, x), y))(dict(phi), Xq, yq).sum()


@pytest.mark.parametrize("lam", [2.0, "per-task"])
@pytest.mark.parametrize("inner", ["newton", "gd"])
def test_ridge_matches_closed_form(lam, inner):
    X, y, Xq, yq, theta = ridge_data()
    d = X.shape[2]
    lam_v = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=DT) if lam == "per-task" else lam
    solver = ik.NewtonCG(steps=2, cg_iters=d + 1) if inner == "newton" else ik.GD(steps=3000, lr=0.1)
    phi = ik.implicit_adapt(linear, theta, (X, y), lam=lam_v, inner=solver, cg_iters=d + 1, loss=mse)
    phi_star = ridge_closed_form(theta, X, y, lam_v)
    for k in phi:
        assert torch.allclose(phi[k], phi_star[k], atol=1e-10, rtol=0), k
    outer(phi, Xq, yq).backward()
    got = {k: theta[k].grad.clone() for k in theta}
    for v in theta.values():
        v.grad = None
    outer(ridge_closed_form(theta, X, y, lam_v), Xq, yq).backward()
    for k in theta:
        assert torch.allclose(got[k], theta[k].grad, atol=1e-8, rtol=1e-8), (k, got[k], theta[k].grad)
    assert not phi.info["dropped"].any()


def _dense_meta_grad(task_loss, phi_t, lam, g_t):
    """(I + H/lam)^-1 g from a dense Hessian of task_loss at phi_t (flat)."""
    H = hessian(task_loss)(phi_t)
    P = phi_t.numel()
    return torch.linalg.solve(torch.eye(P, dtype=DT) + H / lam, g_t)


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_meta_grad_matches_dense_hessian(kind):
    torch.manual_seed(0)
    T, n, d, way = 3, 10, 4, 3
    if kind == "logistic":
        model = nn.Linear(d, way).to(DT)
    else:
        model = MLP([d, 5, way]).to(DT)
    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    X = torch.randn(T, n, d, dtype=DT)
    y = torch.randint(0, way, (T, n))
    Xq = torch.randn(T, n, d, dtype=DT)
    yq = torch.randint(0, way, (T, n))
    lam = 1.5
    P = sum(v.numel() for v in theta.values())
    phi = ik.implicit_adapt(model, theta, (X, y), lam=lam, inner=ik.NewtonCG(steps=12, cg_iters=P), cg_iters=P)
    layout = ik.ParamLayout.from_params(theta, batched=False)
    names = list(theta)

    def call(p_flat, x):
        p = {k: p_flat[layout.offsets[k] : layout.offsets[k] + layout.numels[k]].view(layout.shapes[k]) for k in names}
        return functional_call(model, p, (x,))

    phi_flat = layout.flatten(dict(phi)).detach()
    # converged inner problem: the proximal gradient vanishes
    th = layout.flatten({k: v.detach()[None] for k, v in theta.items()})[0]
    for t in range(T):
        gr = torch.func.grad(lambda p: F.cross_entropy(call(p, X[t]), y[t]) + lam / 2 * ((p - th) ** 2).sum())(phi_flat[t])
        assert gr.norm() < 1e-8
    loss_q = sum(F.cross_entropy(vmap(functional_call, in_dims=(None, 0, 0))(model, dict(phi), (Xq,))[t], yq[t]) for t in range(T))
    loss_q.backward()
    expected = torch.zeros(P, dtype=DT)
    for t in range(T):
        g_t = torch.func.grad(lambda p: F.cross_entropy(call(p, Xq[t]), yq[t]))(phi_flat[t])
        expected += _dense_meta_grad(lambda p: F.cross_entropy(call(p, X[t]), y[t]), phi_flat[t], lam, g_t)
    got = layout.flatten({k: theta[k].grad[None] for k in names})[0]
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6), (got - expected).abs().max()


def test_first_order_passes_gradient_through():
    X, y, Xq, yq, theta = ridge_data(seed=3)
    phi = ik.implicit_adapt(linear, theta, (X, y), lam=2.0, inner=ik.GD(50, 0.1), loss=mse, first_order=True)
    outer(phi, Xq, yq).backward()
    g = torch.func.grad(lambda p: outer(p, Xq, yq))({k: v.detach() for k, v in phi.items()})
    for k in theta:
        assert torch.allclose(theta[k].grad, g[k].sum(0), atol=1e-12)
    assert phi.info["cg"] is None


def test_chunked_hvp_same_meta_grad():
    X, y, Xq, yq, theta = ridge_data(T=5, seed=4)
    grads = []
    for chunk in (None, 2):
        for v in theta.values():
            v.grad = None
        phi = ik.implicit_adapt(linear, theta, (X, y), lam=1.0, inner=ik.GD(30, 0.1), loss=mse, chunk=chunk)
        outer(phi, Xq, yq).backward()
        grads.append({k: v.grad.clone() for k, v in theta.items()})
    for k in theta:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-13)


def test_gradcheck_small():
    X, y, Xq, yq, theta = ridge_data(T=2, n=5, d=3, seed=5)
    w0, b0 = theta["w"].detach(), theta["b"].detach()

    def f(w, b):
        th = {"w": w, "b": b}
        phi = ik.implicit_adapt(linear, th, (X, y), lam=1.0, inner=ik.NewtonCG(steps=2, cg_iters=4), cg_iters=4, loss=mse)
        return outer(phi, Xq, yq)

    assert torch.autograd.gradcheck(f, (w0.clone().requires_grad_(), b0.clone().requires_grad_()), eps=1e-6, atol=1e-7)


def test_implicit_meta_grad_equals_adapt_backward():
    X, y, Xq, yq, theta = ridge_data(seed=6)
    g, info = ik.implicit_meta_grad(linear, theta, (X, y), (Xq, yq), lam=2.0, inner=ik.GD(100, 0.1), loss=mse)
    phi = ik.implicit_adapt(linear, theta, (X, y), lam=2.0, inner=ik.GD(100, 0.1), loss=mse)
    outer(phi, Xq, yq).backward()
    for k in theta:
        assert torch.allclose(g[k], theta[k].grad, atol=1e-12)
    assert info["outer_loss"].shape == (4,) and info["cg"].iterations.shape == (4,)


def test_nonfinite_task_is_dropped_and_reported():
    X, y, Xq, yq, theta = ridge_data(seed=7)
    X_bad = X.clone()
    X_bad[2, 0, 0] = float("nan")
    phi = ik.implicit_adapt(linear, theta, (X_bad, y), lam=2.0, inner=ik.NewtonCG(2, 7), cg_iters=7, loss=mse)
    assert not torch.isfinite(phi.inner_loss[2]) and torch.isfinite(phi.inner_loss[[0, 1, 3]]).all()
    loss_tasks = vmap(lambda p, x, yy: mse(linear(p, x), yy))(dict(phi), Xq, yq)
    loss_tasks.sum().backward()
    assert phi.info["dropped"].tolist() == [False, False, True, False]
    got = {k: theta[k].grad.clone() for k in theta}
    for v in theta.values():
        v.grad = None
    keep = [0, 1, 3]
    outer(ridge_closed_form(theta, X[keep], y[keep], 2.0), Xq[keep], yq[keep]).backward()
    for k in theta:
        assert torch.isfinite(got[k]).all()
        assert torch.allclose(got[k], theta[k].grad, atol=1e-8), k


def test_batchnorm_running_stats_modes():
    torch.manual_seed(1)
    T, n = 2, 4
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(DT)
    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    x = torch.randn(T, n, 1, 6, 6, dtype=DT)
    y = torch.randint(0, 3, (T, n))
    before = model[1].running_mean.clone()
    for mode in ("train", "eval"):
        model.train(mode == "train")
        phi = ik.implicit_adapt(model, theta, (x, y), lam=1.0, inner=ik.GD(3, 0.1))
        sum(v.sum() for v in phi.values()).backward()
        assert all(torch.isfinite(v.grad).all() for v in theta.values())
        assert model[1].track_running_stats  # restored
    assert torch.equal(model[1].running_mean, before)  # never updated inside vmap


def test_bad_inputs():
    X, y, Xq, yq, theta = ridge_data()
    with pytest.raises(ValueError, match="support x has T=4 tasks but y has T=3"):
        ik.implicit_adapt(linear, theta, (X, y[:3]), lam=1.0, inner=ik.GD(1, 0.1), loss=mse)
    with pytest.raises(ValueError, match="lam must be finite and > 0"):
        ik.implicit_adapt(linear, theta, (X, y), lam=0.0, inner=ik.GD(1, 0.1), loss=mse)
    with pytest.raises(ValueError, match="lam must be finite and > 0 for every task"):
        ik.implicit_adapt(linear, theta, (X, y), lam=torch.tensor([1.0, -1.0, 1.0, 1.0]), inner=ik.GD(1, 0.1), loss=mse)
    with pytest.raises(ValueError, match="lam must be a scalar or a \\[T\\] tensor with T=4"):
        ik.implicit_adapt(linear, theta, (X, y), lam=torch.ones(3), inner=ik.GD(1, 0.1), loss=mse)
    with pytest.raises(ValueError, match="query has T=3 tasks but support has T=4"):
        ik.implicit_meta_grad(linear, theta, (X, y), (Xq[:3], yq[:3]), lam=1.0, inner=ik.GD(1, 0.1), loss=mse)
    with pytest.raises(ValueError, match="batch\\[0\\] has leading size 3, expected T=4"):
        ik.batched_hvp(lambda p, x: (x @ p).sum(), torch.zeros(4, 6), torch.zeros(4, 6), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="v must be a dict with the keys"):
        ik.batched_hvp(lambda p: p["w"].sum(), {"w": torch.zeros(4, 2)}, {"u": torch.zeros(4, 2)})


@pytest.mark.parametrize("solver", [ik.SGD(400, 0.05, 0.9), ik.Adam(800, 0.02)])
def test_other_inner_solvers_converge(solver):
    X, y, Xq, yq, theta = ridge_data(seed=9)
    phi = ik.implicit_adapt(linear, theta, (X, y), lam=2.0, inner=solver, loss=mse)
    star = ridge_closed_form(theta, X, y, 2.0)
    for k in phi:
        assert torch.allclose(phi[k], star[k], atol=1e-5), (k, (phi[k] - star[k]).abs().max())


def test_layout_roundtrip_views():
    p = {"a": torch.randn(3, 2, 2), "b": torch.randn(3, 5)}
    layout = ik.ParamLayout.from_params(p)
    flat = layout.flatten(p)
    back = layout.unflatten(flat)
    assert flat.shape == (3, 9) and all(torch.equal(back[k], p[k]) for k in p)
    back["b"].zero_()
    assert (flat[:, 4:] == 0).all()  # views, not copies
    with pytest.raises(ValueError, match="expected a flat \\[T, 9\\]"):
        layout.unflatten(torch.zeros(3, 8))


def test_cg_breakdown_keeps_last_good_iterate():
    # Task losses L_t(w) = s_t * 0.5 * mean((x w)^2) with H_t = s_t diag(0.5, 1.2) at lam = 1:
    # task 0 has A = I + H/lam = diag(1.5, 2.2) (SPD), task 1 (s = -1) has A = diag(0.5, -0.2),
    # indefinite: CG's first step along g = c(1, 1) has curvature 0.3 c^2 > 0 and its second
    # meets negative curvature. Task 1 must contribute that first iterate (2/0.3) g, flagged.
    T = 2
    theta = {"w": torch.zeros(2, dtype=DT, requires_grad=True)}
    X = torch.diag(torch.tensor([1.0, 1.2], dtype=DT).sqrt() * 2**0.5)
    sign = torch.tensor([1.0, -1.0], dtype=DT)
    xs = torch.cat([X.expand(T, 2, 2), sign.view(T, 1, 1).expand(T, 2, 1)], -1)
    xs[:, :, :2] *= torch.tensor([0.5, 1.0], dtype=DT).sqrt()  # -> diag(0.5, 1.2)
    y = torch.zeros(T, 2, dtype=DT)

    def f(p, xx):
        return torch.stack([xx[:, :2] @ p["w"], xx[:, 2]], -1)

    def signed_loss(out, yy):
        return 0.5 * (out[:, 1] * out[:, 0] ** 2).mean()

    phi = ik.implicit_adapt(f, theta, (xs, y), lam=1.0, inner=ik.GD(0, 0.1), cg_iters=4, loss=signed_loss)
    (phi["w"] * torch.tensor([1.0, 2.0], dtype=DT)[:, None]).sum().backward()
    assert phi.info["cg"].breakdown.tolist() == [False, True]
    assert phi.info["cg"].iterations[1].item() == 1
    assert not phi.info["dropped"].any()
    expected = torch.tensor([1 / 1.5, 1 / 2.2], dtype=DT) + (2 / 0.3) * 2.0 * torch.ones(2, dtype=DT)
    assert torch.allclose(theta["w"].grad, expected, rtol=1e-10), (theta["w"].grad, expected)


def test_rows_finite_matches_isfinite():
    from imaml_kernels.implicit import _rows_finite

    for dtype in (torch.float32, torch.float64):
        big = torch.finfo(dtype).max
        t = torch.tensor([[1.0, 2.0, -3.0], [big, big, -big], [0.0, float("inf"), 1.0], [float("-inf"), 0.0, 0.0],
                          [float("nan"), 1.0, 1.0], [-0.0, 0.0, 5e-324 if dtype == torch.float64 else 1e-45]], dtype=dtype)
        assert _rows_finite(t).tolist() == torch.isfinite(t).all(1).tolist() == [True, True, False, False, False, True]


def test_engine_cache_entry_dies_with_its_model():
    import gc

    from imaml_kernels.engine import net as engine_net
    from imaml_kernels.nets import MLP

    model = MLP([3, 4, 2])
    engine_net.batched_net(model, (3,))
    key = id(model)
    assert key in engine_net._NETS
    del model
    gc.collect()
    assert key not in engine_net._NETS
