"""The authors' released protocol as selectable variants (issue 15): the "SGD then pull-back"
inner solver, fused through the engine and on the generic path, against a float64 loop."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

import imaml_kernels as ik
from imaml_kernels.nets import OmniglotConv


DT = torch.float64


def _reference_sgd_pull_back(model, theta, x, y, lam, steps, lr):
    """The released procedure, one task at a time, in float64: ``steps`` plain SGD steps on
    the task loss, then one step on the proximal term alone."""
    out = {k: [] for k in theta}
    lam = torch.as_tensor(lam, dtype=DT).expand(x.shape[0])
    for t in range(x.shape[0]):
        phi = {k: v.detach().clone() for k, v in theta.items()}
        loss = lambda p: F.cross_entropy(functional_call(model, p, (x[t],)), y[t])  # noqa: E731
        for _ in range(steps):
            g = grad(loss)(phi)
            phi = {k: phi[k] - lr * g[k] for k in phi}
        phi = {k: phi[k] - lr * lam[t] * (phi[k] - theta[k].detach()) for k in phi}
        for k in phi:
            out[k].append(phi[k])
    return {k: torch.stack(v) for k, v in out.items()}


def _conv_tasks(T=3, way=3, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, way * n, 1, 28, 28, generator=g, dtype=DT)
    y = torch.arange(way).repeat_interleave(n).expand(T, -1).contiguous()
    return x, y


@pytest.mark.parametrize("engine", [True, False], ids=["engine", "generic"])
@pytest.mark.parametrize("lam", [2.0, [0.5, 2.0, 4.0]], ids=["scalar-lam", "per-task-lam"])
def test_sgd_then_pull_back_equals_the_float64_loop(engine, lam):
    torch.manual_seed(0)
    model = OmniglotConv(3, channels=4).to(DT)
    theta = dict(model.named_parameters())
    x, y = _conv_tasks()
    phi = ik.implicit_adapt(model, theta, (x, y), lam=lam, inner=ik.SGDThenPullBack(4, 0.1), engine=engine)
    want = _reference_sgd_pull_back(model, theta, x, y, lam, 4, 0.1)
    for k in theta:
        torch.testing.assert_close(phi[k], want[k], rtol=1e-10, atol=1e-12)
    # Not proximal GD: the steps ignore λ, the pull-back alone sees it.
    gd = ik.implicit_adapt(model, theta, (x, y), lam=lam, inner=ik.GD(4, 0.1), engine=engine)
    assert max((gd[k] - phi[k]).abs().max().item() for k in theta) > 1e-4


def test_sgd_then_pull_back_engine_matches_generic_and_moves_further_than_gd():
    torch.manual_seed(1)
    model = OmniglotConv(3, channels=4).to(DT)
    theta = dict(model.named_parameters())
    x, y = _conv_tasks(seed=2)
    solver = ik.SGDThenPullBack(8, 0.1)
    a = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=solver, engine=True)
    b = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=solver, engine=False)
    g = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.GD(8, 0.1), engine=True)
    dist = lambda p: torch.sqrt(sum(((p[k] - theta[k]) ** 2).flatten(1).sum(1) for k in theta))  # noqa: E731
    for k in theta:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    assert (dist(a) > dist(g)).all()
    # Zero steps: the pull-back of φ = θ leaves θ.
    z = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.SGDThenPullBack(0, 0.1), engine=True)
    for k in theta:
        torch.testing.assert_close(z[k], theta[k].detach().expand_as(z[k]), rtol=0, atol=0)


# Its meta-gradient against a dense float64 solve of the damped system at its φ:
# tests/test_api.py::test_cg_damping_solves_the_authors_damped_system[sgd-then-pull-back].


def test_sgd_then_pull_back_arguments():
    with pytest.raises(ValueError, match="SGDThenPullBack"):
        ik.SGDThenPullBack(-1, 0.1)
    with pytest.raises(ValueError, match="SGDThenPullBack"):
        ik.SGDThenPullBack(3, 0.0)
    assert repr(ik.SGDThenPullBack(16, 0.1)) == "SGDThenPullBack(steps=16, lr=0.1)"


@pytest.mark.parametrize("engine", [True, False], ids=["engine", "generic"])
def test_plain_sgd_without_pull_back_is_the_released_evaluation(engine):
    torch.manual_seed(0)
    model = OmniglotConv(3, channels=4).to(DT)
    theta = dict(model.named_parameters())
    x, y = _conv_tasks(seed=3)
    with torch.no_grad():
        phi = ik.implicit_adapt(model, theta, (x, y), lam=2.0, inner=ik.SGDThenPullBack(3, 0.1, pull_back=False), engine=engine)
    want = _reference_sgd_pull_back(model, theta, x, y, 0.0, 3, 0.1)  # λ = 0: the pull-back is the identity
    for k in theta:
        torch.testing.assert_close(phi[k], want[k], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ trainer and evaluation


def test_released_init_bounds_and_the_released_presets():
    import math

    from imaml_kernels.trainer.builders import build_model, build_solver
    from imaml_kernels.trainer.presets import resolve_config

    cfg = resolve_config("omniglot-5w1s-released", {})
    assert (cfg["inner"], cfg["inner_steps"], cfg["inner_lr"], cfg["outer_lr"], cfg["meta_batch"], cfg["lam"]) == (
        "sgd-pullback", 16, 0.1, 1e-3, 32, 2.0)
    assert (cfg["cg_iters"], cfg["cg_damping"], cfg["lam_damping"], cfg["init"], cfg["steps"]) == (5, 1.0, 10.0, "released", 20000)
    assert resolve_config("omniglot-5w5s-released", {})["shot"] == 5
    solver = build_solver(cfg)
    assert isinstance(solver, ik.SGDThenPullBack) and (solver.steps, solver.lr, solver.pull_back) == (16, 0.1, True)
    torch.manual_seed(0)
    model = build_model(cfg)
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight
            fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
            bound = 1.73 * math.sqrt(6.0 / (fan_in + fan_out))
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound, name
            assert 0.0 <= m.bias.min() and m.bias.max() <= 0.05, name
        if isinstance(m, torch.nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    torch.manual_seed(0)
    default = build_model(resolve_config("omniglot-5w1s", {}))
    assert not torch.equal(default[0].weight, model[0].weight)  # torch's init is not the released one


def test_checkpoints_from_before_init_resume_as_torch_init():
    from imaml_kernels.trainer.checkpoint import checkpoint_config
    from imaml_kernels.trainer.presets import config_diff, resolve_config

    cfg = resolve_config("omniglot-5w1s", {})
    old = {k: v for k, v in cfg.items() if k != "init"}
    assert checkpoint_config({"config": old}, "ckpt.pt")["init"] == "torch"
    assert config_diff(old, cfg) == {}
    assert config_diff(old, resolve_config("omniglot-5w1s", {"init": "released"})) == {"init": ("torch", "released")}


def test_the_released_presets_use_the_learners_adam_eps():
    """The released ``Learner`` builds ``torch.optim.Adam(..., eps=1e-3)``: the released presets
    do too; the others keep PyTorch's 1e-8, and so do checkpoints written before the key."""
    from imaml_kernels.trainer.builders import build_optimizer
    from imaml_kernels.trainer.checkpoint import checkpoint_config
    from imaml_kernels.trainer.cli import _parser
    from imaml_kernels.trainer.presets import ConfigError, config_diff, resolve_config

    params = [torch.nn.Parameter(torch.zeros(3))]
    for preset, eps in (("omniglot-5w1s-released", 1e-3), ("omniglot-5w5s-released", 1e-3), ("omniglot-5w1s", 1e-8)):
        cfg = resolve_config(preset, {})
        assert cfg["adam_eps"] == eps and build_optimizer(cfg, params).defaults["eps"] == eps
    assert _parser().parse_args(["--adam-eps", "1e-3"]).adam_eps == 1e-3
    old = {k: v for k, v in resolve_config("omniglot-5w1s", {}).items() if k != "adam_eps"}
    assert checkpoint_config({"config": old}, "ckpt.pt")["adam_eps"] == 1e-8
    assert config_diff(old, resolve_config("omniglot-5w1s", {})) == {}
    with pytest.raises(ConfigError, match="adam_eps"):
        resolve_config("omniglot-5w1s", {"adam_eps": 0.0})


from test_failures_eval import HAVE_OMNIGLOT, synthetic_checkpoint  # noqa: E402


@pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found in $IMAML_DATA")
def test_eval_protocol_released_changes_only_the_inner_solver(tmp_path, capsys):
    import json

    from imaml_kernels.trainer.evaluate import main as eval_main

    path = synthetic_checkpoint(tmp_path / "run" / "ckpt.pt")
    common = ["--tasks", "6", "--batch", "3", "--threads", "1"]

    def run(name, *extra):
        out = tmp_path / f"{name}.json"
        assert eval_main([str(path), *common, "--json", str(out), *extra]) == 0
        return json.loads(out.read_text())

    base0 = run("gd0", "--inner-steps", "0")
    rel0 = run("rel0", "--protocol", "released", "--inner-steps", "0")
    rel = run("rel", "--protocol", "released")
    gd = run("gd")
    # Zero steps: no adaptation either way, the same tasks, the same accuracies.
    assert rel0["per_task"] == base0["per_task"]
    assert rel["protocol"] == "released" and "sgd (16 steps, lr 0.1" in rel["inner"] and gd["protocol"] == "run"
    assert rel["config"] == gd["config"]  # the run's configuration is reported as it is
    assert rel["per_task"] != gd["per_task"]  # 16 plain SGD steps adapt differently from 2 proximal GD steps
    assert "no proximal term" in capsys.readouterr().out
    assert eval_main([str(path), *common, "--protocol", "released", "--inner", "gd"]) == 2


def test_outer_lr_schedule():
    import math

    from imaml_kernels.trainer.presets import ConfigError, outer_lr_at, resolve_config

    cfg = resolve_config("omniglot-5w1s-demo", {"outer_schedule": "cosine", "warmup_steps": 10, "steps": 110, "outer_lr": 1e-2})
    assert outer_lr_at(cfg, 0) == pytest.approx(1e-3) and outer_lr_at(cfg, 9) == pytest.approx(1e-2)
    assert outer_lr_at(cfg, 10) == pytest.approx(1e-2) and outer_lr_at(cfg, 60) == pytest.approx(5e-3)
    assert outer_lr_at(cfg, 109) == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    const = resolve_config("omniglot-5w1s", {})
    assert all(outer_lr_at(const, s) == const["outer_lr"] for s in (0, 500, 29999))
    with pytest.raises(ConfigError, match="outer_schedule"):
        resolve_config("omniglot-5w1s", {"outer_schedule": "step"})
    with pytest.raises(ConfigError, match="warmup_steps"):
        resolve_config("omniglot-5w1s", {"warmup_steps": -1})


@pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found in $IMAML_DATA")
def test_trainer_runs_the_released_variant_with_a_schedule(tmp_path):
    from imaml_kernels.trainer.checkpoint import load_checkpoint
    from imaml_kernels.trainer.presets import outer_lr_at
    from imaml_kernels.trainer.cli import main as train_main

    out = tmp_path / "run"
    argv = ["--preset", "omniglot-5w1s-released", "--meta-batch", "2", "--inner-steps", "2", "--channels", "8",
            "--eval-tasks", "0", "--threads", "1", "--steps", "4", "--no-progress", "--out", str(out),
            "--outer-schedule", "cosine", "--warmup-steps", "2"]
    assert train_main(argv) == 0
    state = load_checkpoint(out / "ckpt.pt")
    cfg = state["config"]
    assert (cfg["inner"], cfg["init"], cfg["outer_schedule"], cfg["warmup_steps"]) == ("sgd-pullback", "released", "cosine", 2)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(outer_lr_at(cfg, 3))
