"""Tests of data-parallel training (imaml_kernels.trainer.distributed, imaml-train --world-size).

Two CPU ranks (gloo, spawned by ``--world-size 2`` on 127.0.0.1 and a free port) against one
process, on real Omniglot ($IMAML_DATA; skipped when absent) with a tiny configuration:
5-way 1-shot, meta-batch 4, 2 inner steps, 8 filters, one thread per rank. Each 2-rank run
costs a few seconds of process start (importing torch in each rank).
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import imaml_kernels
from imaml_kernels.trainer import distributed
from imaml_kernels.trainer.checkpoint import load_checkpoint
from imaml_kernels.data import omniglot_root
from imaml_kernels.trainer.distributed import DistContext, shard, spawn
from imaml_kernels.trainer.cli import main

HAVE_OMNIGLOT = (omniglot_root() / "characters.json").is_file()
needs_omniglot = pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found in $IMAML_DATA")

TINY = [
    "--preset", "omniglot-5w1s", "--meta-batch", "4", "--inner-steps", "2", "--channels", "8",
    "--threads", "1", "--no-progress", "--eval-tasks", "0", "--dist-timeout", "60",
]


def _run(out: Path, *extra: str) -> int:
    return main([*TINY, "--out", str(out), *extra])


def _rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _bias_before_batchnorm(model_state) -> set[str]:
    """Conv biases followed by a batch-statistics BatchNorm: they do not change the network's
    output, so their gradient is rounding noise and Adam (which divides by √v) turns noise of
    either sign into steps of ±lr. Their values depend on the summation order, not the tasks."""
    keys = list(model_state)
    return {k for i, k in enumerate(keys) if k.endswith(".bias") and model_state[k].dim() == 1
            and i > 0 and keys[i - 1].endswith(".weight") and model_state[keys[i - 1]].dim() == 4}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """4 meta-steps on 2 ranks, a checkpoint every 2 steps."""
    if not HAVE_OMNIGLOT:
        pytest.skip("Omniglot not found in $IMAML_DATA")
    out = tmp_path_factory.mktemp("dp2")
    assert _run(out, "--steps", "4", "--log-every", "3", "--ckpt-every", "2", "--world-size", "2") == 0
    return out


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """The same 4 meta-steps on one process."""
    if not HAVE_OMNIGLOT:
        pytest.skip("Omniglot not found in $IMAML_DATA")
    out = tmp_path_factory.mktemp("dp1")
    assert _run(out, "--steps", "4", "--log-every", "3", "--ckpt-every", "2") == 0
    return out


def _assert_same_run(one: dict, two: dict) -> None:
    """Two checkpoints of the same run on different numbers of ranks: the same step and task
    stream, θ equal to 1e-6 (the conv biases before BatchNorm aside: rounding noise, see
    :func:`_bias_before_batchnorm`) and the same network function to 1e-5."""
    assert two["step"] == one["step"]
    # The same task stream: every rank draws the whole meta-batch.
    assert two["sampler"]["tasks_drawn"] == one["sampler"]["tasks_drawn"]
    assert torch.equal(two["sampler"]["generator"], one["sampler"]["generator"])
    noise = _bias_before_batchnorm(one["model"])
    assert noise and len(noise) == 4  # the four conv blocks
    for k, v in one["model"].items():
        if k not in noise:
            torch.testing.assert_close(two["model"][k], v, rtol=0, atol=1e-6, msg=k)
    # The network these parameters define (bias before BN included) is the same function.
    from imaml_kernels.trainer.builders import build_model

    x = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    nets = []
    for ckpt in (one, two):
        net = build_model(ckpt["config"])
        net.load_state_dict(ckpt["model"])
        nets.append(net(x))
    torch.testing.assert_close(nets[1], nets[0], rtol=0, atol=1e-5)


@needs_omniglot
def test_two_ranks_match_one_process(two_rank_run, one_rank_run):
    one, two = load_checkpoint(one_rank_run / "ckpt.pt"), load_checkpoint(two_rank_run / "ckpt.pt")
    assert two["step"] == one["step"] == 4 and one["sampler"]["tasks_drawn"] == 16
    _assert_same_run(one, two)
    # Logged metrics are reduced over the ranks: the global means of the 1-process run.
    r1, r2 = _rows(one_rank_run), _rows(two_rank_run)
    assert [r["step"] for r in r2] == [1, 2, 3, 4]
    for a, b in zip(r1, r2):
        for k in ("loss", "acc", "inner_loss", "dropped"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), k


@needs_omniglot
def test_two_rank_resume_continues_identically(two_rank_run, tmp_path):
    assert _run(tmp_path, "--steps", "2", "--ckpt-every", "2", "--world-size", "2") == 0
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    assert main(["--out", str(tmp_path), "--resume", "--steps", "4", "--threads", "1", "--no-progress",
                 "--world-size", "2"]) == 0
    resumed, straight = load_checkpoint(tmp_path / "ckpt.pt"), load_checkpoint(two_rank_run / "ckpt.pt")
    assert resumed["step"] == 4
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=1e-6, msg=k)
    assert torch.equal(resumed["sampler"]["generator"], straight["sampler"]["generator"])
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]


# ------------------------------------------------------------------ resume on another world size
#
# The checkpoint's state does not depend on the number of ranks (every rank draws every task
# of the stream and holds the same θ and Adam state): the step-2 checkpoint (ckpt.1.pt) of
# one world size, resumed on the other, ends where both uninterrupted runs end.


@needs_omniglot
def test_resume_two_ranks_on_one_process(two_rank_run, one_rank_run, tmp_path):
    assert load_checkpoint(two_rank_run / "ckpt.1.pt")["step"] == 2
    assert main(["--resume", str(two_rank_run / "ckpt.1.pt"), "--out", str(tmp_path), "--steps", "4",
                 "--threads", "1", "--no-progress"]) == 0
    resumed = load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed["step"] == 4 and resumed["world_size"] == 1
    _assert_same_run(load_checkpoint(one_rank_run / "ckpt.pt"), resumed)
    _assert_same_run(load_checkpoint(two_rank_run / "ckpt.pt"), resumed)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]  # rows 1-2 were pending in the checkpoint


@needs_omniglot
def test_resume_one_process_on_two_ranks(two_rank_run, one_rank_run, tmp_path):
    assert main(["--resume", str(one_rank_run / "ckpt.1.pt"), "--out", str(tmp_path), "--steps", "4",
                 "--threads", "1", "--no-progress", "--world-size", "2", "--dist-timeout", "60"]) == 0
    resumed = load_checkpoint(tmp_path / "ckpt.pt")
    assert resumed["step"] == 4 and resumed["world_size"] == 2
    _assert_same_run(load_checkpoint(one_rank_run / "ckpt.pt"), resumed)
    _assert_same_run(load_checkpoint(two_rank_run / "ckpt.pt"), resumed)


@needs_omniglot
def test_resume_on_a_world_size_that_does_not_divide_the_meta_batch_is_refused(two_rank_run, capsys):
    before = (two_rank_run / "ckpt.pt").read_bytes()
    assert main(["--out", str(two_rank_run), "--resume", "--threads", "1", "--world-size", "3"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "meta-batch 4 is not divisible by the world size 3" in err[0], err
    assert (two_rank_run / "ckpt.pt").read_bytes() == before


@needs_omniglot
def test_a_task_stream_of_another_device_type_is_refused_in_one_line(one_rank_run, tmp_path, capsys):
    from imaml_kernels.trainer.checkpoint import save_checkpoint

    state = load_checkpoint(one_rank_run / "ckpt.1.pt")
    state["sampler"]["config"]["device_type"] = "cuda"  # a run of a GPU resumed on a CPU
    del state["version"]
    save_checkpoint(tmp_path / "gpu.pt", state)
    assert main(["--resume", str(tmp_path / "gpu.pt"), "--out", str(tmp_path / "run"), "--steps", "4",
                 "--threads", "1", "--no-progress"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "its task stream cannot be continued here" in err[0] and "device_type" in err[0], err


@needs_omniglot
def test_world_size_must_divide_meta_batch(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "1", "--world-size", "3") == 2
    err = capsys.readouterr().err
    assert "meta-batch 4 is not divisible by the world size 3" in err
    assert not (tmp_path / "ckpt.pt").exists()


def test_world_size_flag_validation(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path), "--world-size", "0"]) == 2
    assert "--world-size must be >= 1" in capsys.readouterr().err


def test_shard_splits_the_meta_batch_in_order():
    from imaml_kernels.data.sampler import TaskIndices

    idx = TaskIndices(torch.arange(12).view(6, 2), torch.arange(36).view(6, 2, 3), torch.zeros(6, 2, dtype=torch.long))
    parts = [shard(idx, r, 3) for r in range(3)]
    for field in range(3):
        assert torch.equal(torch.cat([p[field] for p in parts]), idx[field])
    assert parts[1].classes.shape == (2, 2)


def test_single_rank_context_is_a_no_op():
    ctx = DistContext()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    ctx.average_gradients([p])
    block = torch.rand(2, 5)
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and ctx.reduce_stats(block) is block
    ctx.barrier()
    ctx.close()


def _rank_entry(argv: list[str]) -> int:
    """A spawn entry point without the trainer: rank 1 exits with status ``argv[0]``."""
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["MASTER_ADDR"]
    return int(argv[0]) if os.environ["RANK"] == "1" else 0


def test_spawn_runs_the_given_entry_point():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    assert spawn(_rank_entry, ["0"], 2) == 0
    assert spawn(_rank_entry, ["3"], 2) == 3
    # spawn's SIGTERM/SIGUSR1/SIGINT handlers are there only while it waits for its ranks.
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ------------------------------------------------------------------ launcher and rank lifetimes
#
# Real processes and signals: a launcher script (run with subprocess) calls spawn(sleeper, ...,
# 2) with ``sleeper`` from a helper module in tmp_path; each rank writes its pid to
# tmp_path/rank<R>.pid and sleeps 120 s. No Omniglot, no process group. The ranks are the
# launcher's children, not the test's: once the launcher is gone they are reaped by init, or
# linger as zombies where init does not reap (a zombie counts as gone: it runs nothing).

_HELPER = """
import os
import time
from pathlib import Path


def sleeper(argv):
    folder, rank = Path(argv[0]), os.environ["RANK"]
    tmp = folder / f".rank{rank}.pid"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, folder / f"rank{rank}.pid")
    if len(argv) > 2 and rank == argv[1]:  # this rank fails with status argv[2] once both pids are known
        end = time.monotonic() + 60
        while len(list(folder.glob("rank*.pid"))) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        return int(argv[2])
    if len(argv) > 1 and argv[1] in ("preemptible", "stubborn"):
        # Once the launcher asks for a stop: "preemptible" returns 75 (a checkpoint written),
        # "stubborn" writes stop_seen<R> and goes on sleeping.
        from imaml_kernels.trainer.distributed import PREEMPTED, Preemption

        stop, end = Preemption(signals=()), time.monotonic() + 120
        while not stop.requested() and time.monotonic() < end:
            time.sleep(0.05)
        if argv[1] == "preemptible":
            return PREEMPTED
        (folder / f"stop_seen{rank}").write_text(str(stop.requested()))
    time.sleep(120)
    return 0
"""

_LAUNCHER = """
import os
import signal
import sys

if __name__ == "__main__":
    # As in a terminal whatever the test runner ignores, or as in a job started with `&` in a
    # script (SIGINT ignored, and so in the ranks: torch's own parent-death signal is SIGINT).
    ignore = os.environ.get("IMAML_TEST_IGNORE_SIGINT") == "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignore else signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from imaml_kernels.trainer.distributed import spawn
    from imaml_spawn_helper import sleeper

    sys.exit(spawn(sleeper, sys.argv[1:], 2, preempt_timeout=float(os.environ["IMAML_TEST_PREEMPT_TIMEOUT"])))
"""

_REPO = Path(imaml_kernels.__file__).resolve().parents[1]  # the checkout the tests import


def _child_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), str(_REPO), env.get("PYTHONPATH")]))
    env.pop("MASTER_PORT", None)
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid was reused by someone else's process
        return False
    try:  # a zombie (dead, not yet reaped by its new parent) runs nothing
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _still_alive(pids, timeout: float = 10.0) -> list[int]:
    """The pids still running after up to ``timeout`` s of polling."""
    end = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.05)


@pytest.fixture
def launch(tmp_path):
    """``launch(*argv) -> Popen`` of the launcher script (stderr in tmp_path/launcher.err); at
    teardown whatever is still running of it and its ranks is killed."""
    (tmp_path / "imaml_spawn_helper.py").write_text(_HELPER)
    (tmp_path / "launcher.py").write_text(_LAUNCHER)
    started = []

    def start(*argv: str, ignore_sigint: bool = False, preempt_timeout: float = 60.0) -> subprocess.Popen:
        env = _child_env(tmp_path)
        env["IMAML_TEST_IGNORE_SIGINT"] = "1" if ignore_sigint else "0"
        env["IMAML_TEST_PREEMPT_TIMEOUT"] = str(preempt_timeout)
        with open(tmp_path / "launcher.out", "wb") as out, open(tmp_path / "launcher.err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path), *argv],
                env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pidfile in tmp_path.glob("rank*.pid"):
        pid = int(pidfile.read_text())
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _rank_pids(tmp_path: Path, proc: subprocess.Popen, timeout: float = 45.0) -> list[int]:
    """Both ranks' pids, once both have started (each imports torch: a few seconds)."""
    files = [tmp_path / "rank0.pid", tmp_path / "rank1.pid"]
    end = time.monotonic() + timeout
    while not all(f.exists() for f in files):
        if proc.poll() is not None:
            pytest.fail(f"launcher exited with {proc.returncode} before its ranks started: "
                        f"{(tmp_path / 'launcher.err').read_text()}")
        if time.monotonic() > end:
            pytest.fail(f"the ranks did not start within {timeout:g} s")
        time.sleep(0.05)
    pids = [int(f.read_text()) for f in files]
    assert all(_alive(pid) for pid in pids) and proc.pid not in pids
    return pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ranks_that_do_not_stop_are_stopped_after_the_preempt_timeout(launch, tmp_path, sig):
    proc = launch(preempt_timeout=1.0)
    pids = _rank_pids(tmp_path, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 128 + sig  # 143, 138, 130
    assert _still_alive(pids) == []
    err = (tmp_path / "launcher.err").read_text()
    line = f"imaml-train: error: stopped by {sig.name}; the ranks did not exit within 1 s and were stopped\n"
    assert err.count(line) == 1, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_ranks_that_checkpoint_make_the_launcher_exit_preempted(launch, tmp_path):
    # SIGUSR1 (SLURM's --signal warning) here; SIGTERM with the trainer's ranks in test_preemption.
    proc = launch("preemptible")
    pids = _rank_pids(tmp_path, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 75
    assert _still_alive(pids) == []
    assert (tmp_path / "launcher.err").read_text() == ""


def test_a_second_signal_kills_the_ranks_at_once(launch, tmp_path):
    proc = launch("stubborn", preempt_timeout=300.0)  # the ranks ignore the stop: only the second signal ends them
    pids = _rank_pids(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + 30
    while not (tmp_path / "stop_seen0").exists():  # the launcher took SIGTERM as the first
        assert time.monotonic() < end and proc.poll() is None, (tmp_path / "launcher.err").read_text()
        time.sleep(0.05)
    assert (tmp_path / "stop_seen0").read_text() == str(int(signal.SIGTERM))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    assert _still_alive(pids) == []
    err = (tmp_path / "launcher.err").read_text()
    assert err.count("imaml-train: error: stopped by SIGINT, a second stop signal after SIGTERM: ranks killed\n") == 1, err


def test_sigkill_of_the_launcher_leaves_no_rank(launch, tmp_path):
    # With SIGINT ignored (a background job), torch's SIGINT parent-death signal alone left
    # both ranks running: this is the case that needs spawn's SIGTERM one (or the watchdog).
    proc = launch(ignore_sigint=True)
    pids = _rank_pids(tmp_path, proc)
    proc.kill()
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert _still_alive(pids) == []  # parent-death signal (SIGTERM), else the 1 s watchdog


def test_a_failed_rank_stops_the_others(launch, tmp_path):
    proc = launch("1", "3")  # rank 1 exits with status 3 while rank 0 sleeps
    pids = _rank_pids(tmp_path, proc)
    assert proc.wait(timeout=40) == 3
    assert _still_alive(pids) == []
    err = (tmp_path / "launcher.err").read_text()
    assert "imaml-train: error: rank 1 exited with status 3; the other ranks were stopped" in err, err


def test_rank_exits_at_once_when_the_launcher_is_already_gone(tmp_path):
    """The launcher's pid is passed to each rank: a rank whose parent is another process (the
    launcher died before the parent-death signal was set) exits with status 1 before ``entry``."""
    code = textwrap.dedent("""
        import os
        from imaml_kernels.trainer.distributed import _worker
        _worker(0, print, 1, "127.0.0.1", 1, ["entry ran"], os.getppid())
        _worker(0, print, 1, "127.0.0.1", 1, ["must not run"], os.getppid() + 1)
        print("not reached")
    """)
    res = subprocess.run([sys.executable, "-c", code], env=_child_env(tmp_path), capture_output=True,
                         text=True, timeout=50, check=False)
    assert res.returncode == 1, res.stderr
    assert res.stdout.splitlines() == ["['entry ran']"], res.stdout


def test_watchdog_exits_when_the_parent_dies(tmp_path):
    """The backstop without prctl: a process whose parent is SIGKILLed (no parent-death signal
    set) is ended by the watchdog thread once it sees its parent pid change."""
    pidfile = tmp_path / "orphan.pid"
    orphan = textwrap.dedent("""
        import os, sys, time
        from imaml_kernels.trainer.distributed import _watch_parent
        _watch_parent(os.getppid(), 0.2)
        open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(120)
    """)
    middle = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {orphan!r}, "
              f"{str(pidfile)!r}]); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", middle], env=_child_env(tmp_path))
    pid = None
    try:
        end = time.monotonic() + 45
        while not pidfile.exists():
            assert proc.poll() is None and time.monotonic() < end, "the orphan-to-be did not start"
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        assert _alive(pid)
        proc.kill()
        proc.wait(timeout=10)
        assert _still_alive([pid], timeout=5) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_distributed_does_not_import_the_trainer():
    tree = ast.parse(Path(distributed.__file__).read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.split(".")[-1] in ("train", "loop", "cli", "evaluate")}, imported
