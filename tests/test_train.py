"""Tests of the trainer (imaml_kernels.trainer: the loop, imaml-train, the evaluation, the
presets and the checkpoints).

End-to-end runs go through the CLI functions in-process on real Omniglot ($IMAML_DATA; skipped
when absent) with a tiny configuration: 5-way 1-shot, meta-batch 2, 2 inner steps, the paper's
network with 16 filters, one thread. The meta-gradient itself is checked on a float64 MLP
against a dense solve of the damped system.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian

from imaml_kernels import GD, ProximalObjective
from imaml_kernels.data import omniglot_root
from imaml_kernels.nets import MLP
from imaml_kernels.step import STATS, meta_step
from imaml_kernels.trainer.builders import build_backward_solve
from imaml_kernels.trainer.checkpoint import load_checkpoint, save_checkpoint
from imaml_kernels.trainer.cli import main
from imaml_kernels.trainer.evaluate import main as eval_main
from imaml_kernels.trainer.evaluate import mean_ci95
from imaml_kernels.trainer.presets import PRESETS, ConfigError, config_diff, resolve_config

HAVE_OMNIGLOT = (omniglot_root() / "characters.json").is_file()
needs_omniglot = pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found in $IMAML_DATA")

TINY = [
    "--preset", "omniglot-5w1s", "--meta-batch", "2", "--inner-steps", "2", "--channels", "16",
    "--threads", "1", "--no-progress", "--eval-tasks", "0",
]


def _run(out: Path, *extra: str) -> int:
    return main([*TINY, "--out", str(out), *extra])


def _train_rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints bit for bit: step, θ, the Adam state, the task stream, the global RNG."""
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k in s:
            assert torch.equal(s[k], b["optimizer"]["state"][i][k]), (i, k)
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
    assert a["sampler"]["tasks_drawn"] == b["sampler"]["tasks_drawn"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """4 meta-steps of the tiny configuration with a 6-task evaluation at the end."""
    if not HAVE_OMNIGLOT:
        pytest.skip("Omniglot not found in $IMAML_DATA")
    out = tmp_path_factory.mktemp("run")
    assert _run(out, "--steps", "4", "--log-every", "3", "--ckpt-every", "2", "--eval-tasks", "6") == 0
    return out


# ------------------------------------------------------------------ end to end


@needs_omniglot
def test_train_writes_metrics_checkpoint_curves_and_eval(tiny_run):
    rows = _train_rows(tiny_run)
    # log_every=3 with 4 steps: one read-back of 3 rows, then the last row at the end.
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert set(STATS) <= set(r)
        assert all(torch.isfinite(torch.tensor(r[k])) for k in STATS)
        assert 0.0 <= r["acc"] <= 1.0
        assert r["dropped"] == 0  # the damped CG system never breaks down here
    evals = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert evals[-1]["kind"] == "eval" and evals[-1]["tasks"] == 6
    ckpt = load_checkpoint(tiny_run / "ckpt.pt")
    assert ckpt["step"] == 4
    assert {"model", "optimizer", "sampler", "torch_rng", "config"} <= set(ckpt)
    assert ckpt["config"]["meta_batch"] == 2 and ckpt["config"]["channels"] == 16
    assert ckpt["sampler"]["tasks_drawn"] == 8
    assert (tiny_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tiny_run / "eval.json").read_text())
    assert result["tasks"] == 6 and len(result["per_task"]) == 6
    assert not list(tiny_run.glob("*.tmp")) and not list(tiny_run.glob(".*.tmp"))


@needs_omniglot
def test_train_prints_progress_and_accuracy(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "1", "--eval-tasks", "3", "--inner", "hf", "--hf-steps", "1") == 0
    out = capsys.readouterr().out
    assert "inner=hf" in out
    assert re.search(r"meta-test accuracy: \d+\.\d\d% ± \d+\.\d\d% \(95% CI, 3 tasks", out)


@needs_omniglot
def test_resume_is_bit_for_bit(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(straight, "--steps", "5", "--log-every", "2") == 0
    # Stop at 3 (the checkpoint), then resume from the run folder to 5.
    assert _run(split, "--steps", "3", "--ckpt-every", "3") == 0
    assert main(["--out", str(split), "--resume", "--steps", "5", "--threads", "1", "--no-progress"]) == 0
    a, b = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(split / "ckpt.pt")
    assert a["step"] == b["step"] == 5
    assert_same_state(a, b)
    # The log holds each step once, with the same values (wall times aside).
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(_train_rows(straight)) == strip(_train_rows(split))


@needs_omniglot
def test_resume_drops_log_rows_after_the_checkpoint(tmp_path):
    assert _run(tmp_path, "--steps", "3", "--ckpt-every", "2", "--log-every", "1") == 0
    # The last checkpoint is step 3 (the end); fake a crash after step 2's checkpoint.
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 3
    ckpt2 = dict(ckpt, step=2)
    del ckpt2["version"]
    save_checkpoint(tmp_path / "ckpt.pt", ckpt2)
    rows_before = [r["step"] for r in _train_rows(tmp_path)]
    assert rows_before == [1, 2, 3]
    assert main(["--out", str(tmp_path), "--resume", "--steps", "2", "--threads", "1", "--no-progress"]) == 0
    assert [r["step"] for r in _train_rows(tmp_path)] == [1, 2]


# ------------------------------------------------------------------ evaluation


@needs_omniglot
def test_eval_cli_prints_mean_and_ci(tiny_run, tmp_path, capsys):
    out_json = tmp_path / "e.json"
    assert eval_main([str(tiny_run / "ckpt.pt"), "--tasks", "6", "--batch", "4", "--threads", "1",
                      "--json", str(out_json)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    m = re.match(r"meta-test accuracy: (\d+\.\d\d)% ± (\d+\.\d\d)% \(95% CI, 6 tasks of 5-way 1-shot", line)
    assert m, line
    r = json.loads(out_json.read_text())
    assert r["step"] == 4 and r["tasks"] == 6
    # Same tasks whatever the batch: the run's own 6-task evaluation (batch 50) agrees.
    assert r["per_task"] == json.loads((tiny_run / "eval.json").read_text())["per_task"]
    mean, ci = mean_ci95(torch.tensor(r["per_task"]))
    assert float(m.group(1)) == pytest.approx(100 * mean, abs=0.006)
    assert float(m.group(2)) == pytest.approx(100 * ci, abs=0.006)


def test_mean_ci95():
    v = torch.tensor([0.2, 0.4, 0.6, 0.8])
    mean, ci = mean_ci95(v)
    assert mean == pytest.approx(0.5)
    assert ci == pytest.approx(1.96 * v.double().std().item() / 2)
    assert mean_ci95(torch.tensor([0.7])) == (pytest.approx(0.7), 0.0)


# ------------------------------------------------------------------ errors: one line, exit 2


def _one_line_error(capsys, prog="imaml-train") -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_data(tmp_path, capsys):
    assert _run(tmp_path / "out", "--data-root", str(tmp_path / "nowhere"), "--steps", "1") == 2
    msg = _one_line_error(capsys)
    assert "not found" in msg and "imaml-data omniglot" in msg


def test_corrupt_data(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    for name in ("images_background_28.npz", "images_evaluation_28.npz"):
        (root / name).write_bytes(b"not a zip file")
    (root / "characters.json").write_text("{}")
    assert _run(tmp_path / "out", "--data-root", str(root), "--steps", "1") == 2
    assert str(root) in _one_line_error(capsys)


def test_k_too_large(tmp_path, capsys):
    assert _run(tmp_path, "--shot", "10", "--query", "11") == 2
    msg = _one_line_error(capsys)
    assert "K too large" in msg and "20 drawings" in msg


def test_unknown_preset_lists_the_valid_ones(tmp_path, capsys):
    assert main(["--preset", "omniglot-7w3s", "--out", str(tmp_path)]) == 2
    msg = _one_line_error(capsys)
    assert "omniglot-7w3s" in msg and all(name in msg for name in PRESETS)


@needs_omniglot
def test_resume_from_another_configuration_names_the_keys(tiny_run, capsys):
    before = (tiny_run / "ckpt.pt").read_bytes()
    rc = main(["--out", str(tiny_run), "--resume", "--inner-lr", "0.2", "--lam", "1.0", "--no-progress"])
    assert rc == 2
    msg = _one_line_error(capsys)
    assert "inner_lr" in msg and "lam" in msg and "meta_batch" not in msg
    assert (tiny_run / "ckpt.pt").read_bytes() == before


def test_resume_without_checkpoint_and_corrupt_checkpoint(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint" in _one_line_error(capsys)
    (tmp_path / "ckpt.pt").write_bytes(b"\x00garbage")
    assert eval_main([str(tmp_path)]) == 2
    assert "cannot be read" in _one_line_error(capsys, "imaml-eval")


def test_presets_and_overrides():
    cfg = resolve_config("omniglot-20w5s", {"meta_batch": 4, "shot": None})
    assert (cfg["way"], cfg["shot"], cfg["query"], cfg["meta_batch"], cfg["inner_steps"]) == (20, 5, 5, 4, 25)
    paper = resolve_config("omniglot-5w1s")
    assert (paper["lam"], paper["inner_lr"], paper["inner_steps"], paper["cg_iters"], paper["outer_lr"]) == (
        2.0, 0.05, 16, 5, 1e-3,  # inner lr 0.05: proximal GD's stability limit (presets.py, issue 27)
    )
    assert resolve_config("omniglot-5w5s")["inner_lr"] == 0.05 and resolve_config("omniglot-20w1s")["inner_lr"] == 0.1
    assert paper["meta_batch"] == 32 and resolve_config("omniglot-20w1s")["meta_batch"] == 16
    assert config_diff(paper, dict(paper, steps=9, eval_tasks=0)) == {}
    assert set(config_diff(paper, dict(paper, lam=1.0))) == {"lam"}
    with pytest.raises(ConfigError, match="lam must be finite and > 0"):
        resolve_config("omniglot-5w1s", {"lam": 0.0})


# ------------------------------------------------------------------ the meta-step itself


def _mlp_problem(T=3, seed=0):
    torch.manual_seed(seed)
    model = MLP([4, 6, 3]).double()
    xs, ys = torch.randn(T, 6, 4, dtype=torch.float64), torch.randint(0, 3, (T, 6))
    xq, yq = torch.randn(T, 5, 4, dtype=torch.float64), torch.randint(0, 3, (T, 5))
    return model, (xs, ys, xq, yq)


@pytest.mark.parametrize("c,d", [(0.0, 0.0), (1.0, 10.0)], ids=["textbook", "paper-damped"])
def test_meta_grad_is_the_mean_damped_implicit_gradient(c, d):
    model, (xs, ys, xq, yq) = _mlp_problem()
    T = xs.shape[0]
    cfg = {"lam": 2.0, "cg_iters": 60, "cg_damping": c, "lam_damping": d}
    theta = dict(model.named_parameters())
    theta0 = {k: v.detach().clone() for k, v in theta.items()}
    solver = GD(10, 0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps θ so its .grad can be compared
    stats = meta_step(model, theta, opt, (xs, ys, xq, yq), lam=cfg["lam"], inner=solver, solve=build_backward_solve(cfg))
    assert stats.shape == (len(STATS),) and stats[STATS.index("dropped")] == 0

    def f(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    # φ_t from the inner problem with the inner λ (not the backward's), then a dense solve
    # of ((1+c) I + H_t/(λ+d)) x_t = g_t per task.
    obj = ProximalObjective(f, theta0, torch.full((T,), 2.0, dtype=torch.float64), (xs, ys))
    phi = solver(obj, {k: v.expand(T, *v.shape).clone() for k, v in theta0.items()})
    names = list(theta0)
    expected = torch.zeros(sum(v.numel() for v in theta0.values()), dtype=torch.float64)
    for t in range(T):
        p_t = {k: phi[k][t] for k in names}

        def flat_loss(v, x=xs[t], y=ys[t]):
            params, i = {}, 0
            for k in names:
                n = theta0[k].numel()
                params[k] = v[i:i + n].view_as(theta0[k])
                i += n
            return f(params, x, y)

        v0 = torch.cat([p_t[k].reshape(-1) for k in names])
        H = hessian(flat_loss)(v0)
        gq = grad(f)(p_t, xq[t], yq[t])
        g = torch.cat([gq[k].reshape(-1) for k in names])
        A = (1 + c) * torch.eye(len(g), dtype=torch.float64) + H / (2.0 + d)
        expected += torch.linalg.solve(A, g) / T
    got = torch.cat([theta[k].grad.reshape(-1) for k in names])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    assert (build_backward_solve(cfg).damping, build_backward_solve(cfg).lam_damping) == (c, d)


def test_meta_step_reads_nothing_back(monkeypatch):
    """No .item() / bool() / .tolist() on a tensor inside a meta-step (no host sync)."""
    model, batch = _mlp_problem()
    # SGD, not Adam: Adam reads its step count with .item(), but that count is a host
    # tensor even for CUDA parameters, so it is no device sync; on the CPU it cannot be told apart.
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    cfg = {"lam": 2.0, "cg_iters": 5, "cg_damping": 1.0, "lam_damping": 10.0}

    def boom(*a, **k):
        raise AssertionError("host read-back inside the meta-step")

    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    stats = meta_step(model, dict(model.named_parameters()), opt, batch, lam=cfg["lam"], inner=GD(3, 0.1), solve=build_backward_solve(cfg))
    monkeypatch.undo()
    assert torch.isfinite(stats).all()


@needs_omniglot
@pytest.mark.parametrize("mode", ["scalar", "per-layer"])
def test_learned_lam_moves_is_logged_checkpointed_and_resumes_bit_for_bit(tmp_path, mode):
    """``--learn-lam``: log λ takes Adam steps of its own (lr --lam-lr) within the bounds, the
    metrics rows carry λ (per layer), the checkpoint holds it, and a resumed run equals an
    uninterrupted one bit for bit, λ and its Adam state included."""
    extra = ("--learn-lam", mode, "--lam-lr", "0.05", "--lam-min", "1.5", "--lam-max", "3", "--log-every", "1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(straight, "--steps", "4", *extra) == 0
    assert _run(split, "--steps", "2", "--ckpt-every", "2", *extra) == 0
    assert main(["--out", str(split), "--resume", "--steps", "4", "--threads", "1", "--no-progress", "--log-every", "1"]) == 0
    a, b = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(split / "ckpt.pt")
    assert_same_state(a, b)
    assert a["lam"] == b["lam"] and a["config"]["learn_lam"] == mode
    groups = [""] if mode == "scalar" else [n.rpartition(".")[0] for n in a["model"] if n.endswith(".weight")]
    assert sorted(a["lam"]) == sorted(groups)
    lam = {g: torch.tensor(v).exp().item() for g, v in a["lam"].items()}
    assert all(1.5 - 1e-6 <= v <= 3 + 1e-6 for v in lam.values()) and any(abs(v - 2.0) > 1e-4 for v in lam.values())
    rows = _train_rows(straight)
    keys = ["lam"] if mode == "scalar" else [f"lam/{g}" for g in groups]
    assert all(set(keys) <= set(r) for r in rows)
    assert rows[-1][keys[0]] == pytest.approx(lam[groups[0]], rel=1e-6)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(rows) == strip(_train_rows(split))
    # A checkpoint of a fixed-λ run does not resume as a learned-λ one.
    assert main(["--out", str(split), "--resume", "--steps", "5", "--threads", "1", "--no-progress", "--learn-lam", "none"]) == 2


@needs_omniglot
@pytest.mark.parametrize("mode", ["scalar", "per-layer"])
def test_a_run_that_learned_lam_is_evaluated_at_the_lam_it_learned(tmp_path, monkeypatch, mode):
    """The final evaluation of a ``--learn-lam`` run, and ``imaml-eval`` of its checkpoint,
    adapt with the learned λ (the checkpoint's exp(ρ), per layer), not the starting ``--lam``."""
    import imaml_kernels.trainer.evaluate as evaluate_mod

    seen = []
    real = evaluate_mod.implicit_adapt

    def spy(*args, lam, **kw):
        seen.append(lam)
        return real(*args, lam=lam, **kw)

    monkeypatch.setattr(evaluate_mod, "implicit_adapt", spy)
    out = tmp_path / "run"
    assert _run(out, "--steps", "3", "--learn-lam", mode, "--lam-lr", "0.2", "--eval-tasks", "4") == 0
    learned = {g: torch.tensor(v).exp() for g, v in load_checkpoint(out / "ckpt.pt")["lam"].items()}
    assert any(abs(v.item() - 2.0) > 1e-3 for v in learned.values())  # λ moved away from --lam

    def check(lam):
        if mode == "scalar":
            assert torch.is_tensor(lam) and not lam.requires_grad
            torch.testing.assert_close(lam.float(), learned[""].float(), rtol=1e-6, atol=0)
        else:
            assert set(lam) == set(learned)
            for g, v in lam.items():
                assert not v.requires_grad
                torch.testing.assert_close(v.float(), learned[g].float(), rtol=1e-6, atol=0)

    assert seen, "the run evaluated nothing"
    for lam in seen:
        check(lam)
    seen.clear()
    assert eval_main([str(out), "--tasks", "4", "--threads", "1", "--json", str(tmp_path / "e.json")]) == 0
    assert seen
    for lam in seen:
        check(lam)
