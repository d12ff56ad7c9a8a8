"""Each benchmark runs once at tiny sizes: it runs, produces rows and files (no timing asserts)."""

import pytest
import torch

from bench import cg, hvp, memory, meta_step
from bench.baselines import maml_meta_grad, serial_imaml_meta_grad
from bench.common import machine_header, markdown_table

from imaml_kernels.nets import OmniglotConv


def test_machine_header_names_versions():
    h = machine_header()
    assert "torch" in h and "CPU" in h


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
    assert set(res) == keys and len(rows) == len(keys) and all(v > 0 for v in res.values())
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
    from imaml_kernels.distributed import bench
    from imaml_kernels.train import main

    rates = bench(main, (1, 2), steps=2, extra=["--meta-batch", "2", "--channels", "4"])
    assert set(rates) == {1, 2} and all(r > 0 for r in rates.values())
