"""The implicit op as a library API: pluggable solve, pytree φ, parameter subsets (the cross
term), HVPs for any model, evaluation without a meta-gradient, one-line errors, torch.compile."""

import re

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.func import functional_call, hessian, vmap

import imaml_kernels as ik
from imaml_kernels.nets import MLP

DT = torch.float64


def _mlp(d=3, h=4, way=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, way)).to(DT)


def _tasks(T=3, n=6, d=3, way=2, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, d, generator=g, dtype=dtype)
    y = torch.randint(0, way, (T, n), generator=g)
    xq = torch.randn(T, n, d, generator=g, dtype=dtype)
    yq = torch.randint(0, way, (T, n), generator=g)
    return x, y, xq, yq


def _outer(model, phi, xq, yq, loss=F.cross_entropy):
    return vmap(lambda p, x, y: loss(functional_call(model, p, (x,)), y))(phi, xq, yq).sum()


def _flat_fn(model, names, shapes, f):
    sizes = [torch.Size(s).numel() for s in shapes]

    def call(v, *a):
        return f({k: t.view(s) for k, t, s in zip(names, v.split(sizes), shapes)}, *a)

    return call


# ------------------------------------------------------------------ phi is a pytree


def test_phi_goes_into_vmap_functional_call_tree_map_and_keeps_its_diagnostics():
    model = _mlp()
    x, y, xq, yq = _tasks()
    theta = dict(model.named_parameters())
    phi = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.GD(3, 0.1))
    logits = vmap(lambda p, xx: functional_call(model, p, (xx,)))(phi, xq)  # no dict() needed
    doubled = pytree.tree_map(lambda t: 2 * t, phi)
    assert isinstance(doubled, ik.AdaptedParams) and set(doubled) == set(phi)
    assert torch.equal(doubled.inner_loss, phi.inner_loss)
    assert phi.info is None  # filled by the backward
    F.cross_entropy(logits.flatten(0, 1), yq.flatten()).backward()
    assert phi.info["cg"].iterations.shape == (3,) and not phi.info["dropped"].any()
    assert doubled.info is phi.info  # what tree_map rebuilt shares the diagnostics
    leaves, spec = pytree.tree_flatten(phi)
    assert len(leaves) == len(theta) and pytree.tree_unflatten(leaves, spec).info is phi.info


# ------------------------------------------------------------------ the solve as a parameter


def _dense_damped(model, theta, phi, x, y, xq, yq, lam, c, d):
    names = list(theta)
    shapes = [theta[k].shape for k in names]
    f = ik.task_loss_fn(model)
    flat = _flat_fn(model, names, shapes, f)
    total = 0
    for t in range(x.shape[0]):
        v = torch.cat([phi[k][t].detach().reshape(-1) for k in names])
        H = hessian(flat)(v, x[t], y[t])
        g = torch.func.grad(flat)(v, xq[t], yq[t])
        total = total + torch.linalg.solve((1 + c) * torch.eye(len(v), dtype=DT) + H / (lam + d), g)
    return total


@pytest.mark.parametrize("inner", [ik.GD(5, 0.2), ik.SGDThenPullBack(6, 0.3)], ids=["gd", "sgd-then-pull-back"])
def test_cg_damping_solves_the_authors_damped_system(inner):
    # At whatever φ the inner solver returns (the released SGD-then-pull-back one included).
    model = _mlp()
    x, y, xq, yq = _tasks()
    theta = dict(model.named_parameters())
    P = sum(v.numel() for v in theta.values())
    phi = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=inner,
                            solve=ik.CG(iters=2 * P, damping=1.0, lam_damping=10.0))
    _outer(model, phi, xq, yq).backward()
    got = torch.cat([theta[k].grad.reshape(-1) for k in theta])
    want = _dense_damped(model, theta, phi, x, y, xq, yq, 2.0, 1.0, 10.0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("damped", [False, True])
def test_any_callable_solve(damped):
    model = _mlp()
    x, y, xq, yq = _tasks()
    theta = dict(model.named_parameters())
    P = sum(v.numel() for v in theta.values())
    seen = {}

    def my_solve(matvec, b):  # a dense solve built from the operator it is handed
        eye = torch.eye(b.shape[1], dtype=b.dtype)
        A = torch.stack([matvec(eye[i].expand_as(b).contiguous()) for i in range(b.shape[1])], -1)  # [T, P, P]
        seen["A"] = A
        return torch.linalg.solve(A, b), {"dense": True}

    if damped:
        my_solve.damping, my_solve.lam_damping = 1.0, 10.0
    phi = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.GD(5, 0.2), solve=my_solve)
    _outer(model, phi, xq, yq).backward()
    got = torch.cat([theta[k].grad.reshape(-1) for k in theta])
    c, d = (1.0, 10.0) if damped else (0.0, 0.0)
    torch.testing.assert_close(got, _dense_damped(model, theta, phi, x, y, xq, yq, 2.0, c, d), rtol=1e-9, atol=1e-11)
    assert phi.info["cg"] == {"dense": True} and seen["A"].shape == (3, P, P)
    torch.testing.assert_close(seen["A"], seen["A"].transpose(1, 2))  # the operator is symmetric


def test_solve_arguments_are_checked():
    model = _mlp()
    x, y, _, _ = _tasks()
    theta = dict(model.named_parameters())
    run = lambda **kw: ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.GD(1, 0.1), **kw)  # noqa: E731
    with pytest.raises(ValueError, match="cg_iters=0 solves nothing .* first_order=True"):
        run(cg_iters=0)
    with pytest.raises(ValueError, match="cg_iters=0 solves nothing"):
        run(solve=ik.CG(iters=0))
    run(cg_iters=0, first_order=True)  # fine: no solve
    with pytest.raises(ValueError, match="either solve=CG.* or the shorthands"):
        run(solve=ik.CG(3), cg_iters=3)
    with pytest.raises(TypeError, match="solve must be a solver instance such as CG\\(5\\), got the class CG"):
        run(solve=ik.CG)
    with pytest.raises(ValueError, match="CG damping must be a finite number >= 0"):
        ik.CG(damping=-1.0)
    with pytest.raises(ValueError, match="CG iters must be an int >= 0"):
        ik.CG(iters=2.5)


def test_cg_flags_a_growing_residual_as_diverged():
    # Task 0: SPD. Task 1: nonsymmetric, with positive curvature along every direction CG
    # meets (no breakdown), yet its residual grows to 17x |b|.
    A = torch.tensor([
        [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]],
        [[4.582, -0.587, -4.358], [1.137, -0.669, -2.797], [0.807, 1.676, 0.061]],
    ], dtype=DT)
    b = torch.tensor([[1.0, 1.0, 1.0], [-0.403, -0.597, 0.182]], dtype=DT)
    x, info = ik.cg_solve(lambda v: torch.einsum("tij,tj->ti", A, v), b, iters=3)
    assert info.breakdown.tolist() == [False, False]
    assert info.diverged.tolist() == [False, True], info
    assert info.residual[1] > 1 and info.residual[0] < 1e-12


# ------------------------------------------------------------------ any parameter subset


def _converged(model, theta, x, y, lam, steps=30):
    with torch.no_grad():
        P = sum(v.numel() for v in theta.values())
        return ik.implicit_adapt(model, {k: v.detach() for k, v in theta.items()}, (x, y), lam=lam,
                                 inner=ik.NewtonCG(steps, cg_iters=P + 5))


@pytest.mark.parametrize("body_kind", ["meta-learned", "frozen"])
def test_head_only_adaptation_is_exact_against_finite_differences(body_kind):
    """ANIL: the head is adapted (θ), the body is meta-learned but not adapted (ψ): ψ gets the
    direct term plus the cross term; a frozen body gets nothing. Finite differences run
    through a converged inner solve (float64)."""
    model = _mlp(d=3, h=4, way=3, seed=2)
    x, y, xq, yq = _tasks(T=2, n=8, way=3, seed=3)
    lam = 1.5
    head = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters() if k.startswith("2.")}
    body = {k: v for k, v in model.named_parameters() if k.startswith("0.")}
    if body_kind == "frozen":
        for p in body.values():
            p.requires_grad_(False)
    P = sum(v.numel() for v in head.values())
    phi = ik.implicit_adapt(model, head, (x, y), lam=lam, inner=ik.NewtonCG(30, cg_iters=P + 5), solve=ik.CG(iters=4 * P))
    _outer(model, phi, xq, yq).backward()

    def meta_loss():
        return _outer(model, _converged(model, head, x, y, lam), xq, yq).item()

    g = torch.Generator().manual_seed(5)
    eps = 1e-5
    groups = [head] + ([body] if body_kind == "meta-learned" else [])
    for group in groups:
        for _ in range(2):
            dirs = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in group.items()}
            with torch.no_grad():
                for k in group:
                    group[k].add_(eps * dirs[k])
                up = meta_loss()
                for k in group:
                    group[k].sub_(2 * eps * dirs[k])
                down = meta_loss()
                for k in group:
                    group[k].add_(eps * dirs[k])
            fd = (up - down) / (2 * eps)
            got = sum((group[k].grad * dirs[k]).sum() for k in group).item()
            assert abs(got - fd) < 1e-7 * max(1.0, abs(fd)), (body_kind, got, fd)
    if body_kind == "frozen":
        assert all(p.grad is None for p in body.values())
    else:
        # Without the cross term the body's gradient would be the direct term alone: different.
        direct = torch.autograd.grad(_outer(model, {k: v.detach() for k, v in phi.items()}, xq, yq), list(body.values()))
        assert max((d - p.grad).abs().max().item() for d, p in zip(direct, body.values())) > 1e-4


def test_implicit_meta_grad_returns_the_non_adapted_parameters_too():
    model = _mlp(way=3, seed=4)
    x, y, xq, yq = _tasks(way=3)
    head = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters() if k.startswith("2.")}
    g, info = ik.implicit_meta_grad(model, head, (x, y), (xq, yq), lam=2.0, inner=ik.GD(10, 0.1))
    assert set(g) == {"2.weight", "2.bias", "0.weight", "0.bias"}
    phi = ik.implicit_adapt(model, head, (x, y), lam=2.0, inner=ik.GD(10, 0.1))
    _outer(model, phi, xq, yq).backward()
    for k, p in model.named_parameters():
        want = head[k].grad if k in head else p.grad
        torch.testing.assert_close(g[k], want, rtol=1e-12, atol=1e-14)


def test_theta_names_are_checked_against_the_model():
    model = _mlp()
    x, y, _, _ = _tasks()
    sub = dict(model[2].named_parameters())  # "weight", "bias": not the model's names
    with pytest.raises(ValueError, match=re.escape("theta['weight'] is not a parameter of the model") + ".*close matches: .*'0.weight'"):
        ik.implicit_adapt(model, sub, (x, y), lam=2.0, inner=ik.GD(1, 0.1))
    with pytest.raises(ValueError, match="theta\\['2.bias'\\] has shape \\[3\\] but the model's parameter has \\[2\\]"):
        ik.implicit_adapt(model, {"2.bias": torch.zeros(3, dtype=DT, requires_grad=True)}, (x, y), lam=2.0, inner=ik.GD(1, 0.1))


# ------------------------------------------------------------------ HVPs for any model


def _per_task_hvp(f, params, v, *batch):
    out = []
    for t in range(next(iter(params.values())).shape[0]):
        keys = list(params)
        p_t = tuple(params[k][t] for k in keys)
        v_t = tuple(v[k][t] for k in keys)
        _, hv = torch.autograd.functional.hvp(lambda *ps: f(dict(zip(keys, ps)), *(b[t] for b in batch)), p_t, v_t)
        out.append(dict(zip(keys, hv)))
    return {k: torch.stack([o[k] for o in out]) for k in params}


def test_hvp_fallback_matches_autograd_functional_hvp():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    cases = {
        "mse": (nn.Linear(3, 2).to(DT), F.mse_loss, lambda T: (torch.randn(T, 5, 3, dtype=DT), torch.randn(T, 5, 2, dtype=DT))),
        "huber": (nn.Linear(3, 2).to(DT), F.huber_loss, lambda T: (torch.randn(T, 5, 3, dtype=DT), torch.randn(T, 5, 2, dtype=DT))),
        "attention": (nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True).to(DT),
                      lambda out, y: (out - y).pow(2).mean(), lambda T: (torch.randn(T, 2, 3, 4, dtype=DT), torch.randn(T, 2, 3, 4, dtype=DT))),
    }
    for name, (model, loss, data) in cases.items():
        T = 2
        batch = data(T)
        f = ik.task_loss_fn(model, loss)
        params = {k: v.detach().expand(T, *v.shape).clone() + 0.01 * torch.randn(T, *v.shape, dtype=DT) for k, v in model.named_parameters()}
        v = {k: torch.randn_like(p) for k, p in params.items()}
        with pytest.raises((RuntimeError, NotImplementedError)):
            ik.batched_hvp(f, params, v, *batch, mode="fwdrev")  # the reason for the fallback
        got = ik.batched_hvp(f, params, v, *batch, mode="revrev") if name != "attention" else None
        with sdpa_kernel([SDPBackend.MATH]):
            if got is None:
                got = ik.batched_hvp(f, params, v, *batch, mode="revrev")
            want = _per_task_hvp(f, params, v, *batch)
        for k in params:
            torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=f"{name} {k}")
        # the implicit op picks the fallback by itself and agrees with an explicit revrev
        theta = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
        grads, plans = [], []
        for mode in ("auto", "revrev"):
            phi = ik.implicit_adapt(model, theta, batch, lam=2.0, inner=ik.GD(2, 0.05), loss=loss, hvp_mode=mode)
            vmap(lambda p, x, yy: loss(functional_call(model, p, (x,)), yy))(phi, *batch).sum().backward()
            grads.append({k: t.grad.clone() for k, t in theta.items()})
            plans.append(phi.plan)
            for t in theta.values():
                t.grad = None
        for k in theta:
            torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-10, atol=1e-13)
        # "auto" probed reverse-over-reverse, which runs on all three (forward-over-reverse is
        # probed only where it does not). The plan is remembered for the model, loss and
        # shapes: later calls do not probe again.
        assert plans[0].probe and plans[0].hvp == "revrev", plans[0]
        assert ik.plan_for(model, theta, batch, lam=2.0, inner=ik.GD(2, 0.05), loss=loss) is plans[0]
    with pytest.raises(ValueError, match="hvp_mode must be one of"):
        ik.implicit_adapt(cases["mse"][0], dict(cases["mse"][0].named_parameters()), cases["mse"][2](2), lam=1.0,
                          inner=ik.GD(1, 0.1), loss=F.mse_loss, hvp_mode="fast")


def test_fwdrev_and_revrev_agree_where_both_run():
    model = _mlp()
    x, y, xq, yq = _tasks()
    grads = []
    for mode in ("fwdrev", "revrev"):
        theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        phi = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.GD(4, 0.1), hvp_mode=mode)
        _outer(model, phi, xq, yq).backward()
        grads.append(torch.cat([v.grad.reshape(-1) for v in theta.values()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ evaluation without a meta-gradient


def test_detached_theta_or_no_grad_only_adapts():
    model = _mlp()
    x, y, _, _ = _tasks()
    theta = dict(model.named_parameters())
    ref = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.GD(3, 0.1))
    for phi in (
        ik.implicit_adapt(model, {k: v.detach() for k, v in theta.items()}, (x, y), lam=2.0, inner=ik.GD(3, 0.1)),
        _no_grad_adapt(model, theta, x, y),
    ):
        assert all(not v.requires_grad and v.grad_fn is None for v in phi.values())
        for k in theta:
            torch.testing.assert_close(phi[k], ref[k].detach(), rtol=0, atol=0)
        assert torch.isfinite(phi.inner_loss).all() and phi.info is None


def _no_grad_adapt(model, theta, x, y):
    with torch.no_grad():
        return ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.GD(3, 0.1))


# ------------------------------------------------------------------ one-line errors


def test_one_line_errors():
    model = _mlp()
    x, y, _, _ = _tasks()
    theta = dict(model.named_parameters())

    def run(m=model, th=theta, sup=(x, y), **kw):
        kw.setdefault("lam", 2.0)
        kw.setdefault("inner", ik.GD(1, 0.1))
        return ik.implicit_adapt(m, th, sup, **kw)

    cases = [
        (ValueError, "support x must be \\[T, N, ...\\] .* got shape \\[3\\]; for one task add the task dim", dict(sup=(x[0, 0], y[0]))),
        (ValueError, "support y must be \\[T, N, ...\\]", dict(sup=(x[0], y[0]))),
        (ValueError, "support has no tasks \\(T=0\\)", dict(sup=(x[:0], y[:0]))),
        (ValueError, "support x has N=6 examples per task but y has N=5", dict(sup=(x, y[:, :5]))),
        (TypeError, "inner must be a solver instance such as GD\\(16, 0.1\\), got the class GD", dict(inner=ik.GD)),
        (ValueError, "the inner solver returned phi\\['0.weight'\\] of shape \\[2, 4, 3\\], expected \\[3, 4, 3\\]",
         dict(inner=lambda obj, phi0: {k: v[:2] for k, v in phi0.items()})),
        (TypeError, "the inner solver must return a dict with the keys of theta", dict(inner=lambda obj, phi0: None)),
        (TypeError, "support x is torch.float32 but the parameters are torch.float64", dict(sup=(x.float(), y))),
        (ValueError, "support y holds labels in \\[7, 7\\] but the model has 2 outputs", dict(sup=(x, y.clone().fill_(7)), engine=False)),
        (ValueError, "support y holds labels in \\[-1, 1\\]", dict(sup=(x, torch.cat([y[:, :1] * 0 - 1, y[:, 1:]], 1)), engine=False)),
        (ValueError, "labels must lie in \\[0, 2\\), got values in \\[7, 7\\]", dict(sup=(x, y.clone().fill_(7)), engine=True)),
        (ValueError, "lam must be a scalar or a \\[T\\] tensor with T=3, got shape \\[2\\]", dict(lam=[1.0, 2.0])),
        (TypeError, "lam must be a number, a \\[T\\] tensor, a list of T numbers or a mapping", dict(lam="2")),
        (ValueError, "lam must be finite and > 0", dict(lam=float("inf"))),
        (TypeError, "theta must be a non-empty dict", dict(th={})),
        (TypeError, "model must be an nn.Module or a callable", dict(m=3)),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg) as info:
            run(**kw)
        assert "\n" not in str(info.value), str(info.value)
    # lam as a list of T numbers is a per-task λ, on the generic path too
    a = run(lam=[1.0, 2.0, 3.0], engine=False)
    b = run(lam=torch.tensor([1.0, 2.0, 3.0], dtype=DT), engine=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ------------------------------------------------------------------ torch.compile


def _compile_case(kind):
    torch.manual_seed(0)
    if kind == "engine":
        model = MLP([5, 7, 3])
        adapt_model = model

        def outer_fn(p, xx):
            return functional_call(model, p, (xx,))

        theta = dict(model.named_parameters())
    else:
        theta = {"w1": (0.5 * torch.randn(5, 7)).requires_grad_(), "w2": (0.5 * torch.randn(7, 3)).requires_grad_()}

        def adapt_model(p, xx):  # a plain function: the generic torch.func path
            return torch.tanh(xx @ p["w1"]) @ p["w2"]

        outer_fn = adapt_model
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(4, 6, 5, generator=g), torch.randint(0, 3, (4, 6), generator=g),
            torch.randn(4, 6, 5, generator=g), torch.randint(0, 3, (4, 6), generator=g))

    def f(x, y, xq, yq):
        phi = ik.implicit_adapt(adapt_model, theta, (x, y), lam=2.0, inner=ik.GD(3, 0.1),
                                solve=ik.CG(4, damping=1.0, lam_damping=10.0))
        logits = vmap(outer_fn)(phi, xq)
        return F.cross_entropy(logits.flatten(0, 1), yq.flatten())

    return f, theta, data


@pytest.mark.parametrize("kind", ["engine", "generic"])
def test_torch_compile_fullgraph_around_implicit_adapt(kind):
    torch._dynamo.reset()
    f, theta, data = _compile_case(kind)
    loss = f(*data)
    loss.backward()
    eager = {k: v.grad.clone() for k, v in theta.items()}
    for v in theta.values():
        v.grad = None
    compiled = torch.compile(f, fullgraph=True)
    loss2 = compiled(*data)
    loss2.backward()
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
    for k in theta:
        torch.testing.assert_close(theta[k].grad, eager[k], rtol=1e-5, atol=1e-7)
        assert eager[k].abs().max() > 0
