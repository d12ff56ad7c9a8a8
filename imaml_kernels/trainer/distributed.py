"""Data-parallel meta-training: the T tasks of a meta-batch split across processes.

Every rank draws the whole meta-batch's indices from the same sampler stream (a few
cheap random calls) and builds only its contiguous slice of ``T / world_size`` tasks, so
an N-rank run sees exactly the tasks of a 1-rank run with the same seed. Each rank runs
the inner solves and implicit gradients of its slice; the meta-gradients (each the mean
over the rank's tasks) are averaged with one ``all_reduce`` into the 1-process mean over
all T tasks, and the Adam step is then the same on every rank. Rank 0 alone writes logs,
checkpoints and plots.

Launch::

    $ torchrun --nproc_per_node 4 -m imaml_kernels.trainer --device cuda ...   # nccl, one GPU per rank
    $ imaml-train --world-size 2 --threads 1 ...                           # spawns 2 CPU ranks (gloo)
    $ python -m bench distributed                                           # meta-steps/s, 1 vs 2 ranks

Stop signals (SIGTERM, SIGUSR1, SIGINT; see "stop requests" below): each rank records them
(:class:`Preemption`), the ranks agree on the step to stop after (:meth:`DistContext.agree`,
once per meta-step), the trainer checkpoints it and exits :data:`PREEMPTED` (75); the launcher
of :func:`spawn` passes a stop on to its ranks through shared memory and waits for them.

This module knows nothing of the training loop or the command line: :func:`spawn` and
:func:`bench` take the entry point (``imaml_kernels.trainer.cli.main``) as an argument.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["PREEMPTED", "STOP_SIGNALS", "DistContext", "DistributedError", "Latch", "Preemption", "attach_launcher",
           "bench", "catch_signals", "env_world_size", "init", "restore_signals", "shard", "spawn"]

# An entry point: ``entry(argv) -> exit status``, e.g. imaml_kernels.trainer.cli.main.
Entry = Callable[[list[str]], int]


class DistributedError(RuntimeError):
    """A collective or the rendezvous failed: a peer rank died or did not answer in time."""


def env_world_size() -> int | None:
    """``WORLD_SIZE`` as set by torchrun (or :func:`spawn`), else None."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


@dataclass
class DistContext:
    """One rank of a process group (``world_size == 1``: no group, every call is a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout: float = 300.0
    # A gloo group for the host-side collectives when the default group is nccl (None: the
    # default group, which is gloo): agreeing on a stop reads no device tensor.
    cpu_group: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _run(self, what: str, fn):
        try:
            return fn()
        except Exception as exc:  # gloo / nccl raise RuntimeError or DistError subclasses
            msg = " ".join(str(exc).split())[:300]
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed; a peer rank exited or did not "
                f"answer within --dist-timeout {self.timeout:g} s ({type(exc).__name__}: {msg})"
            ) from exc

    def average_gradients(self, params) -> None:
        """θ.grad <- the mean of θ.grad over ranks (one all_reduce of a flat buffer)."""
        if not self.active:
            return
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._run("all_reduce of the meta-gradient", lambda: dist.all_reduce(flat))
        flat.div_(self.world_size)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = flat[offset : offset + n].view_as(p).clone()
            else:
                p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def reduce_stats(self, block: torch.Tensor, summed: Sequence[int] = ()) -> torch.Tensor:
        """``[steps, S]`` per-rank statistics -> the global values: the mean over ranks (each
        rank's value is a mean over the same number of tasks), the sum for columns ``summed``."""
        if not self.active:
            return block
        block = block.clone()
        self._run("all_reduce of the metrics", lambda: dist.all_reduce(block))
        scale = torch.full((block.shape[1],), 1.0 / self.world_size, dtype=block.dtype, device=block.device)
        scale[list(summed)] = 1.0
        return block * scale

    def agree(self, value: int) -> int:
        """The largest of every rank's ``value`` (a stop signal's number, 0 for none): one
        all_reduce of a 1-element CPU tensor, over gloo, so no device synchronisation; every
        rank gets the same answer."""
        if not self.active:
            return value
        flag = torch.tensor([int(value)], dtype=torch.int64)
        self._run("all_reduce of the stop flag",
                  lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group))
        return int(flag[0])

    def barrier(self) -> None:
        if self.active:
            self._run("barrier", dist.barrier)

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def init(device: str, timeout: float = 300.0) -> DistContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): nccl for CUDA, gloo otherwise.

    Example:
        >>> ctx = init("cpu", timeout=60)   # under torchrun --nproc_per_node 2
        >>> ctx.rank, ctx.world_size
        (0, 2)
    """
    world = env_world_size() or 1
    ctx = DistContext(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)), float(timeout))
    if not ctx.active:
        return ctx
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    ctx._run(
        f"init_process_group({backend}) at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
        lambda: dist.init_process_group(
            backend, rank=ctx.rank, world_size=world, timeout=timedelta(seconds=ctx.timeout)
        ),
    )
    if backend == "nccl":
        ctx.cpu_group = ctx._run("new_group(gloo)", lambda: dist.new_group(backend="gloo"))
    return ctx


def shard(idx, rank: int, world_size: int):
    """Rank ``rank``'s contiguous slice of a meta-batch's :class:`TaskIndices` (``T / world_size`` tasks)."""
    T = idx.classes.shape[0]
    n = T // world_size
    return type(idx)(*(t[rank * n : (rank + 1) * n] for t in idx))


# ------------------------------------------------------------------ stop requests (preemption)
#
# What a scheduler sends before it takes the machine back (SLURM, Kubernetes, spot instances:
# SIGTERM; SLURM's --signal warning: SIGUSR1; a terminal: SIGINT) makes the trainer finish the
# meta-step in flight, checkpoint that step, flush the metrics log and exit with PREEMPTED (75,
# EX_TEMPFAIL of sysexits.h: "try again later"); --resume then recomputes no step.
#
# - The handler only records the signal (Preemption); the training loop reads that record after
#   each meta-step (a Python attribute, plus one int in shared memory under --world-size N): no
#   host synchronisation inside a meta-step. With several ranks, DistContext.agree makes them
#   stop after the same step.
# - A second signal exits at once, by the signal's default action (status 128 + signum), as soon
#   as the interpreter runs its handler. A repeat of the first signal within REPEAT_WINDOW
#   seconds counts as the same request (a launcher such as torchrun relaying what the process
#   group already received); any other signal, or a repeat after that, is a second signal.
# - The launcher of --world-size N (spawn) does not relay the signal to its ranks (they may have
#   received it already: kill -TERM -PGID, Ctrl-C in a terminal); it raises a flag in memory
#   shared with them (attach_launcher), waits for them within a bound, and exits 75 when they
#   checkpointed.

PREEMPTED = 75  # EX_TEMPFAIL: preempted, resumable (--resume continues from the step reached)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW = 2.0  # seconds within which a repeat of the first signal is the same request

# Set in a rank of --world-size N: [the launcher's stop signal (0: none), a rank was preempted].
_launcher = None


def attach_launcher(shared) -> None:
    """In a rank spawned by the launcher: ``shared`` is its ``RawArray("i", 2)``; a non-zero
    ``shared[0]`` is the stop signal the launcher received."""
    global _launcher
    _launcher = shared


def catch_signals(signals: Sequence[int], handler: Callable) -> dict:
    """Install ``handler`` for ``signals``; returns the handlers replaced (for :func:`restore_signals`).
    Only from the main thread (elsewhere: nothing, ``{}``). A signal that is ignored (SIGINT of
    a job started with ``&``) stays ignored; one whose handler was not set from Python
    (``getsignal`` is None) is left alone, since it could not be restored."""
    old = {}
    if threading.current_thread() is not threading.main_thread():
        return old
    for sig in signals:
        prev = signal.getsignal(sig)
        if prev is not None and prev is not signal.SIG_IGN:
            old[sig] = prev
            signal.signal(sig, handler)
    return old


def restore_signals(old: dict) -> None:
    for sig, prev in old.items():
        signal.signal(sig, prev)


class Latch:
    """The first stop signal (``signum``, 0 before any) and whether a later one is a second."""

    def __init__(self) -> None:
        self.signum, self.since = 0, 0.0

    def see(self, signum: int) -> bool:
        """Record ``signum``; True when it is a second signal (the caller then exits at once)."""
        now = time.monotonic()
        if not self.signum:
            self.signum, self.since = int(signum), now
            return False
        return signum != self.signum or now - self.since > REPEAT_WINDOW


class Preemption:
    """Stop requests of this process: the signals ``signals`` while :meth:`catching`, and the
    launcher's flag (ranks of ``--world-size N``). ``signals=()``: the launcher's flag only.

    Example::

        >>> stop = Preemption()
        >>> with stop.catching():
        ...     while not stop.requested():
        ...         step()
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.latch = Latch()

    def requested(self) -> int:
        """The number of the signal that asked for a stop, else 0 (no system call)."""
        if not self.latch.signum and _launcher is not None and _launcher[0]:
            self.latch.see(_launcher[0])
        return self.latch.signum

    def _on_signal(self, signum, frame) -> None:
        if self.latch.see(signum):  # a second signal: its default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @contextlib.contextmanager
    def catching(self) -> Iterator[Preemption]:
        """Within the block the signals are recorded; the old handlers come back after it."""
        old = catch_signals(self.signals, self._on_signal)
        try:
            yield self
        finally:
            restore_signals(old)


# ------------------------------------------------------------------ spawning


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Parent-death handling in a rank: a launcher killed with SIGKILL must not leave its ranks
# running (reparented to init, still writing the run folder). With the spawn start method the
# ranks are direct children of the launcher, so the launcher's pid is their parent pid.

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_pdeathsig(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent (thread) dies; False where
    prctl(2) does not exist or fails (then only :func:`_watch_parent`'s polling is left)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import ctypes.util
    except ImportError:
        return False
    try:
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
        return prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError, ctypes.ArgumentError):  # no libc, no prctl: the watchdog covers it
        return False


def _watch_parent(parent: int, interval: float = 1.0) -> None:
    """Exit at once (status 1) unless ``parent`` is this process's parent, then poll
    ``os.getppid()`` every ``interval`` s in a daemon thread and exit the same way when the
    parent changed (the parent died and this process was reparented)."""
    if os.getppid() != parent:
        os._exit(1)

    def poll() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=poll, name="imaml-parent-watchdog", daemon=True).start()


def _worker(
    rank: int, entry: Entry, world_size: int, addr: str, port: int, argv: list[str], parent: int, shared=None
) -> None:
    # First the parent-death signal: SIGTERM, in place of the SIGINT torch's wrapper set, which
    # is ignored in the ranks of a launcher started with SIGINT ignored (`imaml-train ... &` in
    # a script) and otherwise only a KeyboardInterrupt that the rank's code may catch. Then the
    # check that the launcher did not die before it was set; then the polling backstop.
    _set_pdeathsig(signal.SIGTERM)
    _watch_parent(parent)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=addr, MASTER_PORT=str(port),
    )
    attach_launcher(shared)
    rc = entry(argv)
    if rc == PREEMPTED and shared is not None:
        # Told through shared memory, not the exit status: torch's join takes any non-zero
        # status for a failure and terminates the other ranks, which may still be checkpointing.
        shared[1] = 1
        rc = 0
    if rc:
        sys.exit(rc)


_STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL to a rank that does not stop
_JOIN_POLL = 0.5  # seconds per ProcessContext.join() between checks for a stop signal
PREEMPT_TIMEOUT = 60.0  # seconds the launcher waits, after a stop signal, for its ranks to exit


def _stop_ranks(processes, grace: float = _STOP_GRACE) -> None:
    """SIGTERM to every live rank, SIGKILL to those still alive after ``grace`` s (at once
    for ``grace`` 0); joins all."""
    for proc in processes:
        if proc.is_alive() and grace > 0:
            proc.terminate()
        elif proc.is_alive():
            proc.kill()
    end = time.monotonic() + grace
    for proc in processes:
        proc.join(max(0.0, end - time.monotonic()))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
        proc.join()


class _LauncherStop:
    """The launcher's stop signals: the first raises the ranks' shared flag (:meth:`poll`), a
    second (:class:`Latch`) stops them at once."""

    def __init__(self, shared, timeout: float):
        self.shared, self.timeout = shared, timeout
        self.latch, self.second, self.deadline = Latch(), 0, None

    def on_signal(self, signum, frame) -> None:
        if self.latch.see(signum):
            self.second = signum
        else:
            self.shared[0] = self.latch.signum  # the ranks see it after their meta-step in flight

    def poll(self) -> str | None:
        """None while the ranks may go on; else why the launcher stops them now."""
        if self.latch.signum and self.deadline is None:
            self.deadline = time.monotonic() + self.timeout
        if self.second:
            return f"{signal.Signals(self.second).name}, a second stop signal after {self.name}: ranks killed"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return f"{self.name}; the ranks did not exit within {self.timeout:g} s and were stopped"
        return None

    @property
    def name(self) -> str:
        return signal.Signals(self.latch.signum).name


def _stopped(processes, stop: _LauncherStop, why: str) -> int:
    """Stop the ranks (at once after a second signal), say why, return 128 + the signal."""
    _stop_ranks(processes, 0.0 if stop.second else _STOP_GRACE)
    print(f"imaml-train: error: stopped by {why}", file=sys.stderr)
    return 128 + (stop.second or stop.latch.signum)


def _supervise(context, stop: _LauncherStop) -> int:
    """Wait for the ranks: 0 when all succeeded; :data:`~.PREEMPTED` when they stopped
    on a stop signal with a checkpoint; else the status of the first that failed (the others
    stopped) or 128 + the stop signal."""
    import torch.multiprocessing as mp

    while True:
        why = stop.poll()
        if why:
            return _stopped(context.processes, stop, why)
        try:
            if context.join(timeout=_JOIN_POLL):
                break
        except mp.ProcessExitedException as exc:
            if stop.latch.signum:  # a rank killed along with the launcher (kill -TERM -PGID) is no failure
                return _stopped(context.processes, stop, f"{stop.name}; ranks stopped")
            how = (f"was killed by signal {-exc.exit_code}" if exc.exit_code < 0
                   else f"exited with status {exc.exit_code}")
            print(f"imaml-train: error: rank {exc.error_index} {how}; the other ranks were stopped", file=sys.stderr)
            return exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1
        except mp.ProcessRaisedException as exc:
            if stop.latch.signum:
                return _stopped(context.processes, stop, f"{stop.name}; ranks stopped")
            print(f"imaml-train: error: rank {exc.error_index} raised: {exc}", file=sys.stderr)
            return 1
    if stop.shared[1]:
        return PREEMPTED
    if stop.latch.signum:  # the ranks exited without a checkpoint of the stop (the run had ended)
        return _stopped(context.processes, stop, f"{stop.name}; ranks stopped")
    return 0


def spawn(entry: Entry, argv: Sequence[str], world_size: int, *, preempt_timeout: float = PREEMPT_TIMEOUT) -> int:
    """Run ``entry(argv)`` on ``world_size`` local processes (torch.multiprocessing, spawn), each
    with torchrun's environment (RANK, WORLD_SIZE, ..., MASTER_ADDR/PORT) set for its rank;
    returns 0, or the exit status of the first rank that failed (the others are terminated).

    Stop signals to this process (the launcher) while it waits: SIGTERM, SIGUSR1 or SIGINT
    raises a flag in memory shared with the ranks (:class:`Preemption`: the trainer's ranks
    finish their meta-step, checkpoint it and return 75); the launcher waits for them up to
    ``preempt_timeout`` s and returns 75 (:data:`PREEMPTED`) when they did. Ranks that do not
    exit in time are stopped (SIGTERM, SIGKILL after 5 s), a second signal kills them at once;
    then, or when they exited without checkpointing, it returns ``128 + signum`` (143, 138,
    130). The old handlers are restored on return (a signal that was ignored stays ignored). A launcher
    killed outright takes its ranks with it: each rank has Linux's parent-death signal set to
    SIGTERM and polls its parent pid once a second.

    ``entry`` is pickled to the ranks by reference, so it must be a top-level function of an
    importable module (``imaml_kernels.trainer.cli.main``), not a lambda or a closure.

    Example:
        >>> from imaml_kernels.trainer.cli import main
        >>> spawn(main, ["--preset", "omniglot-5w1s", "--threads", "1"], 2)
        0
    """
    import torch.multiprocessing as mp

    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT") or _free_port())
    shared = mp.get_context("spawn").RawArray("i", 2)  # [the stop signal, a rank was preempted]
    stop = _LauncherStop(shared, preempt_timeout)
    old_handlers = catch_signals(STOP_SIGNALS, stop.on_signal)
    context = None
    try:
        context = mp.start_processes(
            _worker, args=(entry, world_size, addr, port, list(argv), os.getpid(), shared), nprocs=world_size,
            join=False, start_method="spawn",
        )
        return _supervise(context, stop)
    finally:
        if context is not None and any(p.is_alive() for p in context.processes):
            _stop_ranks(context.processes)  # an unexpected exception: leave no rank behind
        restore_signals(old_handlers)


# ------------------------------------------------------------------ benchmark


def bench(entry: Entry, worlds=(1, 2), steps: int = 6, extra: Sequence[str] = ()) -> dict[int, float]:
    """Meta-steps/s of the tiny CPU configuration for each world size (1 thread per rank).

    ``entry`` is the trainer's entry point (``imaml_kernels.trainer.cli.main``), run in this process
    with imaml-train flags and ``--world-size N`` (it spawns the ranks). Times the second half
    of the run only (from the read-back after ``steps/2`` steps to the one at the end), so
    process start, data loading and the first step are excluded.
    """
    half = max(1, steps // 2)
    cfg = [
        "--preset", "omniglot-5w1s", "--meta-batch", "4", "--inner-steps", "2", "--channels", "8",
        "--threads", "1", "--no-progress", "--eval-tasks", "0", "--steps", str(2 * half),
        "--log-every", str(half), "--ckpt-every", str(10 * half), *extra,
    ]
    rates = {}
    for world in worlds:
        with tempfile.TemporaryDirectory() as out:
            rc = entry([*cfg, "--out", out, "--world-size", str(world)])
            if rc:
                raise RuntimeError(f"bench run with world size {world} failed ({rc})")
            rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            t = [r["time"] for r in rows if r["kind"] == "train"]
            rates[world] = half / (t[2 * half - 1] - t[half - 1])
    return rates
