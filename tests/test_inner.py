"""The inner solvers (:mod:`imaml_kernels.inner`: GD, SGD, Adam, NewtonCG, SGDThenPullBack) on
an ``ik.ProximalObjective`` of a tiny float64 task batch, through torch.func and through the
fused engine: each decreases the proximal objective, GD equals a float64 loop, NewtonCG solves
a convex ridge problem, bad arguments raise."""

import pytest
import torch

import imaml_kernels as ik
from helpers import LAMS, lam_value, mlp_problem, near, proximal_descent, proximal_objective

KINDS = ("func", "engine")
SOLVERS = {
    "gd": lambda: ik.GD(10, 0.1),
    "sgd": lambda: ik.SGD(10, 0.05, momentum=0.9),
    "adam": lambda: ik.Adam(10, 0.01),
    "newton-cg": lambda: ik.NewtonCG(3, cg_iters=5),
    "sgd-then-pull-back": lambda: ik.SGDThenPullBack(5, 0.05),
}


@pytest.mark.parametrize("lam", list(LAMS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_each_solver_decreases_the_proximal_objective(solver, kind, lam):
    model, theta, x, y = mlp_problem()
    obj = proximal_objective(kind, model, theta, lam_value(lam), x, y)
    phi0 = near(theta, 3)
    kept = {k: v.clone() for k, v in phi0.items()}
    phi = SOLVERS[solver]()(obj, phi0)
    assert {k: v.shape for k, v in phi.items()} == {k: v.shape for k, v in phi0.items()}
    assert all(torch.equal(phi0[k], kept[k]) for k in phi0)  # phi0 is not modified
    assert not any(v.requires_grad for v in phi.values())  # no autograd graph
    before, after = obj.value(phi0), obj.value(phi)
    assert after.shape == (3,) and (after < before).all(), (before, after)


@pytest.mark.parametrize("lam", list(LAMS))
@pytest.mark.parametrize("kind", KINDS)
def test_gd_equals_a_float64_loop(kind, lam):
    model, theta, x, y = mlp_problem(seed=1)
    obj = proximal_objective(kind, model, theta, lam_value(lam), x, y)
    phi0 = near(theta, 3, seed=2)
    want = proximal_descent(model, theta, lam_value(lam), x, y, phi0, 7, 0.1)
    got = ik.GD(7, 0.1)(obj, phi0)
    for k in theta:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, msg=k)
    for k, v in ik.GD(0, 0.1)(obj, phi0).items():  # no step: φ0
        assert torch.equal(v, phi0[k]), k


def _ridge(T=3, n=10, d=4, seed=3):
    """A convex problem: per task ``0.5 mean((x w + b − y)²)``, float64."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(T, n, d, generator=g, dtype=torch.float64), torch.randn(T, n, generator=g, dtype=torch.float64)
    theta = {"w": torch.randn(d, generator=g, dtype=torch.float64), "b": torch.randn((), generator=g, dtype=torch.float64)}
    return (lambda p, xb, yb: 0.5 * ((xb @ p["w"] + p["b"] - yb) ** 2).mean()), theta, x, y


@pytest.mark.parametrize("lam", list(LAMS))
def test_newton_cg_reaches_a_small_gradient_on_a_convex_ridge_problem(lam):
    f, theta, x, y = _ridge()
    obj = ik.ProximalObjective(f, theta, lam_value(lam), (x, y))
    phi0 = near(theta, 3, scale=1.0)
    phi = ik.NewtonCG(4, cg_iters=6)(obj, phi0)  # P = 5: CG solves each Newton system exactly
    g = obj.grad(phi)
    assert max(v.abs().max().item() for v in g.values()) < 1e-10
    assert (obj.value(phi) < obj.value(phi0)).all()


BAD = [pytest.param(make, match, id=f"bad{i}") for i, (make, match) in enumerate([
    (lambda: ik.GD(-1, 0.1), "GD needs steps >= 0 and lr > 0"),
    (lambda: ik.GD(3, 0.0), "GD needs steps >= 0 and lr > 0"),
    (lambda: ik.SGD(3, -0.1), "SGD needs steps >= 0, lr > 0, 0 <= momentum < 1"),
    (lambda: ik.SGD(3, 0.1, momentum=1.0), "SGD needs"),
    (lambda: ik.Adam(-2, 0.1), "Adam needs steps >= 0 and lr > 0"),
    (lambda: ik.Adam(3, 0.0), "Adam needs"),
    (lambda: ik.NewtonCG(-1), "NewtonCG needs steps >= 0, cg_iters >= 1, ls_steps >= 1"),
    (lambda: ik.NewtonCG(3, cg_iters=0), "NewtonCG needs"),
    (lambda: ik.NewtonCG(3, ls_steps=0), "NewtonCG needs"),
    (lambda: ik.SGDThenPullBack(1.5, 0.1), "SGDThenPullBack needs an int steps >= 0 and lr > 0"),
    (lambda: ik.SGDThenPullBack(True, 0.1), "SGDThenPullBack needs"),
    (lambda: ik.SGDThenPullBack(3, float("nan")), "SGDThenPullBack needs"),
])]
# Every solver refuses a NaN or infinite lr and a steps that is not an int (bool included).
BAD += [pytest.param(make, "needs", id=f"checked-{name}") for name, make in (
    ("gd-nan-lr", lambda: ik.GD(3, float("nan"))), ("gd-float-steps", lambda: ik.GD(2.5, 0.1)),
    ("gd-bool-steps", lambda: ik.GD(True, 0.1)), ("gd-inf-lr", lambda: ik.GD(3, float("inf"))),
    ("sgd-nan-lr", lambda: ik.SGD(3, float("nan"))), ("adam-nan-lr", lambda: ik.Adam(3, float("nan"))),
    ("newton-cg-float-steps", lambda: ik.NewtonCG(2.5)), ("newton-cg-c1", lambda: ik.NewtonCG(2, c1=1.5)))]


@pytest.mark.parametrize("make,match", BAD)
def test_bad_constructor_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_solvers_describe_themselves():
    assert repr(ik.GD(16, 0.1)) == "GD(steps=16, lr=0.1)"
    assert repr(ik.SGD(4, 0.5)) == "SGD(steps=4, lr=0.5, momentum=0.9)"
    assert repr(ik.Adam(4, 0.5)) == "Adam(steps=4, lr=0.5)"
    assert repr(ik.NewtonCG(2)) == "NewtonCG(steps=2, cg_iters=5, ls_steps=4)"
    assert repr(ik.SGDThenPullBack(16, 0.1, pull_back=False)) == "SGDThenPullBack(steps=16, lr=0.1, pull_back=False)"
    assert ik.HessianFree is ik.NewtonCG


def test_newton_cg_moves_from_an_indefinite_start_and_reports_it():
    """Where ``H + λI`` is indefinite at θ along the gradient (saturated tanh units, λ 0.5), CG
    meets negative curvature at its first iteration and returns no direction; NewtonCG then takes
    the steepest-descent direction instead of staying at θ, reaches a lower proximal objective,
    and says so in ``phi.inner_info``."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    for p in model.parameters():
        p.data.mul_(6.0)  # saturated units: negative curvature along the gradient at θ
    x, y = torch.randn(2, 10, 2, dtype=torch.float64), torch.randint(0, 3, (2, 10))
    theta = dict(model.named_parameters())
    obj = ik.ProximalObjective(ik.task_loss_fn(model), {k: v.detach() for k, v in theta.items()}, 0.5, (x, y))
    phi0 = {k: v.detach().unsqueeze(0).expand(2, *v.shape).clone() for k, v in theta.items()}
    lin = obj.linearize(obj.layout.flatten(phi0))
    _, info = ik.cg_solve(lambda v: lin.hvp(v) + 0.5 * v, -lin.grad, iters=5)
    assert info.iterations[0] == 0 and info.breakdown[0], info  # task 0: no direction at all
    phi = ik.implicit_adapt(model, theta, (x, y), lam=0.5, inner=ik.NewtonCG(3, cg_iters=5))
    rep = phi.inner_info
    assert rep["decreased"].all() and rep["fallbacks"][0] > 0, rep
    assert (obj.value({k: v.detach() for k, v in phi.items()}) < obj.value(phi0)).all()
