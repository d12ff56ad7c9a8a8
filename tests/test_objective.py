"""The objective inner solvers and the implicit backward work on
(:mod:`imaml_kernels.objective`), in float64: ``proximal_term`` and ``lam_like``; the two task
objectives (torch.func's ``FuncObjective`` and the fused engine's ``EngineObjective``) give the
same loss, gradient and HVP; a linearisation's HVP in its work order; ``subset``; ``descend``
against a float64 loop."""

import pytest
import torch

import imaml_kernels as ik
from imaml_kernels.objective import EngineObjective, FuncObjective, lam_like, proximal_term
from imaml_kernels.nets import OmniglotConv
from helpers import LAMS, lam_value, mlp_problem, near, proximal_descent, proximal_objective

DT = torch.float64
KINDS = ("func", "engine")


def conv_problem(T=3, N=3, seed=0):
    """An OmniglotConv of 4 channels (the engine's work order differs from θ's): ``(model, theta, x, y)``."""
    torch.manual_seed(seed)
    model = OmniglotConv(3, channels=4).to(DT)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, 1, 28, 28, generator=g, dtype=DT)
    return model, {k: v.detach() for k, v in model.named_parameters()}, x, torch.randint(0, 3, (T, N), generator=g)


PROBLEMS = {"mlp": mlp_problem, "conv": conv_problem}


def _close(a, b, tol=1e-10, what=""):
    """Dicts (or tensors) ``a`` and ``b`` agree to ``tol`` relative to their scale."""
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            _close(a[k], b[k], tol, f"{what} {k}")
        return
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()), msg=what)


# --------------------------------------------------------------------------- the proximal term


@pytest.mark.parametrize("lam", list(LAMS))
def test_proximal_term_value_and_gradient_match_autograd(lam):
    _, theta, _, _ = mlp_problem()
    lam = lam_value(lam)
    phi = {k: v.requires_grad_() for k, v in near(theta, 3).items()}
    layout = ik.ParamLayout.from_params(theta, batched=False)
    flat_theta = layout.flatten({k: v[None] for k, v in theta.items()})[0]
    lam_t = torch.as_tensor(lam, dtype=DT).expand(3)
    sq = sum(((phi[k] - theta[k]) ** 2).flatten(1).sum(1) for k in theta)
    for form in ("dict", "flat"):
        value, g = proximal_term(phi, theta, lam) if form == "dict" else proximal_term(layout.flatten(phi), flat_theta, lam)
        torch.testing.assert_close(value, 0.5 * lam_t * sq, rtol=1e-14, atol=0, msg=form)
        auto = dict(zip(phi, torch.autograd.grad(value.sum(), list(phi.values()))))
        _close(g if form == "dict" else layout.unflatten(g), auto, 1e-14, form)


def test_lam_like():
    t = torch.randn(3, 4, 5, dtype=torch.float32)
    assert lam_like(2.0, t) == 2.0 and isinstance(lam_like(2.0, t), float)  # a number stays one (no launch)
    lam = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
    out = lam_like(lam, t)
    assert out.shape == (3, 1, 1) and out.dtype == torch.float32
    assert torch.equal(out.flatten(), lam.float())
    assert lam_like(lam, t[:, 0, 0]).shape == (3,)


# --------------------------------------------------------------------------- the two task objectives


@pytest.mark.parametrize("lam", list(LAMS))
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_engine_and_func_objectives_agree(problem, lam):
    model, theta, x, y = PROBLEMS[problem]()
    lam = lam_value(lam)
    func, engine = (proximal_objective(kind, model, theta, lam, x, y) for kind in KINDS)
    assert isinstance(func.task, FuncObjective) and isinstance(engine.task, EngineObjective)
    assert engine.engine is not None and func.engine is None
    phi, v = near(theta, 3, scale=0.1, seed=4), near({k: torch.zeros_like(t) for k, t in theta.items()}, 3, 1.0, seed=5)
    _close(engine.task_value(phi), func.task_value(phi), what="task value")
    _close(engine.value(phi), func.value(phi), what="value")
    ve, ge = engine.value_and_grad(phi)
    vf, gf = func.value_and_grad(phi)
    _close(ve, vf, what="value_and_grad value")
    _close(ge, gf, what="gradient")
    _close(engine.grad(phi), ge, 0, "grad")
    hv = func.task_hvp(phi, v)
    _close(engine.task_hvp(phi, v), hv, what="task_hvp")
    # The proximal objective's Hessian: (H_t + λ_t I) v_t.
    _close(func.hvp(phi, v), {k: hv[k] + lam_like(lam, v[k]) * v[k] for k in v}, 1e-14, "hvp")
    _close(engine.hvp(phi, v), func.hvp(phi, v), what="hvp")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_linearization_hvp_in_its_work_order(problem, kind):
    """``lin.hvp`` takes and gives the work order: ``from_work(hvp(to_work(v)))`` is the dict-level
    ``ProximalObjective.task_hvp`` (of either task objective); ``loss`` and ``grad`` are in θ's order."""
    model, theta, x, y = PROBLEMS[problem]()
    objs = {k: proximal_objective(k, model, theta, 2.0, x, y) for k in KINDS}
    obj, lay = objs[kind], objs[kind].layout
    phi, v = near(theta, 3, scale=0.1, seed=6), near({k: torch.zeros_like(t) for k, t in theta.items()}, 3, 1.0, seed=7)
    lin = obj.linearize(lay.flatten(phi))
    w = lin.to_work(lay.flatten(v))
    assert w.shape == (3, lay.numel)
    torch.testing.assert_close(lin.from_work(w), lay.flatten(v), rtol=0, atol=0)  # a permutation, exactly undone
    got = lay.unflatten(lin.from_work(lin.hvp(w)))
    for other in KINDS:
        _close(got, objs[other].task_hvp(phi, v), what=f"{kind} lin.hvp vs {other} task_hvp")
    _close(lin.loss, objs["func"].task_value(phi), what="lin.loss")
    _close(lay.unflatten(lin.grad), objs["func"].task.loss_and_grad(phi)[1], what="lin.grad")


@pytest.mark.parametrize("lam", list(LAMS))
@pytest.mark.parametrize("kind", KINDS)
def test_subset_equals_slicing(kind, lam):
    model, theta, x, y = mlp_problem()
    obj = proximal_objective(kind, model, theta, lam_value(lam), x, y)
    phi, v = near(theta, 3, seed=8), near(theta, 3, seed=9)
    sub = obj.subset(1, 3)
    part = lambda d: {k: t[1:3] for k, t in d.items()}  # noqa: E731
    _close(sub.value(part(phi)), obj.value(phi)[1:3], 1e-13, "value")
    _close(sub.grad(part(phi)), part(obj.grad(phi)), 1e-13, "grad")
    _close(sub.task_hvp(part(phi), part(v)), part(obj.task_hvp(phi, v)), 1e-12, "task_hvp")
    _close(sub.descend(part(phi), 3, 0.1), part(obj.descend(phi, 3, 0.1)), 1e-12, "descend")
    assert sub.theta is obj.theta and len(sub.batch[0]) == 2 and len(obj.batch[0]) == 3  # θ shared, the original untouched
    if isinstance(obj.lam, torch.Tensor):
        assert torch.equal(sub.lam, obj.lam[1:3])


@pytest.mark.parametrize("proximal,pull_back", [(True, False), (False, False), (False, True), (True, True)],
                         ids=["proximal", "task-loss", "task-loss-then-pull-back", "proximal-then-pull-back"])
@pytest.mark.parametrize("lam", list(LAMS))
@pytest.mark.parametrize("kind", KINDS)
def test_descend_equals_a_float64_loop(kind, lam, proximal, pull_back):
    model, theta, x, y = mlp_problem(seed=2)
    obj = proximal_objective(kind, model, theta, lam_value(lam), x, y)
    phi0 = near(theta, 3, seed=3)
    kept = {k: t.clone() for k, t in phi0.items()}
    got = obj.descend(phi0, 5, 0.2, proximal=proximal, pull_back=pull_back)
    want = proximal_descent(model, theta, lam_value(lam), x, y, phi0, 5, 0.2, proximal=proximal, pull_back=pull_back)
    _close(got, want, 1e-12, "descend")
    assert all(torch.equal(phi0[k], kept[k]) for k in phi0)  # phi0 is not modified


def test_theta_flat_follows_theta_and_is_made_once():
    model, theta, x, y = mlp_problem()
    obj = proximal_objective("func", model, theta, 2.0, x, y)
    flat = obj.theta_flat
    assert flat.shape == (obj.layout.numel,) and obj.theta_flat is flat
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in theta.values()]))
    obj.theta["0.bias"].add_(1.0)  # θ changed in place: a new flat copy
    assert torch.equal(obj.theta_flat, torch.cat([t.reshape(-1) for t in obj.theta.values()]))


def test_bad_arguments_raise():
    model, theta, x, y = mlp_problem()
    net = ik.select_engine(model, theta, x)
    sub = {k: t for k, t in theta.items() if k != "2.bias"}
    with pytest.raises(ValueError, match="the engine's parameter layout differs from theta's"):
        ik.ProximalObjective(ik.task_loss_fn(model), sub, 2.0, (x, y), engine=net)
    with pytest.raises(ValueError, match="hvp_mode must be one of"):
        ik.ProximalObjective(ik.task_loss_fn(model), theta, 2.0, (x, y), hvp_mode="fast")
    with pytest.raises(TypeError, match="model must be an nn.Module or a callable"):
        ik.task_loss_fn(3)


class _Unused(torch.nn.Module):
    """A linear layer and a parameter no loss reaches."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.spare = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.lin(x)


def test_func_gradients_are_each_tasks_own_and_zero_where_unused():
    # FuncObjective's gradients are one backward of the tasks' summed loss through the vmapped
    # forward: each task's gradient must be its own (as a per-task autograd call gives it) and an
    # unused parameter's zero, under no_grad (the inner loop's context) too.
    from imaml_kernels.layout import ParamLayout
    from imaml_kernels.objective import task_loss_fn

    torch.manual_seed(0)
    model = _Unused().to(DT)
    T = 3
    phi = {k: v.detach() + 0.1 * torch.randn(T, *v.shape, dtype=DT) for k, v in model.named_parameters()}
    x, y = torch.randn(T, 5, 4, dtype=DT), torch.randint(0, 3, (T, 5))
    f = task_loss_fn(model)
    obj = FuncObjective(f, ParamLayout.from_params(phi), (x, y))
    with torch.no_grad():
        loss, g = obj.loss_and_grad(phi)
    for t in range(T):
        leaves = {k: v[t].clone().requires_grad_() for k, v in phi.items()}
        lt = f(leaves, x[t], y[t])
        want = torch.autograd.grad(lt, [leaves["lin.weight"], leaves["lin.bias"]])
        assert torch.allclose(loss[t], lt.detach(), rtol=1e-13, atol=0)
        assert torch.allclose(g["lin.weight"][t], want[0], rtol=1e-12, atol=1e-14)
        assert torch.allclose(g["lin.bias"][t], want[1], rtol=1e-12, atol=1e-14)
    assert torch.equal(g["spare"], torch.zeros(T, 2, dtype=DT))


def test_the_generic_inner_loop_does_not_import_dynamo():
    # torch.func.grad imports torch._dynamo (about 65 MiB of modules); the generic path's
    # gradients and inner loop do not need it.
    import os
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from helpers import mlp_problem\n"
        "from imaml_kernels.objective import FuncObjective, task_loss_fn\n"
        "from imaml_kernels.layout import ParamLayout\n"
        "model, theta, x, y = mlp_problem()\n"
        "phi = {k: v.unsqueeze(0).repeat(x.shape[0], *[1] * v.dim()) for k, v in theta.items()}\n"
        "lay = ParamLayout.from_params(phi)\n"
        "obj = FuncObjective(task_loss_fn(model), lay, (x, y))\n"
        "obj.loss_and_grad(phi)\n"
        "obj.descend(lay.flatten(phi)[0], 2.0, lay.flatten(phi), 3, 0.1)\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_one_task_runs_without_vmap_and_equals_the_vmapped_objective():
    """A chunk of one task calls the task's own function (``vmap`` over one task cost the
    ResNet-12 of ``bench models`` 1.3-1.6x): its loss, gradient, HVP and cross term equal the
    ``vmap``'d objective's (``randomness="same"`` keeps ``vmap`` on one task) in float64, and the
    task loss sees no batched tensor."""
    from torch._C._functorch import is_batchedtensor

    from imaml_kernels.layout import ParamLayout
    from imaml_kernels.objective import task_loss_fn
    from helpers import rel_err

    model, theta, x, y = mlp_problem(T=1)
    psi_name = "2.bias"  # the head's bias: meta-learned, not adapted
    psi = {psi_name: theta[psi_name].clone()}
    adapted = {k: v for k, v in theta.items() if k != psi_name}
    phi = {k: (v + 0.1 * torch.randn_like(v)).unsqueeze(0) for k, v in adapted.items()}
    lay = ParamLayout.from_params(phi)
    base = task_loss_fn(model)
    seen = []

    def f(params, xb, yb):
        seen.append(is_batchedtensor(xb))
        return base(params, xb, yb)

    one = FuncObjective(f, lay, (x, y), psi=psi)
    batched = FuncObjective(f, lay, (x, y), psi=psi, randomness="same")
    assert one._one() and not batched._one()
    seen.clear()
    v1, g1 = one.loss_and_grad(phi)
    assert seen == [False]
    v2, g2 = batched.loss_and_grad(phi)
    assert seen[-1] is True
    assert rel_err(v1, v2) < 1e-13 and all(rel_err(g1[k], g2[k]) < 1e-12 for k in g1)
    assert rel_err(one.loss(phi), v2) < 1e-13
    flat = lay.flatten(phi)
    u = torch.randn_like(flat)
    la, lb = one.linearize(flat), batched.linearize(flat)
    assert la._graph[0][0].dim() == phi[lay.names[0]].dim() - 1  # leaves without the task dimension
    assert rel_err(la.grad, lb.grad) < 1e-12 and rel_err(la.hvp(u), lb.hvp(u)) < 1e-12
    ca, cb = la.cross_vjp(u), lb.cross_vjp(u)
    assert set(ca) == {psi_name} and rel_err(ca[psi_name], cb[psi_name]) < 1e-12


def test_one_task_descent_with_a_scalar_lam_equals_the_general_loop(monkeypatch):
    """A chunk of one task at a scalar λ descends on leaves made once with ``_foreach`` updates:
    the same iterates, bit for bit, as the general per-parameter loop (taken at a per-task λ
    tensor of the same value), with and without the proximal term and the pull-back; a
    parameter the loss does not reach moves only by the proximal pull."""
    from imaml_kernels.layout import ParamLayout
    from imaml_kernels.objective import task_loss_fn

    model, theta, x, y = mlp_problem(T=1)
    phi = {k: (v + 0.1 * torch.randn_like(v)).unsqueeze(0) for k, v in theta.items()}
    lay = ParamLayout.from_params(phi)
    base = task_loss_fn(model)
    unused = lay.names[0]

    def f(params, xb, yb):  # the first layer's weight enters as a constant: no gradient reaches it
        return base({**params, unused: params[unused].detach()}, xb, yb)

    obj = FuncObjective(f, lay, (x, y))
    taken, fast = [], FuncObjective._descend_one
    monkeypatch.setattr(FuncObjective, "_descend_one", lambda self, *a: taken.append(1) or fast(self, *a))
    th, start = lay.flatten({k: v.unsqueeze(0) for k, v in theta.items()})[0], lay.flatten(phi)
    for proximal, pull_back in ((True, False), (False, False), (True, True)):
        a = obj.descend(th, 2.0, start, 4, 0.1, proximal=proximal, pull_back=pull_back)
        n = len(taken)
        b = obj.descend(th, torch.tensor([2.0], dtype=DT), start, 4, 0.1, proximal=proximal, pull_back=pull_back)
        assert len(taken) == n and n > 0  # the scalar λ took the fast path, the tensor λ did not
        assert torch.equal(a, b) and not torch.equal(a, start)
        moved = lay.unflatten(a)[unused] - phi[unused]
        if proximal:
            assert moved.abs().max() > 0
        else:
            assert torch.equal(moved, torch.zeros_like(moved))


def test_one_task_that_draws_random_numbers_is_refused_as_under_vmap():
    """Without ``vmap`` a random draw would pass unnoticed: the generator's state is compared
    around the call, and the one-line error names the option, as with several tasks."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3)).to(DT)
    x, y = torch.randn(2, 5, 4, dtype=DT), torch.randint(0, 3, (2, 5))
    with pytest.raises(ValueError, match="randomness='different'") as e:
        ik.implicit_adapt(model, dict(model.named_parameters()), (x, y), lam=2.0, inner=ik.GD(2, 0.1), chunk=1)
    assert "\n" not in str(e.value)
    model.eval()  # no draws: runs
    ik.implicit_adapt(model, dict(model.named_parameters()), (x, y), lam=2.0, inner=ik.GD(2, 0.1), chunk=1)
