"""Preemption-safe training (issue 25): a stop signal checkpoints the step reached and the
resume recomputes none.

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

import imaml_kernels
from imaml_kernels.trainer.checkpoint import load_checkpoint
from imaml_kernels.trainer.cli import main

from test_train import _train_rows, assert_same_state, needs_omniglot

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
