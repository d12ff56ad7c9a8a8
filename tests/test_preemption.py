"""Preemption-safe training (issue 25): a stop signal checkpoints the step reached and the
resume recomputes none; the checkpoint history and the fallback from a damaged latest
checkpoint (``--resume``, ``imaml-eval``).

Real processes and real signals: the trainer runs as ``python -m imaml_kernels.trainer`` (one
process, or a launcher with ``--world-size 2``) on real Omniglot ($IMAML_DATA; skipped when
absent) with a tiny configuration, and gets its signal once it has logged a few steps
(``--log-every 1``: a row per step). The comparisons with an uninterrupted run are in-process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import imaml_kernels
from imaml_kernels.trainer.checkpoint import CheckpointError, checkpoint_history, find_checkpoint
from imaml_kernels.trainer.checkpoint import load_checkpoint, save_checkpoint
from imaml_kernels.trainer.cli import main
from imaml_kernels.trainer.evaluate import main as eval_main

from test_train import _one_line_error, _train_rows, assert_same_state, needs_omniglot

TINY = [
    "--preset", "omniglot-5w1s", "--meta-batch", "2", "--inner-steps", "2", "--channels", "8",
    "--threads", "1", "--no-progress", "--eval-tasks", "0", "--dist-timeout", "60",
]
_REPO = Path(imaml_kernels.__file__).resolve().parents[1]  # the checkout the tests import


def _run(out: Path, *extra: str) -> int:
    return main([*TINY, "--out", str(out), *extra])


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
    env.pop("MASTER_PORT", None)
    return env


def _preempt(out: Path, sig: int, *extra: str, launcher=(), rows: int = 3, timeout: float = 120.0) -> tuple[int, str]:
    """Start a long run in ``out`` (under ``launcher``, e.g. torchrun's arguments), send ``sig``
    to its process once it has logged ``rows`` steps; returns its exit status and stderr."""
    cmd = [sys.executable, "-m", *launcher, "imaml_kernels.trainer", *TINY, "--out", str(out), "--steps", "100000",
           "--log-every", "1", "--ckpt-every", "1000", *extra]
    err_path = out.parent / f"{out.name}.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    try:
        end, metrics = time.monotonic() + timeout, out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_bytes().count(b"\n") >= rows):
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < end, f"no {rows} rows within {timeout:g} s"
            time.sleep(0.05)
        proc.send_signal(sig)
        return proc.wait(timeout=timeout), err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _strip_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _assert_resume_recomputes_nothing(tmp_path: Path, run: Path, capsys, *extra: str) -> None:
    """``run`` was preempted: its checkpoint is the last step it logged; resumed for 2 more
    steps it runs exactly 2 and ends where an uninterrupted run of as many steps ends."""
    state = load_checkpoint(run)
    k = state["step"]
    rows = _train_rows(run)
    assert k >= 3 and [r["step"] for r in rows] == list(range(1, k + 1))
    capsys.readouterr()
    assert main(["--out", str(run), "--resume", "--steps", str(k + 2), "--threads", "1", "--no-progress", *extra]) == 0
    assert "trained 2 meta-steps" in capsys.readouterr().out  # no step recomputed
    straight = tmp_path / "straight"
    assert _run(straight, "--steps", str(k + 2), "--log-every", "1") == 0
    assert_same_state(load_checkpoint(straight), load_checkpoint(run))
    assert _strip_time(_train_rows(run)) == _strip_time(_train_rows(straight))


# ------------------------------------------------------------------ a stop signal


@needs_omniglot
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_stop_signal_checkpoints_the_step_reached_and_resume_recomputes_none(tmp_path, capsys, sig):
    run = tmp_path / "run"
    rc, err = _preempt(run, sig)
    assert rc == 75, err
    lines = [x for x in err.splitlines() if x.strip()]
    k = load_checkpoint(run)["step"]
    assert lines == [(f"imaml-train: preempted by {sig.name}: checkpoint of step {k} in {run}; "
                      "continue with --resume (exit status 75)")], err
    assert checkpoint_history(run / "ckpt.pt") == [run / "ckpt.pt"]  # --ckpt-every 1000: the stop's alone
    _assert_resume_recomputes_nothing(tmp_path, run, capsys)


@needs_omniglot
def test_stop_signal_to_the_launcher_of_two_ranks(tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = _preempt(run, signal.SIGTERM, "--world-size", "2")
    assert rc == 75, err
    k = load_checkpoint(run)["step"]
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines == [(f"imaml-train: preempted by SIGTERM: checkpoint of step {k} in {run}; "
                      "continue with --resume (exit status 75)")], err  # rank 0's line, nothing else
    assert load_checkpoint(run)["world_size"] == 2
    # Every step logged once; resumed on one process (a world-size change: test_distributed
    # compares its values with uninterrupted runs) it runs the 2 steps left, no more.
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, k + 1))
    capsys.readouterr()
    assert main(["--out", str(run), "--resume", "--steps", str(k + 2), "--threads", "1", "--no-progress"]) == 0
    assert "trained 2 meta-steps" in capsys.readouterr().out
    assert [r["step"] for r in _train_rows(run)] == list(range(1, k + 3))


@needs_omniglot
def test_stop_signal_to_torchrun(tmp_path):
    """torchrun relays SIGTERM to its ranks (and waits 30 s for them): they checkpoint the step
    reached and exit 75 (rank 0 says so); torchrun's own status (1) and traceback are torchrun's."""
    from torch.distributed.run import main as _  # noqa: F401  (torchrun is there)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    launcher = ("torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m")
    rc, err = _preempt(run, signal.SIGTERM, launcher=launcher)
    assert rc != 0, err
    k = load_checkpoint(run)["step"]
    assert err.count(f"imaml-train: preempted by SIGTERM: checkpoint of step {k} in {run}; ") == 1, err
    assert [r["step"] for r in _train_rows(run)] == list(range(1, k + 1))


_SECOND_SIGNAL = """
import os, signal, sys, time
from imaml_kernels.trainer.distributed import Preemption

stop = Preemption()
with stop.catching():
    os.kill(os.getpid(), signal.SIGTERM)
    while not stop.requested():
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)  # the same signal again at once: the same request
    time.sleep(0.1)
    print("first", stop.requested(), flush=True)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))  # a second signal: its default action, now
    time.sleep(30)
print("not reached", flush=True)
"""


@pytest.mark.parametrize("second", ["SIGUSR1", "SIGINT"])
def test_a_second_signal_exits_at_once(second):
    res = subprocess.run([sys.executable, "-c", _SECOND_SIGNAL, second], env=_env(), capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == -getattr(signal, second), res.stderr
    assert res.stdout.splitlines() == [f"first {int(signal.SIGTERM)}"]


def test_handlers_are_restored_after_the_run():
    from imaml_kernels.trainer.distributed import STOP_SIGNALS, Preemption

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    stop = Preemption()
    with stop.catching():
        assert all(signal.getsignal(sig) == stop._on_signal for sig in STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR1)
        end = time.monotonic() + 10
        while not stop.requested() and time.monotonic() < end:
            time.sleep(0.01)
    assert stop.requested() == signal.SIGUSR1
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


# ------------------------------------------------------------------ checkpoint history


def _state(step: int) -> dict:
    """A checkpoint that find_checkpoint accepts (no data needed: it checks no model shape)."""
    from imaml_kernels.trainer.presets import resolve_config

    return {"step": step, "config": resolve_config("omniglot-5w1s", {}), "model": {"w": torch.full((3,), float(step))}}


def _steps(latest: Path) -> list[int]:
    return [load_checkpoint(p, check_finite=False)["step"] for p in checkpoint_history(latest)]


def test_history_keeps_the_last_k_and_prunes_when_k_shrinks(tmp_path):
    latest = tmp_path / "ckpt.pt"
    for step in range(1, 6):
        save_checkpoint(latest, _state(step), keep=3)
    assert [p.name for p in checkpoint_history(latest)] == ["ckpt.pt", "ckpt.1.pt", "ckpt.2.pt"]
    assert _steps(latest) == [5, 4, 3]
    save_checkpoint(latest, _state(6), keep=2)
    assert _steps(latest) == [6, 5] and not (tmp_path / "ckpt.2.pt").exists()
    save_checkpoint(latest, _state(7), keep=1)
    assert _steps(latest) == [7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left


def test_history_without_hard_links(tmp_path, monkeypatch):
    def no_links(*a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    latest = tmp_path / "ckpt.pt"
    for step in range(1, 4):
        save_checkpoint(latest, _state(step), keep=2)
    assert _steps(latest) == [3, 2]


@pytest.mark.parametrize("fail_at", range(4))
def test_a_write_that_fails_midway_leaves_whole_checkpoints(tmp_path, monkeypatch, fail_at):
    """Each rename of a rotation fails in turn (as a crash there would stop it): every name
    left holds a whole checkpoint, the latest readable one is the old or the new one, and
    at most the oldest is lost."""
    latest = tmp_path / "ckpt.pt"
    for step in range(1, 4):
        save_checkpoint(latest, _state(step), keep=3)
    real, calls = os.replace, []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == fail_at + 1:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        save_checkpoint(latest, _state(4), keep=3)
    monkeypatch.undo()
    steps = _steps(latest)
    assert steps[0] in (3, 4) and set(steps) >= {2, 3} and steps == sorted(steps, reverse=True), steps
    assert find_checkpoint(tmp_path).state["step"] == steps[0]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ a damaged latest checkpoint


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


def _nan(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    next(iter(state["model"].values())).fill_(float("nan"))
    del state["version"]
    save_checkpoint(path, state)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """3 steps, a checkpoint at each (ckpt.pt: 3, ckpt.1.pt: 2), and an uninterrupted 4-step run."""
    from test_train import HAVE_OMNIGLOT

    if not HAVE_OMNIGLOT:
        pytest.skip("Omniglot not found in $IMAML_DATA")
    base = tmp_path_factory.mktemp("history")
    assert _run(base / "run", "--steps", "3", "--ckpt-every", "1", "--log-every", "1") == 0
    assert _run(base / "straight", "--steps", "4", "--log-every", "1") == 0
    return base


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.name != ".lock":
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


@needs_omniglot
@pytest.mark.parametrize("damage, why", [(_truncate, "cannot be read as a checkpoint"),
                                         (_random_bytes, "cannot be read as a checkpoint"),
                                         (_nan, "holds non-finite parameters")],
                         ids=["truncated", "random-bytes", "nan"])
def test_resume_falls_back_to_the_previous_checkpoint_with_one_warning(three_steps, tmp_path, capsys, damage, why):
    run = _copy_run(three_steps / "run", tmp_path / "run")
    assert _steps(run / "ckpt.pt") == [3, 2]
    damage(run / "ckpt.pt")
    capsys.readouterr()
    assert main(["--out", str(run), "--resume", "--steps", "4", "--threads", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    warnings = [x for x in captured.err.splitlines() if x.strip()]
    assert len(warnings) == 1 and "Traceback" not in captured.err, captured.err
    w = warnings[0]
    assert w.startswith(f"imaml-train: warning: {run / 'ckpt.pt'}: {why}"), w
    assert f"resuming from {run / 'ckpt.1.pt'} (step 2)" in w and "set aside as ckpt.pt.damaged" in w, w
    assert "trained 2 meta-steps" in captured.out  # from step 2
    assert (run / "ckpt.pt.damaged").is_file()
    assert_same_state(load_checkpoint(three_steps / "straight"), load_checkpoint(run))
    assert _strip_time(_train_rows(run)) == _strip_time(_train_rows(three_steps / "straight"))
    assert _steps(run / "ckpt.pt") == [4, 2]  # the damaged one is out of the history


@needs_omniglot
def test_eval_of_a_run_folder_takes_the_latest_good_checkpoint(three_steps, tmp_path, capsys):
    run = _copy_run(three_steps / "run", tmp_path / "run")
    _truncate(run / "ckpt.pt")
    capsys.readouterr()
    assert eval_main([str(run), "--tasks", "2", "--batch", "2", "--threads", "1", "--json", str(tmp_path / "e.json")]) == 0
    captured = capsys.readouterr()
    warnings = [x for x in captured.err.splitlines() if x.strip()]
    assert len(warnings) == 1 and warnings[0].startswith(f"imaml-eval: warning: {run / 'ckpt.pt'}: cannot be read"), captured.err
    assert f"evaluating {run / 'ckpt.1.pt'} (step 2)" in warnings[0]
    assert (run / "ckpt.pt").exists()  # imaml-eval changes nothing in the folder


def test_every_checkpoint_damaged_is_one_line(tmp_path, capsys):
    latest = tmp_path / "ckpt.pt"
    for step in (1, 2):
        save_checkpoint(latest, _state(step), keep=2)
    (tmp_path / "ckpt.pt").write_bytes(b"\x00garbage")
    (tmp_path / "ckpt.1.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*: ckpt\.pt: cannot be read.*; ckpt\.1\.pt: "):
        find_checkpoint(tmp_path)
    assert eval_main([str(tmp_path)]) == 2
    assert "no readable checkpoint in" in _one_line_error(capsys, "imaml-eval")
    assert main(["--out", str(tmp_path), "--resume"]) == 2
    assert "no readable checkpoint in" in _one_line_error(capsys)


def test_a_named_file_is_read_as_it_is(tmp_path):
    latest = tmp_path / "ckpt.pt"
    for step in (1, 2):
        save_checkpoint(latest, _state(step), keep=2)
    latest.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        find_checkpoint(latest)  # a file: no fallback
    assert find_checkpoint(tmp_path / "ckpt.1.pt").state["step"] == 1


def test_rerun_refuses_a_folder_holding_only_older_checkpoints(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt.1.pt", _state(1))
    assert main([*TINY, "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "already holds a run (ckpt.1.pt)" in _one_line_error(capsys)


def test_keep_ckpts_below_one_is_refused(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path / "run"), "--keep-ckpts", "0"]) == 2
    assert "--keep-ckpts must be >= 1, got 0" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()

