"""``python -m bench trajectory`` (issue 27): the authors' released training loop beside this
package's trainer step on the same task stream, from the same θ₀.

The released code (aravindr93/imaml_dev) is never part of this repository: the test that runs
it needs ``IMAML_DEV_DIR`` to point at an unpacked checkout and is skipped otherwise. The driver
is tested with a stand-in written here with the released learner's interface."""

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import trajectory as tj
from imaml_kernels.data import omniglot_root
from imaml_kernels.nets import OmniglotConv
from imaml_kernels.trainer.presets import resolve_config

HAVE_OMNIGLOT = (omniglot_root() / "characters.json").is_file()
needs_omniglot = pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found in $IMAML_DATA")
TINY = {"meta_batch": 2, "inner_steps": 2, "cg_iters": 2}


@pytest.fixture
def one_thread():
    """The long comparisons on one thread: two spinning OpenMP pools on a shared 2-core machine
    slow each other many times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Flatten(nn.Module):  # as the released learner_model names it
    def forward(self, x):
        return x.view(x.size(0), -1)


def _released_layout(way=5, **bn):
    """A network laid out and named as the released ``make_conv_network`` names its layers."""
    layers = OrderedDict()
    for i in range(1, 5):
        layers[f"conv{i}"] = nn.Conv2d(1 if i == 1 else 64, 64, 3, stride=2, padding=1)
        layers[f"BN{i}"] = nn.BatchNorm2d(64, track_running_stats=bn.get("track_running_stats", False))
        layers[f"relu{i}"] = nn.ReLU()
        if i == 2:
            layers["pad2"] = nn.ZeroPad2d((0, 1, 0, 1))
    layers["flatten"] = Flatten()
    layers["fc1"] = nn.Linear(256, way)
    return nn.Sequential(layers)


def test_layer_map_names_each_parameter_and_refuses_another_layout():
    names = tj.layer_map(OmniglotConv(5), _released_layout())
    assert names[:3] == [("0.weight", "conv1.weight"), ("0.bias", "conv1.bias"), ("1.weight", "BN1.weight")]
    assert names[-1] == ("14.bias", "fc1.bias") and len(names) == 18
    with pytest.raises(tj.LayoutMismatch, match="layer 1: .*BatchNorm2d"):
        tj.layer_map(OmniglotConv(5), _released_layout(track_running_stats=True))
    with pytest.raises(tj.LayoutMismatch, match="layer 14: .*Linear"):
        tj.layer_map(OmniglotConv(20), _released_layout(5))


def test_nudge_moves_every_entry_by_one_rounding():
    m = OmniglotConv(5, channels=4)
    before = tj.flat(m.parameters())
    after = tj.flat(tj.nudge(m).parameters())
    assert (after != before).all() and torch.equal(torch.nextafter(before, torch.where(after > before, 1e9, -1e9)), after)


@needs_omniglot
def test_the_bench_stream_is_the_trainers_sampler():
    from imaml_kernels.trainer.builders import build_samplers

    cfg = resolve_config("omniglot-5w1s-released", TINY)
    stream, (sampler, _) = tj.TaskStream(cfg), build_samplers(cfg, "cpu")
    prints = []
    for _ in range(3):
        (tasks, fp), ref = next(stream), sampler.sample(cfg["meta_batch"])
        assert all(torch.equal(a, b) for a, b in zip(tasks, ref))
        prints.append(fp)
    assert len(set(prints)) == 3


@needs_omniglot
def test_the_ours_row_is_the_trainer(tmp_path, one_thread):
    """Two steps of the bench's ``ours`` row end at the trainer's θ, bit for bit: same stream,
    θ₀, solver, solve, optimizer and step sizes."""
    from imaml_kernels.trainer.loop import train

    over = {**TINY, "channels": 8, "eval_tasks": 0, "outer_schedule": "cosine", "warmup_steps": 1}
    res = tj.trajectory("ours", "omniglot-5w1s-released", 2, overrides=over, snapshot=str(tmp_path / "s.pt"))
    train(resolve_config("omniglot-5w1s-released", {**over, "steps": 2}), tmp_path / "run", progress=False)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert ckpt["optimizer"]["param_groups"][0]["eps"] == 1e-3 == res["config"]["adam_eps"]
    assert torch.equal(torch.load(tmp_path / "s.pt")[2][0], tj.flat(ckpt["model"].values()))


# A stand-in for an imaml_dev checkout with the released learner's interface (the names the
# trajectory bench calls), logging each call; it is not the released code.
_FAKE_LEARNER = '''
import json
import os

import torch

from imaml_kernels.nets import OmniglotConv

_LOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "calls.jsonl")


def log(*call):
    with open(_LOG, "a") as f:
        f.write(json.dumps(call) + "\\n")


def make_conv_network(in_channels, out_dim, task="Omniglot"):
    return OmniglotConv(out_dim, in_channels=in_channels)


class Learner:
    def __init__(self, model, loss_function, inner_lr=1e-3, outer_lr=1e-2, GPU=False):
        self.model, self.loss_function = model, loss_function
        self.inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
        self.outer_opt = torch.optim.Adam(model.parameters(), lr=outer_lr, eps=1e-3)

    def get_params(self):
        return torch.cat([p.data.view(-1) for p in self.model.parameters()]).clone()

    def set_params(self, v):
        torch.nn.utils.vector_to_parameters(v, self.model.parameters())

    def set_outer_lr(self, lr):
        log("set_outer_lr", lr)

    def set_inner_lr(self, lr):
        log("set_inner_lr", lr)
        self.inner_opt.param_groups[0]["lr"] = lr

    def get_loss(self, x, y):
        return self.loss_function(self.model(x), y)

    def predict(self, x, return_numpy=False):
        return self.model(x).detach().numpy()

    def regularization_loss(self, w_0, lam=0.0):
        return 0.5 * lam * ((torch.nn.utils.parameters_to_vector(self.model.parameters()) - w_0) ** 2).sum()

    def learn_task(self, task, num_steps=10, add_regularization=False, w_0=None, lam=0.0):
        log("learn_task", num_steps, add_regularization)
        for _ in range(num_steps):
            self.inner_opt.zero_grad()
            loss = self.get_loss(task["x_train"], task["y_train"])
            (loss + self.regularization_loss(w_0, lam) if add_regularization else loss).backward()
            self.inner_opt.step()

    def matrix_evaluator(self, task, lam, regu_coef=1.0, lam_damping=10.0):
        log("matrix_evaluator", float(lam), regu_coef)
        return lambda v: (1.0 + regu_coef) * v

    def outer_step_with_grad(self, grad, flat_grad=False):
        log("outer_step", flat_grad)
        torch.nn.utils.vector_to_parameters(self.get_params() - 1e-3 * grad, self.model.parameters())
'''

_FAKE_UTILS = '''
import numpy as np


def cg_solve(f_Ax, b, cg_iters=10, x_init=None):
    from implicit_maml.learner_model import log
    log("cg_solve", cg_iters)
    return b / f_Ax(b.new_ones(b.shape))[0]


def measure_accuracy(task, model, train=False):
    x, y = (task["x_train"], task["y_train"]) if train else (task["x_val"], task["y_val"])
    return float(np.mean(model.predict(x).argmax(1) == y.numpy())) * 100.0
'''


def _stand_in(root: Path) -> Path:
    pkg = root / "implicit_maml"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "learner_model.py").write_text(_FAKE_LEARNER)
    (pkg / "utils.py").write_text(_FAKE_UTILS)
    return root


@needs_omniglot
@pytest.mark.parametrize("lanes", [1, 2])
def test_the_driver_runs_each_row_in_its_own_process_and_writes_the_report(tmp_path, capsys, lanes):
    from bench.__main__ import main

    if len(os.sched_getaffinity(0)) < lanes:
        pytest.skip(f"{lanes} lanes need {lanes} CPUs")
    root, out = _stand_in(tmp_path / "checkout"), tmp_path / "out"
    main(["trajectory", "--official", str(root), "--steps", "2", "--eval-every", "2", "--eval-tasks", "3", "--twin",
          "--lanes", str(lanes), "--set", *(f"{k}={v}" for k, v in TINY.items()), "--out", str(out)])
    calls = [tuple(json.loads(line)) for line in (root / "calls.jsonl").read_text().splitlines()]
    # training: 2 SGD steps then the pull-back, the damped evaluator (λ 2, c 1), 2 CG iterations, one outer step
    # a meta-step; evaluation (steps 0 and 2, 3 tasks each): 16 plain SGD steps at lr 0.1
    assert calls.count(("learn_task", 2, False)) == 2 * 2 and calls.count(("matrix_evaluator", 2.0, 1.0)) == 4
    assert calls.count(("cg_solve", 2)) == 4 and calls.count(("outer_step", True)) == 2
    assert calls.count(("learn_task", 16, False)) == 2 * 3 and ("set_inner_lr", 0.1) in calls
    assert ("set_outer_lr", 1e-3) in calls
    text = (out / "trajectory.md").read_text()
    for key in ("ours", "twin"):
        assert f"task stream of `{key}` against `official`: the same tasks" in text
    assert "`twin` against `ours`" in text and "`ours` against `official`" in text
    assert "## Meta-test accuracy" in text and "## Query accuracy and loss" in text
    header = (out / "trajectory.csv").read_text().splitlines()[0].split(",")
    assert {"official_acc", "ours_loss", "twin_acc", "ours_inner_loss", "official_eval_acc"} <= set(header)
    assert (out / "trajectory.png").stat().st_size > 0
    assert len((out / "steps_official.jsonl").read_text().splitlines()) == 2
    assert ("concurrent lanes" in text) == (lanes > 1)


def test_the_official_row_gets_a_lane_of_its_own():
    rows = tj.make_rows(preset="omniglot-5w1s-released", also="omniglot-5w1s", official="x", twin=True,
                        steps=1, eval_every=0, eval_tasks=0)
    keys = lambda plan: [[r.key for r in lane] for lane in plan]  # noqa: E731
    assert keys(tj.lanes_of(rows, 1)) == [["official", "ours", "twin", "also"]]
    assert keys(tj.lanes_of(rows, 2)) == [["official"], ["ours", "twin", "also"]]
    assert keys(tj.lanes_of(rows, 3)) == [["official"], ["ours", "also"], ["twin"]]
    assert keys(tj.lanes_of(rows[1:], 2)) == [["ours"], ["twin", "also"]]
    with pytest.raises(ValueError, match=r"2 lanes of \d+ thread\(s\) need"):
        tj.run(official="x", steps=1, eval_tasks=0, lanes=2, threads=len(os.sched_getaffinity(0)))


@needs_omniglot
@pytest.mark.parametrize("code", ["ours", "official"])
def test_a_run_in_parts_is_the_uninterrupted_run(tmp_path, one_thread, code):
    """Stopped after step 2 and resumed from its saved state, a row takes the same steps on the
    same tasks as one run of 4 (bit for bit), evaluates at step 2 once and says where it paused."""
    root = str(_stand_in(tmp_path / "checkout")) if code == "official" else None
    over = {**TINY, "channels": 8} if code == "ours" else TINY
    kw = dict(eval_every=2, eval_tasks=2, official=root, overrides=over)
    whole = tj.trajectory(code, "omniglot-5w1s-released", 4, snapshot=str(tmp_path / "whole.pt"), **kw)
    state, log = tmp_path / "state.pt", tmp_path / "steps.jsonl"
    first = tj.trajectory(code, "omniglot-5w1s-released", 4, state=str(state), stop_at=2, log=str(log), **kw)
    assert first["paused_at"] == 2 and len(first["records"]) == 2 and [e["step"] for e in first["evals"]] == [0, 2]
    rest = tj.trajectory(code, "omniglot-5w1s-released", 4, state=str(state), log=str(log),
                         snapshot=str(tmp_path / "rest.pt"), **kw)
    assert rest["paused_at"] is None and whole["paused_at"] is None
    drop = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert drop(rest["records"]) == drop(whole["records"])
    assert [(e["step"], e["acc"]) for e in rest["evals"]] == [(e["step"], e["acc"]) for e in whole["evals"]]
    assert torch.equal(torch.load(tmp_path / "rest.pt")[4][0], torch.load(tmp_path / "whole.pt")[4][0])
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="holds another run"):
        tj.trajectory(code, "omniglot-5w1s-released", 5, state=str(state), **kw)


def test_a_resumed_report_keeps_the_first_steps_agreement():
    earlier = {"ours-official": [[1, "1.0", "1.0", "0", "0", "0", "0"], [2, "x", "x", "x", "x", "x", "x"]]}
    merged = tj.agreements({}, {}, earlier)
    assert [r[0] for r in merged["ours-official"]] == [1, 2] and "twin-ours" not in merged


def test_the_rows_and_a_row_not_measured(tmp_path):
    from bench.official import OfficialUnavailable

    rows = tj.make_rows(preset="omniglot-5w1s-released", also="omniglot-5w1s", official=str(tmp_path), twin=True,
                        steps=1, eval_every=0, eval_tasks=0, overrides=TINY)
    assert [(r.key, r.kwargs["code"], r.kwargs["preset"], r.kwargs.get("twin", False)) for r in rows] == [
        ("official", "official", "omniglot-5w1s-released", False), ("ours", "ours", "omniglot-5w1s-released", False),
        ("twin", "ours", "omniglot-5w1s-released", True), ("also", "ours", "omniglot-5w1s", False)]
    assert all(r.kwargs["overrides"] == TINY for r in rows)
    with pytest.raises(OfficialUnavailable, match="implicit_maml/learner_model.py"):
        tj.trajectory("official", "omniglot-5w1s-released", 1, official=str(tmp_path))
    with pytest.raises(OfficialUnavailable, match="inner gd or sgd-pullback"):
        tj.trajectory("official", "omniglot-5w1s", 1, official=str(tmp_path), overrides={"inner": "hf"})
    results = {"official": {"error": "OfficialUnavailable: no checkout"}}
    text = tj.report(results, {}, rows[:1], "python -m bench trajectory", 1)
    assert "not measured: OfficialUnavailable: no checkout" in text


@needs_omniglot
def test_the_official_gd_variant_uses_the_learners_proximal_term(tmp_path, one_thread):
    root = _stand_in(tmp_path / "checkout")
    res = tj.trajectory("official", "omniglot-5w1s", 1, official=str(root), overrides=TINY)
    calls = [tuple(json.loads(line)) for line in (root / "calls.jsonl").read_text().splitlines()]
    assert calls.count(("learn_task", 2, True)) == 2 and res["records"][0]["tasks"]


OFFICIAL = os.environ.get("IMAML_DEV_DIR")
needs_official = pytest.mark.skipif(
    not (OFFICIAL and (Path(OFFICIAL) / "implicit_maml" / "learner_model.py").is_file()),
    reason="the authors' released code is not here: set IMAML_DEV_DIR to an unpacked aravindr93/imaml_dev "
           "checkout to compare the trajectories (nothing of it is in this repository)")


def _both(tmp_path, preset, steps, **kw):
    runs = {code: tj.trajectory(code, preset, steps, official=OFFICIAL, snapshot=str(tmp_path / f"{code}.pt"), **kw)
            for code in ("ours", "official")}
    return runs, {code: torch.load(tmp_path / f"{code}.pt") for code in runs}


@needs_omniglot
@needs_official
def test_three_steps_agree_with_the_released_code(tmp_path, one_thread):
    """Three meta-steps of the released loop and of the trainer step on the same 4 tasks a step,
    from the same θ₀, agree to 1e-5 in float32: θ (relative), the query losses, the first
    meta-gradient (1e-4); so do the released evaluations of θ₀ and θ₃ on 10 meta-test tasks.

    With 5 inner steps, not the preset's 16: at lr 0.1 a task's 16 SGD steps can amplify a
    1e-7 rounding difference in θ a thousandfold (bench/results/trajectory-30), so whether step 3
    stays within 1e-5 would depend on the thread count. The float64 test below runs the 16."""
    runs, snaps = _both(tmp_path, "omniglot-5w1s-released", 3, overrides={"meta_batch": 4, "inner_steps": 5},
                        eval_every=3, eval_tasks=10)
    a, b = snaps["ours"], snaps["official"]
    assert torch.equal(a[0][0], b[0][0])  # θ₀ copied into the released network
    for step in (1, 2, 3):
        assert (a[step][0] - b[step][0]).norm() <= 1e-5 * b[step][0].norm(), step
        ra, rb = runs["ours"]["records"][step - 1], runs["official"]["records"][step - 1]
        assert ra["tasks"] == rb["tasks"] and abs(ra["loss"] - rb["loss"]) <= 1e-5 and abs(ra["acc"] - rb["acc"]) < 1e-6
    assert (a[1][1] - b[1][1]).norm() <= 1e-4 * b[1][1].norm()
    for ea, eb in zip(runs["ours"]["evals"], runs["official"]["evals"]):
        assert ea["step"] == eb["step"] and abs(ea["acc"] - eb["acc"]) < 1e-6


@needs_omniglot
@needs_official
@pytest.mark.parametrize("preset, over, tol", [
    ("omniglot-5w1s-released", {}, 1e-7),  # the released cg_solve stops once ‖r‖² < 1e-10; ours runs its 5 iterations
    ("omniglot-5w1s", {"adam_eps": 1e-3}, 1e-10),  # the Learner's own proximal GD (learn_task(add_regularization=True))
], ids=["released", "paper-text-gd"])
def test_two_steps_agree_with_the_released_code_in_float64(tmp_path, one_thread, preset, over, tol):
    """The preset's own 16 inner steps, in float64: θ after two steps within ``tol`` (absolute)."""
    runs, snaps = _both(tmp_path, preset, 2, overrides={"meta_batch": 2, **over}, dtype="float64")
    for step in (1, 2):
        assert (snaps["ours"][step][0] - snaps["official"][step][0]).abs().max() <= tol, step
        assert abs(runs["ours"]["records"][step - 1]["loss"] - runs["official"]["records"][step - 1]["loss"]) <= tol
