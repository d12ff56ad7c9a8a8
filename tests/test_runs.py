"""A run is never lost: the run folder belongs to one run (refusal, --overwrite, the lock),
divergence stops the run and keeps the last good checkpoint, the metrics log survives crashes
(torn rows, pending statistics in the checkpoint, eval history), one-line errors before any
work, strict JSON. End-to-end on real Omniglot with the tiny configuration of test_train."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imaml_kernels.trainer import loop as loop_mod
from imaml_kernels.trainer.checkpoint import load_checkpoint
from imaml_kernels.trainer.runs import MetricsLog, RunError, RunFolder, read_metrics
from imaml_kernels.trainer.cli import main

from test_train import TINY, _one_line_error, needs_omniglot

pytestmark = needs_omniglot


def _run(out: Path, *extra: str) -> int:
    return main([*TINY, "--out", str(out), *extra])


def _strict_rows(out: Path) -> list[dict]:
    def no_constants(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return [json.loads(line, parse_constant=no_constants) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ the folder belongs to one run


def test_rerun_without_resume_is_refused_and_overwrite_replaces(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "2") == 0
    before = {n: (tmp_path / n).read_bytes() for n in ("ckpt.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert _run(tmp_path, "--steps", "1") == 2
    line = _one_line_error(capsys)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert {n: (tmp_path / n).read_bytes() for n in before} == before  # untouched
    assert _run(tmp_path, "--steps", "1", "--overwrite") == 0
    assert load_checkpoint(tmp_path)["step"] == 1 and [r["step"] for r in _strict_rows(tmp_path)] == [1]


def test_a_second_trainer_is_locked_out(tmp_path, capsys):
    with RunFolder(tmp_path):  # another trainer holds the folder
        assert _run(tmp_path, "--steps", "1") == 2
        assert "in use by another trainer (pid" in _one_line_error(capsys)
    assert _run(tmp_path, "--steps", "1") == 0  # released


def test_killed_trainer_releases_the_lock_and_its_temp_files_are_cleaned(tmp_path):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "imaml_kernels.trainer", *TINY, "--out", str(tmp_path), "--steps", "500", "--ckpt-every", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path.parent / "trainer.err", "wb"))
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (tmp_path / "ckpt.pt").exists(), (tmp_path.parent / "trainer.err").read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    stale = tmp_path / ".ckpt.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    step = load_checkpoint(tmp_path)["step"]
    assert _run(tmp_path, "--resume", "--steps", str(step + 1)) == 0  # the lock died with it
    assert not stale.exists()
    assert load_checkpoint(tmp_path)["step"] == step + 1


# ------------------------------------------------------------------ divergence


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    rc = _run(tmp_path, "--steps", "30", "--outer-lr", "1e30", "--log-every", "1", "--ckpt-every", "1")
    assert rc == 2
    line = _one_line_error(capsys)
    assert "the run diverged" in line and "step" in line and "the last good checkpoint is kept" in line
    if (tmp_path / "ckpt.pt").exists():
        state = load_checkpoint(tmp_path)  # refuses non-finite parameters: this one is finite
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    rows = _strict_rows(tmp_path)  # strict JSON: NaN is written as null
    assert any(r["loss"] is None for r in rows if r["kind"] == "train")


def test_non_finite_parameters_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    real = loop_mod.meta_step

    def poisoned(model, *a, **k):
        out = real(model, *a, **k)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(loop_mod, "meta_step", poisoned)
    assert _run(tmp_path, "--steps", "3", "--ckpt-every", "1") == 2
    assert "parameters are not finite after step 1" in _one_line_error(capsys)
    assert not (tmp_path / "ckpt.pt").exists()


# ------------------------------------------------------------------ the metrics log survives crashes


def test_torn_last_row_is_dropped_on_resume_with_one_warning(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "2") == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a crash mid-write
    capsys.readouterr()
    assert _run(tmp_path, "--resume", "--steps", "3") == 0
    err = capsys.readouterr().err
    assert err.count("dropped a torn last row") == 1 and "Traceback" not in err
    assert [r["step"] for r in _strict_rows(tmp_path) if r["kind"] == "train"] == [1, 2, 3]


def test_crash_after_a_checkpoint_between_log_rows_loses_no_step_and_keeps_the_cadence(tmp_path, monkeypatch):
    real = loop_mod.meta_step
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # a crash right after the checkpoint of step 4
        return real(*a, **k)

    monkeypatch.setattr(loop_mod, "meta_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "--steps", "10", "--ckpt-every", "4", "--log-every", "10")
    monkeypatch.setattr(loop_mod, "meta_step", real)
    assert not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path / "metrics.jsonl")
    assert load_checkpoint(tmp_path)["step"] == 4
    assert _run(tmp_path, "--resume", "--steps", "12", "--ckpt-every", "4", "--log-every", "10") == 0
    rows = [r for r in _strict_rows(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 13))  # every step once, steps 1-4 included
    times = [r["time"] for r in rows]
    assert len(set(times[:10])) == 1 and times[10] == times[11]  # rows at 10 and 12, not every step


def test_extending_a_finished_run_keeps_its_eval_history(tmp_path):
    assert _run(tmp_path, "--steps", "2", "--eval-tasks", "5") == 0
    first = json.loads((tmp_path / "eval.json").read_text())
    assert _run(tmp_path, "--resume", "--steps", "3", "--eval-tasks", "5") == 0
    evals = [r for r in _strict_rows(tmp_path) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3]
    assert json.loads((tmp_path / "eval_step2.json").read_text())["accuracy"] == first["accuracy"]
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 3


def test_metrics_log_writes_whole_strict_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLog(path) as log:
        log.write([{"step": 1, "loss": float("nan")}, {"step": 2, "loss": float("inf"), "x": [1.0, -math.inf]}])
    assert path.read_text().splitlines() == ['{"step": 1, "loss": null}', '{"step": 2, "loss": null, "x": [1.0, null]}']
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(RunError, match="row 2 is not valid JSON"):
        read_metrics(path)


# ------------------------------------------------------------------ one line and exit 2, before any work


@pytest.mark.parametrize("extra, expect", [
    (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
    (["--device", "foo"], "--device foo: not a torch device"),
    (["--threads", "-1"], "--threads must be >= 1, got -1"),
    (["--eval-batch", "0"], "--eval-batch must be >= 1, got 0"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be >= 1, got 0"),
    (["--lam", "inf"], "lam must be finite and > 0, got inf"),
    (["--outer-lr", "inf"], "outer_lr must be finite and > 0, got inf"),
    (["--resume", "--overwrite"], "give one"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, extra, expect):
    out = tmp_path / "run"
    if torch.cuda.is_available() and extra[:2] == ["--device", "cuda"]:
        pytest.skip("this machine has CUDA")
    assert main([*TINY, "--out", str(out), "--steps", "1", *extra]) == 2
    assert expect in _one_line_error(capsys)
    assert not out.exists()  # nothing was made


def test_bad_out_folders(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert _run(a_file, "--steps", "1") == 2
    assert "is a file, not a folder" in _one_line_error(capsys)
    assert _run(a_file / "sub", "--steps", "1") == 2
    assert f"{a_file} is not a folder" in _one_line_error(capsys)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == ro else real_access(p, m))
    assert _run(ro / "run", "--steps", "1") == 2
    assert "is not writable" in _one_line_error(capsys)


def test_failed_checkpoint_write_is_one_line(tmp_path, capsys, monkeypatch):
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop_mod, "save_checkpoint", disk_full)
    assert _run(tmp_path, "--steps", "1") == 2
    assert "cannot write the checkpoint" in _one_line_error(capsys) and not (tmp_path / "ckpt.pt").exists()


def test_zero_steps_and_resume_with_fewer_steps(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "0") == 0
    assert "nothing written" in capsys.readouterr().out
    assert _run(tmp_path, "--steps", "2") == 0
    capsys.readouterr()
    assert _run(tmp_path, "--resume", "--steps", "1") == 2
    assert "is at step 2, past --steps 1" in _one_line_error(capsys)
