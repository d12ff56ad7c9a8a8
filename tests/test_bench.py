"""Each benchmark runs once at tiny sizes: it runs, produces rows and files (no timing asserts)."""

import json
import os

import pytest
import torch

from bench import cg, hvp, memory, meta_step
from bench.baselines import maml_meta_grad, serial_imaml_meta_grad
from bench.common import machine_header, markdown_table

from imaml_kernels.nets import OmniglotConv


def test_machine_header_names_versions():
    h = machine_header()
    assert "torch" in h and "CPU" in h


def test_wait_policy_env_sets_or_unsets_omp_wait_policy():
    from bench.common import wait_policy_env

    assert "OMP_WAIT_POLICY" not in wait_policy_env("default", {"OMP_WAIT_POLICY": "PASSIVE", "A": "1"})
    assert wait_policy_env("passive", {"A": "1"}) == {"A": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def test_bench_runs_under_the_openmp_default_unless_asked(tmp_path):
    """A shell's exported OMP_WAIT_POLICY=PASSIVE (scripts/demo.sh's) does not reach the timed
    processes unless ``--omp-wait-policy`` asks for it, and the header says which ran."""
    import subprocess
    import sys

    from bench.common import ROOT, child_env

    env = child_env(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    suite = ["cg", "--tasks", "1", "--params", "10", "--repeat", "1"]
    heads = []
    for flag in ([], ["--omp-wait-policy", "passive"]):
        out = subprocess.run([sys.executable, "-m", "bench", *flag, *suite], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        heads.append(out.stdout.splitlines()[0])
    assert "OMP_WAIT_POLICY unset" in heads[0], heads[0]
    assert "OMP_WAIT_POLICY=PASSIVE" in heads[1], heads[1]


def test_fresh_driver_runs_each_row_and_round_in_its_own_process(tmp_path):
    from bench import fresh

    log = tmp_path / "order.txt"
    rows = [fresh.Row(k, f"row {k}", "bench.fresh:probe", {"name": k, "log": str(log)}, warmup=1, repeat=2) for k in "abc"]
    measured = fresh.run_rows(rows, rounds=3, threads=1)
    entries = [line.split() for line in log.read_text().splitlines()]
    # round 0 as given, round 1 reversed, round 2 as given
    assert [name for name, _ in entries] == list("abc" "cba" "abc")
    pids = [int(pid) for _, pid in entries]
    assert len(set(pids)) == 9 and os.getpid() not in pids
    assert list(measured) == list("abc")
    for k, m in measured.items():
        assert m.ok and len(m.rounds) == 3 and m.info["name"] == k
        assert [r["pid"] for r in m.rounds] == [int(p) for n, p in entries if n == k]
        med, lo, hi = m.stat("seconds")
        assert 0 < lo <= med <= hi and m.stat("peak_mib")[0] >= 0
    r = fresh.ratio(measured["a"], measured["b"])
    per_round = [x["seconds"] / y["seconds"] for x, y in zip(measured["a"].rounds, measured["b"].rounds)]
    assert r[1] == min(per_round) and r[2] == max(per_round)
    assert fresh.order(rows, 1) == rows[::-1]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to pin a worker to one of them")
def test_a_fresh_worker_can_be_pinned_to_cpus():
    from bench import fresh

    cpu = sorted(os.sched_getaffinity(0))[-1]
    res = fresh.spawn(fresh.Row("p", "pinned", "bench.fresh:probe", {"name": "p"}), threads=1, cpus=[cpu])
    assert res["info"]["cpus"] == [cpu]
    free = fresh.spawn(fresh.Row("f", "free", "bench.fresh:probe", {"name": "f"}), threads=1)
    assert free["info"]["cpus"] == sorted(os.sched_getaffinity(0))


def test_fresh_driver_reports_failing_rows():
    from bench import fresh

    rows = [
        fresh.Row("ok", "fine", "bench.fresh:probe", {"name": "ok"}),
        fresh.Row("raises", "raises", "bench.fresh:probe", {"name": "x", "fail": "no checkout here"}),
        fresh.Row("dies", "dies", "bench.fresh:probe", {"name": "y", "exit_code": 3}),
        fresh.Row("missing", "missing", "bench.no_such_module:fn"),
    ]
    measured = fresh.run_rows(rows, rounds=2, threads=1)
    assert measured["ok"].ok and measured["ok"].seconds > 0
    assert measured["raises"].error == "RuntimeError: no checkout here"
    assert measured["dies"].error.startswith("worker exited with 3")
    assert measured["missing"].error.startswith("ModuleNotFoundError")
    assert not any(measured[k].ok for k in ("raises", "dies", "missing"))
    assert measured["raises"].seconds is None and fresh.ratio(measured["raises"], measured["ok"]) is None
    assert fresh.ratio_text(None, 2) == "n/a"


def test_cg_bench_rows():
    rows, results = cg.run(T=2, P=5000, repeat=2)
    names = [r[0] for r in rows]
    assert "cpu" in names and "reference" in names and "eager (plain, no masks)" in names
    assert all(v > 0 for v in results.values())
    assert "| backend" in markdown_table(("backend", "x"), [("a", 1)])
    rows, results = cg.run_solve(T=2, P=3000, repeat=1)
    assert [r[0] for r in rows] == ["cpu", "reference"] and all(v > 0 for v in results.values())


def test_meta_step_bench_rows():
    rows, res = meta_step.run(T=2, inner_steps=1, cg_iters=1, repeat=1)
    keys = {"engine", "batched", "serial"} | ({"torchopt"} if meta_step.torchopt_available() else set())
    extra = {"spread", "rounds", "peak", "failed"}
    assert set(res) == keys | extra and len(rows) == len(keys) and all(res[k] > 0 for k in keys)
    assert res["failed"] == {} and set(res["peak"]) == keys and all(res["peak"][k][0] >= 0 for k in keys)
    assert len(rows[0]) == len(meta_step.HEADER)
    assert "fused engine" in meta_step.summary(res)


def test_torchopt_baseline_matches_batched_op():
    """torchopt's implicit iMAML (an optional extra of the bench) computes the same
    meta-gradient; its normal-equation CG converges more slowly, hence the tolerance."""
    pytest.importorskip("torchopt", reason="torchopt is an optional extra (requirements-bench.txt)")
    from bench.torchopt_imaml import torchopt_meta_grad

    torch.manual_seed(0)
    model = OmniglotConv(3, channels=4).double()
    tasks = [t.double() if t.is_floating_point() else t for t in meta_step.make_tasks(2, 3, 1, 1)]
    kw = dict(lam=20.0, inner_steps=3, inner_lr=0.1, cg_iters=30)
    a = {k: v.clone() for k, v in torchopt_meta_grad(model, tasks, **kw).items()}
    b = meta_step.batched_meta_step(model, dict(model.named_parameters()), tasks, **kw)
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in sorted(d)])  # noqa: E731
    assert ((flat(a) - flat(b)).norm() / flat(b).norm()).item() < 1e-3


def test_memory_bench_writes_csv_and_png(tmp_path):
    rows, by = memory.run(T=1, steps=(1, 2), channels=4, out=tmp_path, progress=False)
    assert len(rows) == 2
    assert by[("maml", 2)] > by[("maml", 1)] > 0  # the unrolled graph grows with the steps
    assert (tmp_path / "memory.csv").read_text().startswith("inner_steps,imaml_peak_mib,maml_peak_mib,")
    assert (tmp_path / "memory.png").stat().st_size > 1000


def test_serial_baseline_matches_batched_op():
    # The baseline computes the same meta-gradient (the comparison is apples to apples).
    torch.manual_seed(0)
    model = OmniglotConv(3, channels=4).double()
    theta = dict(model.named_parameters())
    tasks = [t.double() if t.is_floating_point() else t for t in meta_step.make_tasks(2, 3, 1, 1)]
    kw = dict(lam=2.0, inner_steps=3, inner_lr=0.1, cg_iters=3)
    serial = serial_imaml_meta_grad(model, theta, tasks, cg_tol=0.0, **kw)
    batched = meta_step.batched_meta_step(model, theta, tasks, **kw)
    for k in theta:
        assert torch.allclose(serial[k], batched[k], rtol=1e-8, atol=1e-10), k
    m = maml_meta_grad(model, theta, tasks, inner_steps=2, inner_lr=0.1)
    assert set(m) == set(theta) and all(torch.isfinite(v).all() for v in m.values())


def test_hvp_bench_rows():
    rows, raw = hvp.run(["omniglot-5w1s"], repeat=1, T=2)
    r = raw["omniglot-5w1s"]
    assert len(rows) == 1 and len(rows[0]) == len(hvp.HEADER) and r["flops"] > 0
    assert r["engine"] > 0 and r["engine_cached"] > 0 and r["vmap"] > 0


def test_distributed_bench_rows():
    from imaml_kernels.trainer.distributed import bench
    from imaml_kernels.trainer.cli import main

    rates = bench(main, (1, 2), steps=2, extra=["--meta-batch", "2", "--channels", "4"])
    assert set(rates) == {1, 2} and all(r > 0 for r in rates.values())


# A stand-in for an imaml_dev checkout, written here with the released learner's interface
# (the names bench.official calls), so the driver is tested without the authors' code.
_FAKE_LEARNER = '''
import json
import os

import torch
from torch import nn
from torch.nn import functional as F

from imaml_kernels.nets import OmniglotConv

_LOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "calls.jsonl")


def make_conv_network(in_channels, out_dim, task="Omniglot"):
    return OmniglotConv(out_dim, in_channels=in_channels)


class _Calls(list):
    # Each call also goes to calls.jsonl beside the package: the learner runs in worker processes.
    def append(self, call):
        super().append(call)
        with open(_LOG, "a") as f:
            f.write(json.dumps([os.getpid(), *call]) + "\\n")


class Learner:
    calls = _Calls()

    def __init__(self, model, loss_function, inner_lr=1e-3, outer_lr=1e-2, GPU=False):
        self.model, self.loss_function = model, loss_function
        self.inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
        self.outer_opt = torch.optim.SGD(model.parameters(), lr=outer_lr)

    def get_params(self):
        return torch.cat([p.data.view(-1) for p in self.model.parameters()]).clone()

    def set_params(self, v):
        torch.nn.utils.vector_to_parameters(v, self.model.parameters())

    def get_loss(self, x, y):
        return self.loss_function(self.model(x), y)

    def learn_task(self, task, num_steps=10):
        Learner.calls.append(("learn_task", num_steps))
        for _ in range(num_steps):
            self.inner_opt.zero_grad()
            self.get_loss(task["x_train"], task["y_train"]).backward()
            self.inner_opt.step()

    def regularization_loss(self, w_0, lam=0.0):
        return 0.5 * lam * ((torch.nn.utils.parameters_to_vector(self.model.parameters()) - w_0) ** 2).sum()

    def matrix_evaluator(self, task, lam, regu_coef=1.0):
        Learner.calls.append(("matrix_evaluator", float(lam), regu_coef))
        return lambda v: (1.0 + regu_coef) * v

    def outer_step_with_grad(self, grad, flat_grad=False):
        Learner.calls.append(("outer_step", flat_grad))
'''

_FAKE_UTILS = '''
def cg_solve(f_Ax, b, cg_iters=10, x_init=None):
    from implicit_maml.learner_model import Learner
    Learner.calls.append(("cg_solve", cg_iters))
    return b / f_Ax(b.new_ones(b.shape))[0]
'''


def test_official_row_needs_a_checkout(tmp_path):
    from bench.official import OfficialUnavailable, load

    with pytest.raises(OfficialUnavailable, match="implicit_maml/learner_model.py"):
        load(tmp_path)
    _, res = meta_step.run(T=1, inner_steps=1, cg_iters=1, repeat=1, serial=False, generic=False, torchopt=False)
    assert "official" not in res and "--official DIR" in meta_step.summary(res)
    # A checkout that is not one: the worker fails, the row is reported, nothing raises.
    rows, res = meta_step.run(T=1, inner_steps=1, cg_iters=1, repeat=1, serial=False, generic=False, torchopt=False,
                              official=str(tmp_path))
    assert "official" not in res and "implicit_maml/learner_model.py" in res["failed"]["official"]
    row = next(r for r in rows if r[0].startswith("authors' released learner"))
    assert row[1].startswith("not measured: OfficialUnavailable")
    assert "learner (aravindr93/imaml_dev, per task): not measured: OfficialUnavailable" in meta_step.summary(res)
    assert res["engine"] > 0


def test_official_row_drives_the_learner(tmp_path):
    pkg = tmp_path / "implicit_maml"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "learner_model.py").write_text(_FAKE_LEARNER)
    (pkg / "utils.py").write_text(_FAKE_UTILS)
    rows, res = meta_step.run(T=2, inner_steps=3, cg_iters=4, repeat=1, serial=False, generic=False, torchopt=False,
                              official=str(tmp_path), rounds=2)
    logged = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    calls = [tuple(c[1:]) for c in logged]

    assert "official" in res and res["official"] > 0 and res["rounds"] == 2
    lo, hi = res["spread"]["official"]
    assert 0 < lo <= hi
    assert any(r[0].startswith("authors' released learner") for r in rows)
    # per task: 3 SGD steps, the damped evaluator (lam 2, c 1), 4 CG iterations; one outer step per meta-step
    assert ("learn_task", 3) in calls and ("matrix_evaluator", 2.0, 1.0) in calls
    assert ("cg_solve", 4) in calls and ("outer_step", True) in calls
    n_tasks = sum(1 for c in calls if c[0] == "learn_task")
    assert n_tasks == 2 * sum(1 for c in calls if c[0] == "outer_step")
    # one fresh worker per round, neither of them this process
    pids = {c[0] for c in logged}
    assert len(pids) == 2 and os.getpid() not in pids
    assert "target: >= 5x the authors' learner" in meta_step.summary(res)


def test_profile_bench_rows():
    from bench import profile

    kind_rows, stage_rows, facts = profile.run(T=2, inner_steps=1, cg_iters=1, repeat=1)
    kinds = [r[0] for r in kind_rows]
    assert kinds[0].startswith("GEMM") and "GFLOP/s" in kind_rows[0][3]
    assert "im2col" in kinds and "Python and dispatch" in kinds
    assert len(stage_rows) == 4 and facts["gemm_gflop"] > 0 and facts["floor"] > 0
    # the shape floor: every batched GEMM shape of the step timed alone, its calls counted
    assert facts["shape_floor"] > 0 and facts["shape_rows"]
    assert sum(r[1] for r in facts["shape_rows"]) >= 4 and all(r[0].split()[0] in ("bmm", "baddbmm", "baddbmm_") for r in facts["shape_rows"])
    assert "### By stage" in profile.report(kind_rows, stage_rows, facts, "## t")


# Toy sizes of bench models' networks; λ per model where I + H/λ is positive definite along every
# CG direction (a narrow ResNet with BatchNorm over 5 images is far from convex at its
# initialisation, and CG's breakdown guard would then stop where the plain loop goes on).
_MODEL_LAMS = {"resnet12": 1e3, "mlp": 2.0, "transformer": 2.0, "paper-cnn": 20.0}


@pytest.mark.parametrize("name", list(_MODEL_LAMS))
def test_models_bench_rows_agree_in_float64(name):
    from bench import models
    from bench.models_zoo import build, cases, make_tasks

    case = cases(tiny=True)[name]
    net = build(case, dtype=torch.float64)
    tasks = make_tasks(case, dtype=torch.float64)
    lam = _MODEL_LAMS[name]
    flat = lambda d: torch.cat([d[k].reshape(-1) for k, _ in net.named_parameters()])  # noqa: E731
    loop = flat(models.meta_grad_fn("loop", case, net, tasks, lam=lam)())
    assert torch.isfinite(loop).all() and loop.norm() > 0
    for row in ("default", "lean"):
        g, info = models.meta_grad_fn(row, case, net, tasks, lam=lam)()
        assert not info["cg"].breakdown.any() and (info["cg"].iterations == models.CG_ITERS).all()
        torch.testing.assert_close(flat(g), loop, rtol=1e-6, atol=1e-9 * loop.abs().max().item())


def test_models_bench_path_names_each_rounds_plan():
    from bench import models
    from bench.fresh import Measured, Row

    row = Row("default", "imaml_kernels, default plan", "bench.models:prepare")
    rounds = lambda *paths: [{"seconds": 1.0, "info": {"path": p, "cg_breakdowns": 0, "tasks": 4}} for p in paths]  # noqa: E731
    same = Measured(row, rounds("generic, chunk 4, revrev", "generic, chunk 4, revrev"))
    assert models.path_text(same) == "generic, chunk 4, revrev"
    # each worker probes its own plan: where they differ, the table says which round ran which
    mixed = Measured(row, rounds("generic, chunk 1, revrev", "generic, chunk 4, revrev", "generic, chunk 4, revrev"))
    assert models.path_text(mixed) == "generic, chunk 1, revrev (round 1); generic, chunk 4, revrev (rounds 2, 3)"


def test_models_bench_runs_end_to_end(tmp_path):
    from bench import models

    results = models.run(tiny=True, rounds=1, repeat=1)
    assert list(results) == ["resnet12", "mlp", "transformer", "paper-cnn"]
    keys = ["default", "lean", "loop"] + (["torchopt"] if meta_step.torchopt_available() else [])
    for name, measured in results.items():
        assert list(measured) == keys
        assert all(m.ok and m.seconds > 0 and m.stat("peak_mib")[0] >= 0 for m in measured.values()), name
        # the allocator's account of one call: every row allocates something, the loop included
        assert all(m.stat(models.ALLOC)[0] > 0 for m in measured.values()), name
        assert measured["lean"].row.label.endswith("(chunk=1)")
        assert measured["default"].info["path"].split(",")[0] in ("engine", "generic")
        assert measured["lean"].info["path"].split(",")[1] == " chunk 1"
    assert results["mlp"]["default"].info["path"].startswith("engine")
    assert results["resnet12"]["default"].info["path"].startswith("engine")  # residual blocks: the engine's
    assert results["transformer"]["default"].info["path"].startswith("generic")
    text = models.report(results, 1, "cpu", tiny=True)
    assert text.count("\n| ") == 1 + sum(len(m) for m in results.values())  # header + one line per row
    targets = [line for line in text.splitlines() if line.startswith("target ")]
    # 3 speed targets; per model 2 plans x (resident peak, tensor peak)
    assert len(targets) == 3 + 4 * 2 * 2 and all(("met" in t) for t in targets)
    assert sum("tensor peak over the loop's" in t for t in targets) == 8
    models.write(tmp_path, results, 1, "cpu")
    csv_lines = (tmp_path / "models.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,row,label,path,s_median") and len(csv_lines) == 1 + sum(len(m) for m in results.values())
    assert (tmp_path / "models.png").stat().st_size > 1000
