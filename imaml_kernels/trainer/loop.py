"""The training loop of ``imaml-train``: :func:`train`.

One meta-step, all on the device and with no host synchronisation
(:func:`imaml_kernels.meta_step`):

    tasks (sampler.sample(T))  ->  inner solve per task (GD or Hessian-Free, no graph)
      ->  query loss [T]  ->  mean.backward(): ((1+c) I + H_t/(λ+d))⁻¹ g_t by 5 CG
          iterations (the damped system of the authors' code; c = d = 0: (I + H_t/λ)⁻¹)
      ->  Adam step on θ

A run is: restore (:func:`_restore`: θ, Adam state, task stream and the rows not yet
logged, from a checkpoint) -> loop (:func:`_loop`: meta-steps; at a read-back
:class:`_Logger` drains the statistics into ``metrics.jsonl``; at a checkpoint step
:func:`_save`; after a stop signal, :class:`~imaml_kernels.trainer.distributed.Preemption`, a read-back and a
checkpoint of the step just finished, and the run returns) -> evaluate (:func:`_final_eval`,
rank 0 alone).

Metrics stay on the device as ``[T]``-reduced tensors and are read back once every
``log_every`` steps (a progress bar, ``metrics.jsonl``). Every ``ckpt_every`` steps a
checkpoint is written atomically (the last ``keep_ckpts`` are kept); a resumed run continues
bit-for-bit (same θ, Adam state, task stream), on any number of ranks that divides T. With a
:class:`~imaml_kernels.trainer.distributed.DistContext` the T tasks of each meta-batch are
split across its ranks. At the end: ``curves.png``
(:mod:`imaml_kernels.trainer.plots`) and, with ``eval_tasks``, the meta-test accuracy
(:mod:`imaml_kernels.trainer.evaluate`). The run folder's ownership is the caller's
(:mod:`imaml_kernels.trainer.runs`; :mod:`imaml_kernels.trainer.cli` takes care of it).
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from ..engine import gemm_precision
from ..step import STATS, meta_step
from .lam import GROUP as LAM_GROUP
from .lam import LearnedLam
from . import distributed
from .builders import build_backward_solve, build_model, build_optimizer, build_samplers, build_solver
from .checkpoint import CHECKPOINT_NAME, CheckpointError, check_model_state, checkpoint_history, save_checkpoint
from .evaluate import describe, evaluate, write_json
from .plots import plot_curves
from .presets import ConfigError, outer_lr_at
from .runs import MetricsLog, RunError, read_metrics, rewrite_metrics

__all__ = ["CURVES_NAME", "METRICS_NAME", "train"]

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"


def train(
    cfg: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    device: str = "cpu",
    data_root=None,
    resume: Mapping[str, Any] | None = None,
    log_every: int = 10,
    ckpt_every: int = 100,
    eval_batch: int = 50,
    progress: bool = True,
    dist: distributed.DistContext | None = None,
    max_bad_steps: int = 3,
    checkpoint_path: str | os.PathLike | None = None,
    keep_ckpts: int = 2,
    preemption: distributed.Preemption | None = None,
) -> dict[str, Any]:
    """Train to ``cfg["steps"]`` meta-steps, writing checkpoints, metrics and curves in ``out``.

    Args:
        cfg: a configuration from :func:`imaml_kernels.trainer.presets.resolve_config`.
        resume: a loaded checkpoint to continue from (its config must match ``cfg``).
        dist: this rank of a data-parallel run (None: one process). Each rank builds its
            ``T / world_size`` tasks of every meta-batch; rank 0 alone writes files and
            evaluates at the end.
        max_bad_steps: stop (:class:`~imaml_kernels.trainer.runs.RunError`) after this many bad
            meta-steps in a row (every task dropped, or a non-finite loss); parameters that
            turn non-finite stop the run at the next read-back and are never checkpointed.
        keep_ckpts: checkpoints kept (``ckpt.pt``, ``ckpt.1.pt``, ...; see
            :func:`~imaml_kernels.trainer.checkpoint.save_checkpoint`).
        preemption: the stop requests honoured between meta-steps (its signals are caught
            while the loop runs); None: the launcher's flag only, no signal is caught. After a
            stop the run checkpoints the step just finished and returns without evaluating,
            with ``result["preempted"]`` the signal's name.

    The folder's ownership (lock, refusing another run) is the caller's
    (:class:`~imaml_kernels.trainer.runs.RunFolder`; :func:`imaml_kernels.trainer.cli.main`
    takes care of it).

    Returns:
        ``{"step", "out", "seconds", "step_seconds", "eval": dict | None, "files": [...],
        "preempted": signal name | None}``.
    """
    dist = dist or distributed.DistContext()
    run = _Run(cfg, Path(out), device, data_root, dist, keep_ckpts)
    saved_log = {} if resume is None else _restore(run, resume, checkpoint_path or run.ckpt_path)
    T = int(cfg["meta_batch"])
    if T % dist.world_size:
        raise ConfigError(f"meta-batch {T} is not divisible by the world size {dist.world_size}")
    first = run.step
    stop = preemption or distributed.Preemption(signals=())
    precision = gemm_precision(cfg.get("gemm_precision", "fp32"))  # the engine's GEMMs, this run only
    with precision, stop.catching(), _Logger(run, dist, max_bad_steps, saved_log, progress) as logger:
        # A signal after the last meta-step: rank 0 skips the evaluation (bounded exit).
        stopped = _loop(run, dist, logger, log_every, ckpt_every, stop) or (dist.is_main and stop.requested())
    dist.barrier()  # the last checkpoint is written before any rank returns
    steps_run, seconds = run.step - first, time.perf_counter() - logger.t_start
    result: dict[str, Any] = {
        "step": run.step,
        "out": str(run.out),
        "seconds": seconds,
        "step_seconds": seconds / steps_run if steps_run else None,
        "eval": None,
        "files": run.files,
        "preempted": signal.Signals(stopped).name if stopped else None,
    }
    if not dist.is_main or stopped:
        return result
    if steps_run:
        print(f"trained {steps_run} meta-steps in {seconds:.1f} s ({seconds / steps_run:.2f} s/step, {T} tasks/step)")
    with gemm_precision(cfg.get("gemm_precision", "fp32")):
        result["eval"] = _final_eval(run, eval_batch)
    _plot(run)
    return result


class _Run:
    """This rank's run: its folder, the network and its Adam state, the samplers, the step
    reached and the files written so far (rank 0 alone writes)."""

    def __init__(self, cfg: Mapping[str, Any], out: Path, device, data_root, dist: distributed.DistContext,
                 keep_ckpts: int = 2):
        self.cfg, self.out, self.keep_ckpts = cfg, out, keep_ckpts
        self.main_rank, self.world_size = dist.is_main, dist.world_size
        self.metrics_path, self.ckpt_path = out / METRICS_NAME, out / CHECKPOINT_NAME
        if self.main_rank:
            out.mkdir(parents=True, exist_ok=True)
        self.train_sampler, self.test_sampler = build_samplers(cfg, device, data_root)
        # θ₀ from the configuration's seed alone, so a run is reproducible from its config.
        torch.manual_seed(cfg["seed"])
        self.model = build_model(cfg).to(device)
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.lam = LearnedLam(cfg, self.model, device)  # --learn-lam: log λ, its own Adam group
        if self.lam.learned:
            self.optimizer.add_param_group(self.lam.param_group())
        self.step, self.total = 0, int(cfg["steps"])
        self.files: list[str] = []

    def add_files(self, *names: str) -> None:
        self.files += [n for n in names if n not in self.files]

    def checkpoint_state(self, log_state) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": dict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lam": self.lam.state(),  # learned log λ per group ({} for a fixed λ)
            "sampler": self.train_sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            # Informative only: nothing above depends on the number of ranks (every rank draws
            # every task and holds the same θ and Adam state), so any world size can resume it.
            "world_size": self.world_size,
            # The statistics read back but not yet logged and the divergence count: a crash at
            # any step loses no row and keeps the log's cadence.
            "log": log_state,
        }


def _restore(run: _Run, resume: Mapping[str, Any], where) -> dict:
    """Continue from the checkpoint ``resume`` (read from ``where``): θ, Adam state, task
    stream, RNG state and step. Returns its log state (the rows read back but not yet
    logged, the divergence count); rank 0 drops the rows ``metrics.jsonl`` holds past it."""
    check_model_state(run.model, resume["model"], where)
    run.lam.load(resume.get("lam"), where)
    run.optimizer.load_state_dict(resume["optimizer"])
    try:
        run.train_sampler.load_state_dict(resume["sampler"])
    except (ValueError, KeyError, TypeError) as exc:  # another device type: another task stream
        raise CheckpointError(f"{where}: its task stream cannot be continued here ({exc})") from exc
    torch.set_rng_state(resume["torch_rng"])
    if resume.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(resume["cuda_rng"])
    run.step = step = int(resume["step"])
    if run.total < step:
        raise RunError(f"{where} is at step {step}, past --steps {run.total}: give --steps > {step} to extend the run")
    saved_log = resume.get("log") or {}
    # Rows logged after the checkpoint belong to steps that will run again; the earlier
    # rows, eval rows included, stay.
    if run.main_rank:
        pending_steps = {r["step"] for r in saved_log.get("rows", [])}  # saved unlogged: written again at the next log step
        kept = [r for r in read_metrics(run.metrics_path) if r.get("step", 0) <= step and r.get("kind") in ("train", "eval")
                and not (r.get("kind") == "train" and r["step"] in pending_steps)]
        rewrite_metrics(run.metrics_path, kept)
    return saved_log


def _loop(run: _Run, dist: distributed.DistContext, logger: _Logger, log_every: int, ckpt_every: int,
          stop: distributed.Preemption) -> int:
    """Meta-steps up to ``cfg["steps"]``; at a log or checkpoint step the read-back, at a log
    step the rows written, at a checkpoint step (rank 0) the checkpoint and the curves.

    After each meta-step, the stop requests (``stop``; with several ranks, agreed on by one
    all_reduce of a CPU int over gloo, so every rank stops after the same step): after a stop
    that step is logged and checkpointed like the last one and the signal's number returned
    (0: the run reached its last step)."""
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    theta = dict(model.named_parameters())
    inner, solve = build_solver(cfg), build_backward_solve(cfg)
    sample = _batches(run.train_sampler, int(cfg["meta_batch"]), dist)
    average_gradients = dist.average_gradients if dist.active else None
    while run.step < run.total:
        for group in optimizer.param_groups:  # a host float: no launch, no sync (λ's group keeps its own)
            if group.get("name") != LAM_GROUP:
                group["lr"] = outer_lr_at(cfg, run.step)
        logger.pending.append(meta_step(model, theta, optimizer, sample(), lam=run.lam.value(), inner=inner, solve=solve,
                                        average_gradients=average_gradients))
        run.lam.clamp_()
        run.step += 1
        stopped = dist.agree(stop.requested()) if dist.active else stop.requested()
        last = run.step == run.total or bool(stopped)
        log_now = run.step % log_every == 0 or last
        ckpt_now = run.step % ckpt_every == 0 or last
        if log_now or ckpt_now:
            logger.drain()
        if log_now:
            logger.write()
        if run.main_rank and ckpt_now:
            _save(run, logger, plot=not stopped)  # a stop: out quickly, the curves at the next checkpoint
        if stopped:
            return stopped
    return 0


def _batches(sampler, T: int, dist: distributed.DistContext):
    """``sample()`` -> this rank's tasks of the next meta-batch. Every rank draws the whole
    meta-batch (the same stream as one process) and builds its slice."""
    if not dist.active:
        return lambda: sampler.sample(T)
    return lambda: sampler.build(distributed.shard(sampler.draw(T), dist.rank, dist.world_size))


class _Logger:
    """The statistics on their way from the device to ``metrics.jsonl``: those of the steps
    run since the last read-back (device tensors, ``pending``), the rows read back but not
    yet written (``rows``: a checkpoint keeps them), the divergence count and the progress
    bar. A context manager: the log is closed on exit, the bar when the loop finished."""

    def __init__(self, run: _Run, dist: distributed.DistContext, max_bad_steps: int, saved_log: Mapping, progress: bool):
        self.run, self.dist, self.T = run, dist, int(run.cfg["meta_batch"])
        self.pending: list[torch.Tensor] = []
        self.rows: list[dict] = [dict(r) for r in saved_log.get("rows", [])]
        self.divergence = _Divergence(max_bad_steps, self.T,
                                      tuple(saved_log["divergence"]) if "divergence" in saved_log else None)
        self.bar = tqdm(total=run.total, initial=run.step, desc="meta-step", unit="step",
                        disable=not (progress and run.main_rank), dynamic_ncols=True)
        self.t_start = self.t_log = time.perf_counter()
        self.log = MetricsLog(run.metrics_path if run.main_rank else None)

    def __enter__(self) -> _Logger:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.log.close()
        if exc_type is None:
            self.bar.close()

    def state(self) -> dict[str, Any]:
        return {"rows": self.rows, "divergence": self.divergence.state()}

    def drain(self) -> None:
        """The only read-back: the pending steps' statistics in one transfer (across ranks:
        one all_reduce of the block: means; "dropped" is a count). Every rank sees the same
        rows; a divergence or non-finite parameters raise :class:`RunError`."""
        if not self.pending:
            return
        n, step = len(self.pending), self.run.step
        rows = self.dist.reduce_stats(torch.stack(self.pending), summed=(STATS.index("dropped"),)).cpu().tolist()
        self.pending.clear()
        for i, r in enumerate(rows):
            row = {"kind": "train", "step": step - n + 1 + i, **dict(zip(STATS, r))}
            self.rows.append(row)
            self.divergence.see(row)
        if not _params_finite(self.run.model):
            raise RunError(
                f"the run diverged: the parameters are not finite after step {step} "
                "(likely a step size too large: --outer-lr, --inner-lr); the last good checkpoint is kept"
            )
        self.bar.update(n)

    def write(self) -> None:
        """The rows read back into ``metrics.jsonl`` (each with the time of the read-back),
        their mean on the progress bar."""
        if not self.rows:
            return
        now = time.perf_counter()
        tasks_per_s = len(self.rows) * self.T / max(now - self.t_log, 1e-9)
        self.t_log = now
        elapsed = round(now - self.t_start, 3)  # at the read-back, shared by its rows
        lam = self.run.lam.row()  # the learned λ at this read-back (none for a fixed λ)
        for r in self.rows:
            r.setdefault("time", elapsed)
            for k, v in lam.items():
                r.setdefault(k, v)
        self.log.write(self.rows)
        mean = {k: sum(r[k] for r in self.rows) / len(self.rows) for k in STATS}
        self.bar.set_postfix(acc=f"{100 * mean['acc']:.1f}%", loss=f"{mean['loss']:.3f}", tasks_s=f"{tasks_per_s:.1f}")
        self.rows.clear()
        self.run.add_files(METRICS_NAME)


def _params_finite(model) -> bool:
    """One read-back: are all parameters finite?"""
    norms = torch._foreach_norm([p.detach() for p in model.parameters()], ord=float("inf"))  # max |x|: no overflow
    return bool(torch.isfinite(torch.stack(norms)).all())


class _Divergence:
    """Consecutive bad meta-steps: every task dropped, or a non-finite loss or parameters."""

    def __init__(self, limit: int, T: int, state=None):
        self.limit, self.T = limit, T
        self.run, self.first = (state or (0, None))

    def state(self):
        return (self.run, self.first)

    def see(self, row: dict) -> None:
        bad = row["dropped"] >= self.T or not math.isfinite(row["loss"])
        if not bad:
            self.run, self.first = 0, None
            return
        self.run += 1
        self.first = self.first or row["step"]
        if self.run >= self.limit:
            why = (f"every task was dropped ({self.T} of {self.T}: non-finite inner losses or meta-gradients)"
                   if row["dropped"] >= self.T else "the query loss is not finite")
            raise RunError(
                f"the run diverged: {self.run} bad meta-steps in a row from step {self.first} ({why}); "
                "likely a step size or λ too large (--outer-lr, --inner-lr, --lam); the last good checkpoint is kept"
            )


def _save(run: _Run, logger: _Logger, plot: bool = True) -> None:
    """Rank 0 at a checkpoint step: the rows logged so far onto the disk, the checkpoint
    (atomically: the previous ones survive a failed write; ``keep_ckpts`` of them kept), then
    (``plot``) the curves."""
    try:
        logger.log.sync()
        save_checkpoint(run.ckpt_path, run.checkpoint_state(logger.state()), keep=run.keep_ckpts)
    except OSError as exc:
        raise RunError(f"cannot write the checkpoint {run.ckpt_path}: {exc.strerror or exc}") from exc
    run.add_files(*(p.name for p in checkpoint_history(run.ckpt_path)))
    if plot:
        _plot(run)


def _plot(run: _Run) -> None:
    if plot_curves(run.metrics_path, run.out / CURVES_NAME):
        run.add_files(CURVES_NAME)


def _final_eval(run: _Run, eval_batch: int) -> dict[str, Any] | None:
    """Rank 0 after the last step, with ``eval_tasks`` > 0: the meta-test accuracy on that
    many fixed tasks (seed 0), printed, logged as an ``eval`` row and written to
    ``eval.json`` and ``eval_step<N>.json``. Returns its summary (no per-task list)."""
    cfg, step = run.cfg, run.step
    if cfg["eval_tasks"] <= 0 or step == 0:
        return None
    r = evaluate(run.model, run.test_sampler, cfg, tasks=int(cfg["eval_tasks"]), seed=0, batch=eval_batch,
                 lam=run.lam.current() if run.lam.learned else None)
    print(describe(r, cfg, 0, cfg["inner"]))
    summary = {k: v for k, v in r.items() if k != "per_task"}
    with MetricsLog(run.metrics_path) as log:
        log.write([{"kind": "eval", "step": step, "seed": 0, **summary}])
    # eval.json is the latest; eval_step<N>.json keeps each evaluation of an extended run.
    for name in (f"eval_step{step}.json", "eval.json"):
        write_json(run.out / name, {"step": step, "seed": 0, "config": dict(cfg), **r})
    run.add_files(METRICS_NAME, "eval.json")
    return summary
