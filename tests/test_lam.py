"""Meta-learned λ (imaml_kernels/lam.py): every form of λ that requires grad receives its exact
hypergradient, on the fused engine and on the generic path, undamped (against central
differences through a converged inner solve) and damped (against the dense formula of the
damped system); the per-group proximal inner loop equals a plain loop; a λ that needs no
gradient costs nothing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import imaml_kernels as ik
from imaml_kernels.lam import PerCoordinate, resolve
from imaml_kernels.layout import ParamLayout

DT = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT), (3,)


def _cnn():
    """Conv (stride 2) + BatchNorm (batch statistics) + Tanh + a head: smooth, so an inner solve
    converges tightly and central differences mean something (ReLU and max-pool kinks would not)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.Tanh(),
                        nn.Flatten(), nn.Linear(3 * 3 * 3, 3))
    return net.to(DT), (1, 6, 6)


def _data(shape, T=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(T, 6, *shape, generator=g, dtype=DT), torch.randn(T, 6, *shape, generator=g, dtype=DT)
    return xs, torch.arange(3).repeat(T, 2), xq, torch.randint(0, 3, (T, 6), generator=g)


def _outer(model, data, lam, engine, solve, inner):
    xs, ys, xq, yq = data
    theta = {k: v.detach() for k, v in model.named_parameters()}
    phi = ik.implicit_adapt(model, theta, (xs, ys), lam=lam, inner=inner, solve=solve, engine=engine)
    return F.cross_entropy(ik.query_logits(model, phi, xq, engine=engine).flatten(0, 1), yq.flatten()), phi


def _forms(T, scale=1.0):
    """name -> (λ requiring grad, its leaves, a function of the leaves' values giving a λ)."""
    scalar = torch.tensor(1.5 * scale, dtype=DT, requires_grad=True)
    per_task = torch.tensor([1.0 * scale, 1.5 * scale, 2.0 * scale][:T], dtype=DT, requires_grad=True)
    groups = {"0": torch.tensor(1.5 * scale, dtype=DT, requires_grad=True), "": torch.tensor(1.2 * scale, dtype=DT, requires_grad=True)}
    return {
        "scalar": (scalar, [scalar], lambda v: v[0]),
        "per-task": (per_task, [per_task], lambda v: v[0]),
        "per-group": (groups, list(groups.values()), lambda v: dict(zip(groups, v))),
    }


# The MLP on both paths; the CNN (BatchNorm) through the engine. The CNN's inner solve: GD with
# λ large enough for it to converge to 1e-14 (a converged φ* is what the implicit gradient
# differentiates; central differences then see the same function).
CASES = [pytest.param(m, e, f, id=f"{m}-{'engine' if e is None else 'generic'}-{f}")
         for m, engines in (("mlp", (None, False)), ("cnn", (None,))) for e in engines for f in ("scalar", "per-task", "per-group")]


@pytest.mark.parametrize("model_name,engine,form", CASES)
def test_undamped_lambda_gradient_equals_central_differences(model_name, engine, form):
    model, shape = {"mlp": _mlp, "cnn": _cnn}[model_name]()
    data = _data(shape)
    if model_name == "mlp":
        inner, solve, scale = ik.NewtonCG(15, cg_iters=40), ik.CG(80), 1.0
    else:
        inner, solve, scale = ik.GD(150, 0.04), ik.CG(120), 12.0
    lam, leaves, make = _forms(3, scale)[form]
    loss, phi = _outer(model, data, lam, engine, solve, inner)
    assert phi.plan.path == ("engine" if engine is None else "generic")
    loss.backward()
    for i, leaf in enumerate(leaves):
        for j in range(leaf.numel()):
            vals = [v.detach().clone() for v in leaves]
            h = 1e-5
            vals[i].view(-1)[j] += h
            with torch.no_grad():
                up = _outer(model, data, make(vals), engine, solve, inner)[0]
            vals[i].view(-1)[j] -= 2 * h
            with torch.no_grad():
                dn = _outer(model, data, make(vals), engine, solve, inner)[0]
            fd = (up - dn).item() / (2 * h)
            got = leaf.grad.view(-1)[j].item()
            assert abs(got - fd) <= 1e-6 * max(1.0, abs(fd)) + 2e-8, (form, i, j, got, fd)


def _dense(model, data, phi, lam_vec, c, d):
    """The damped formula per task, densely: ``y = (H + Λ')⁻¹ g``, ``Λ' = (1+c)(Λ + d)``;
    ``dL/dλ_i = −y_i (φ − θ)_i`` and θ's rows ``(Λ + d) y``, for a per-coordinate ``lam_vec [P]``."""
    xs, ys, xq, yq = data
    names = [k for k, _ in model.named_parameters()]
    layout = ParamLayout.from_params(dict(model.named_parameters()), batched=False)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    T = xs.shape[0]
    sens, rows = [], []
    for t in range(T):
        p_t = layout.flatten({k: phi[k][t:t + 1] for k in names})[0].detach()

        def f(v, x, y):
            return F.cross_entropy(functional_call(model, {k: t_ for k, t_ in zip(names, _views(layout, v))}, (x,)), y)

        H = torch.func.hessian(lambda v: f(v, xs[t], ys[t]))(p_t)
        g = torch.func.grad(lambda v: f(v, xq[t], yq[t]))(p_t) / T  # the mean over the tasks' queries
        y = torch.linalg.solve(H + torch.diag((1 + c) * (lam_vec + d)), g)
        sens.append(-y * (p_t - theta))
        rows.append((lam_vec + d) * y)
    return torch.stack(sens), torch.stack(rows)


def _views(layout, v):
    return [v[layout.offsets[k]:layout.offsets[k] + layout.numels[k]].view(layout.shapes[k]) for k in layout.names]


@pytest.mark.parametrize("engine", [None, False], ids=["engine", "generic"])
@pytest.mark.parametrize("form", ["per-task", "per-group"])
def test_damped_lambda_gradient_equals_the_dense_damped_formula(engine, form):
    """With ``CG(damping=c, lam_damping=d)`` θ's gradient is ``Σ_t (Λ + d) y_t`` and λ's is
    ``−Σ y ⊙ (φ − θ)`` over its coordinates, ``y_t = (H_t + (1+c)(Λ + d))⁻¹ g_t``: the same
    damped inverse in both (exact with c = d = 0)."""
    model, shape = _mlp()
    data = _data(shape)
    c, d = 1.0, 10.0
    lam, leaves, _ = _forms(3)[form]
    theta = dict(model.named_parameters())
    for p in theta.values():
        p.grad = None
    xs, ys, xq, yq = data
    P = sum(p.numel() for p in theta.values())
    phi = ik.implicit_adapt(model, theta, (xs, ys), lam=lam, inner=ik.GD(20, 0.1), solve=ik.CG(2 * P, damping=c, lam_damping=d),
                            engine=engine)
    F.cross_entropy(ik.query_logits(model, phi, xq, engine=engine).flatten(0, 1), yq.flatten()).backward()
    layout = ParamLayout.from_params(theta, batched=False)
    r = resolve(lam, 3, "cpu", layout, DT)
    lam_vecs = [r.value.vector] * 3 if isinstance(r.value, PerCoordinate) else [r.value[t].expand(P) for t in range(3)]
    sens, rows = zip(*[(s[t], w[t]) for t in range(3) for s, w in [_dense(model, data, phi, lam_vecs[t], c, d)]])
    got_theta = torch.cat([p.grad.reshape(-1) for p in theta.values()])
    torch.testing.assert_close(got_theta, torch.stack(rows).sum(0), rtol=1e-8, atol=1e-11)
    if form == "per-task":
        want = torch.stack([s.sum() for s in sens])
        torch.testing.assert_close(leaves[0].grad, want, rtol=1e-8, atol=1e-12)
    else:
        total = torch.stack(sens).sum(0)
        for i, leaf in enumerate(leaves):
            mask = torch.cat([torch.full((layout.numels[k],), r.value.groups[k] == i) for k in layout.names])
            torch.testing.assert_close(leaf.grad, total[mask].sum(), rtol=1e-8, atol=1e-12)


def test_per_group_inner_loop_equals_a_plain_loop():
    """Proximal GD with one λ per layer: the fused engine and the generic path equal a float64
    loop of ``φ ← φ − lr (∇L̂(φ) + Λ (φ − θ))``."""
    model, shape = _cnn()
    xs, ys, _, _ = _data(shape)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    lam = {"0": 0.5, "1": 3.0, "": 7.0}
    lam_of = {k: (0.5 if k.startswith("0.") else 3.0 if k.startswith("1.") else 7.0) for k in theta}
    want = []
    for t in range(xs.shape[0]):
        p = {k: v.clone() for k, v in theta.items()}
        for _ in range(4):
            p = {k: v.requires_grad_() for k, v in p.items()}
            g = torch.autograd.grad(F.cross_entropy(functional_call(model, p, (xs[t],)), ys[t]), list(p.values()))
            p = {k: (v - 0.1 * (gk + lam_of[k] * (v - theta[k]))).detach() for (k, v), gk in zip(p.items(), g)}
        want.append(p)
    for engine in (None, False):
        phi = ik.implicit_adapt(model, theta, (xs, ys), lam=lam, inner=ik.GD(4, 0.1), engine=engine)
        assert phi.plan.path == ("engine" if engine is None else "generic")
        for k in theta:
            torch.testing.assert_close(phi[k], torch.stack([w[k] for w in want]), rtol=1e-12, atol=1e-13)


def test_custom_solve_gets_the_symmetric_operator_and_the_same_gradient():
    model, shape = _mlp()
    data = _data(shape)
    lam, leaves, _ = _forms(3)["per-group"]
    seen = {}

    def dense(matvec, b):
        eye = torch.eye(b.shape[1], dtype=b.dtype)
        A = torch.stack([matvec(eye[i].expand_as(b).contiguous()) for i in range(b.shape[1])], -1)
        seen["A"] = A
        return torch.linalg.solve(A, b), None

    _outer(model, data, lam, None, dense, ik.GD(10, 0.1))[0].backward()
    got = [v.grad.clone() for v in leaves]
    torch.testing.assert_close(seen["A"], seen["A"].transpose(1, 2))
    for v in leaves:
        v.grad = None
    P = seen["A"].shape[1]
    _outer(model, data, lam, None, ik.CG(2 * P), ik.GD(10, 0.1))[0].backward()
    for a, v in zip(got, leaves):
        torch.testing.assert_close(a, v.grad, rtol=1e-8, atol=1e-12)


def test_forms_and_errors():
    model, _ = _mlp()
    theta = dict(model.named_parameters())
    layout = ParamLayout.from_params(theta, batched=False)
    r = resolve({"0.weight": 1.0, "0": 2.0, "": 3.0}, 2, "cpu", layout, DT)
    assert r.value.groups == {"0.weight": 0, "0.bias": 1, "2.weight": 2, "2.bias": 2} and r.sources == ()
    assert resolve(2.0, 2, "cpu", layout).value == 2.0 and resolve([1, 2], 2, "cpu", layout).value.shape == (2,)
    with pytest.raises(ValueError, match="no λ for the parameter '2.weight'"):
        resolve({"0": 1.0}, 2, "cpu", layout)
    with pytest.raises(ValueError, match=r"lam\['0'\] must be finite and > 0"):
        resolve({"0": -1.0, "": 1.0}, 2, "cpu", layout)
    with pytest.raises(ValueError, match="finite and > 0 for every task and group"):
        resolve({"0": torch.tensor(0.0), "": 1.0}, 2, "cpu", layout)
    with pytest.raises(ValueError, match="scalar tensor"):
        resolve({"": torch.ones(2)}, 2, "cpu", layout)


def _lam_step(cfg, lam_of):
    """A fused 5w1s meta-step on fake CUDA tensors (bench.launches) with λ = ``lam_of(device)``."""
    from bench.launches import steps
    from imaml_kernels.step import meta_step
    from imaml_kernels.trainer.builders import build_backward_solve, build_solver

    model = steps._fake_cuda_model(cfg)
    theta = dict(model.named_parameters())
    opt, solver, batch = steps._optimizer(model, cfg), build_solver(cfg), steps._fake_batch(cfg)
    lam = lam_of(batch[0].device)
    return lambda: meta_step(model, theta, opt, batch, lam=lam, inner=solver, solve=build_backward_solve(cfg))


def number_lam_step(cfg):
    return _lam_step(cfg, lambda dev: 2.0)


def tensor_lam_step(cfg):
    return _lam_step(cfg, lambda dev: torch.full((cfg["meta_batch"],), 2.0, device=dev))


def learned_lam_step(cfg):
    return _lam_step(cfg, lambda dev: torch.full((cfg["meta_batch"],), 2.0, device=dev, requires_grad=True))


def test_a_lambda_without_gradient_adds_no_launch():
    """Counted on fake CUDA tensors (the GPU code path, bench.launches): the trainer's λ (a
    number) runs exactly the launches of the standard fused meta-step, a [T] tensor that needs
    no gradient at most the few of its per-task arithmetic, and only a λ that requires grad
    pays for its gradient (a handful of launches, no host synchronisation)."""
    from bench import launches

    small = {"meta_batch": 2, "inner_steps": 1, "cg_iters": 2}
    specs = [{"kind": "fused", "shape": "omniglot-5w1s", "overrides": small, "sites": False}] + [
        {"kind": "custom", "target": f"tests.test_lam:{name}", "shape": "omniglot-5w1s", "overrides": small, "sites": False}
        for name in ("number_lam_step", "tensor_lam_step", "learned_lam_step")]
    fused, number, tensor, learned = launches.measure(specs, timeout=900)
    assert number["launches"] == fused["launches"] and number["sync_count"] == 0
    assert 0 <= tensor["launches"] - number["launches"] <= 4, (tensor["by_op"], number["by_op"])
    assert 0 < learned["launches"] - tensor["launches"] <= 10 and learned["sync_count"] == 0
