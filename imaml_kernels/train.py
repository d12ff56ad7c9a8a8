"""``imaml-train``: implicit MAML on Omniglot / MiniImagenet.

One meta-step, all on the device and with no host synchronisation:

    tasks (sampler.sample(T))  ->  inner solve per task (GD or Hessian-Free, no graph)
      ->  query loss [T]  ->  mean.backward(): ((1+c) I + H_t/(λ+d))⁻¹ g_t by 5 CG
          iterations (the damped system of the authors' code; c = d = 0: (I + H_t/λ)⁻¹)
      ->  Adam step on θ

Metrics stay on the device as ``[T]``-reduced tensors and are read back once every
``--log-every`` steps (a progress bar, ``metrics.jsonl``). Every ``--ckpt-every`` steps a
checkpoint is written atomically; ``--resume`` continues bit-for-bit (same θ, Adam state,
task stream). With ``--world-size N`` or under ``torchrun`` the T tasks of each meta-batch
are split across N ranks (see :mod:`imaml_kernels.trainer.distributed`). At the end: ``curves.png``
and, with ``--eval-tasks N``, the meta-test accuracy on N fixed tasks (rank 0 alone; see
:mod:`imaml_kernels.trainer.evaluate`). The run folder belongs to one run and survives crashes and
divergence (:mod:`imaml_kernels.trainer.runs`; the README's "Runs and failures").

Example::

    $ imaml-train --preset omniglot-5w1s --out runs/o5w1s --device cuda
    $ imaml-train --out runs/o5w1s --resume --steps 40000      # extend a run
    $ torchrun --nproc_per_node 4 -m imaml_kernels.train --preset omniglot-5w1s --device cuda
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from .trainer import distributed
from ._atomic import atomic_write
from .trainer.builders import DataError, build_model, build_samplers, build_solver
from .trainer.checkpoint import (
    CHECKPOINT_NAME, CheckpointError, check_model_state, checkpoint_config, load_checkpoint, save_checkpoint,
)
from .trainer._cli_util import check_device, one_line
from .trainer.evaluate import describe, evaluate, write_json
from .step import STATS, meta_step
from .cg import CG
from .trainer.presets import (INITS, INNER_SOLVERS, PRESET_NOTES, SCHEDULES, ConfigError, apply_overrides, config_diff, outer_lr_at,
                      preset_names, resolve_config)
from .trainer.runs import MetricsLog, RunError, RunFolder, check_out_dir, read_metrics, rewrite_metrics

__all__ = ["STATS", "backward_solve", "meta_step", "train", "main"]

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"


def backward_solve(cfg: Mapping[str, Any], backend=None) -> CG:
    """The backward's linear solve of a run: ``((1+c) I + H/(λ+d)) x = g`` with
    ``cg_iters`` CG iterations, c = ``cg_damping`` and d = ``lam_damping`` (the authors'
    released code: c = 1, d = 10; c = d = 0: the paper's ``(I + H/λ) x = g``)."""
    return CG(cfg["cg_iters"], damping=cfg["cg_damping"], lam_damping=cfg["lam_damping"], backend=backend)


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Training loss and query accuracy against meta-step (plus meta-test points) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path, warn=False)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        return None
    steps = [r["step"] for r in train]
    # One meta-batch is a noisy estimate: draw each step faintly and a running mean over
    # about 2% of the run on top.
    w = max(1, len(train) // 50)

    def smooth(v):
        c = [0.0]
        for x in v:
            c.append(c[-1] + x)
        return [(c[i + 1] - c[max(0, i + 1 - w)]) / min(w, i + 1) for i in range(len(v))]

    nan = float("nan")
    loss = [nan if r["loss"] is None else r["loss"] for r in train]
    acc = [nan if r["acc"] is None else 100 * r["acc"] for r in train]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(steps, loss, lw=0.6, alpha=0.3, color="C0")
    a1.plot(steps, smooth(loss), lw=1.5, color="C0")
    a1.set(xlabel="meta-step", ylabel="query loss (train tasks)", yscale="log")
    a2.plot(steps, acc, lw=0.6, alpha=0.3, color="C0")
    a2.plot(steps, smooth(acc), lw=1.5, color="C0", label=f"train tasks (query), mean of {w}")
    if evals:
        a2.errorbar(
            [r["step"] for r in evals], [100 * r["accuracy"] for r in evals],
            yerr=[100 * r["ci95"] for r in evals], fmt="o", color="C3", capsize=3,
            label=f"meta-test ({evals[-1]['tasks']} tasks, 95% CI)",
        )
    a2.set(xlabel="meta-step", ylabel="accuracy (%)")
    a2.legend(loc="lower right")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.suptitle(metrics_path.parent.name)
    fig.tight_layout()
    try:
        with atomic_write(out_png) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out_png


def _checkpoint_state(step, cfg, model, optimizer, sampler, log_state) -> dict[str, Any]:
    return {
        "step": step,
        "config": dict(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        # The statistics read back but not yet logged and the divergence count: a crash at
        # any step loses no row and keeps the log's cadence.
        "log": log_state,
    }


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

    The folder's ownership (lock, refusing another run) is the caller's
    (:class:`~imaml_kernels.trainer.runs.RunFolder`; :func:`main` takes care of it).

    Returns:
        ``{"step", "out", "seconds", "step_seconds", "eval": dict | None, "files": [...]}``.
    """
    dist = dist or distributed.DistContext()
    main_rank = dist.is_main
    out = Path(out)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    train_sampler, test_sampler = build_samplers(cfg, device, data_root)
    # θ₀ from the configuration's seed alone, so a run is reproducible from its config.
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["outer_lr"])
    metrics_path = out / METRICS_NAME
    ckpt_path = out / CHECKPOINT_NAME
    step = 0
    total = int(cfg["steps"])
    T = int(cfg["meta_batch"])
    log_rows: list[dict] = []  # read back, not yet written
    div_state = None
    if resume is not None:
        where = checkpoint_path or ckpt_path
        check_model_state(model, resume["model"], where)
        optimizer.load_state_dict(resume["optimizer"])
        train_sampler.load_state_dict(resume["sampler"])
        torch.set_rng_state(resume["torch_rng"])
        if resume.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["cuda_rng"])
        step = int(resume["step"])
        if total < step:
            raise RunError(f"{where} is at step {step}, past --steps {total}: give --steps > {step} to extend the run")
        saved_log = resume.get("log") or {}
        log_rows = [dict(r) for r in saved_log.get("rows", [])]
        div_state = tuple(saved_log["divergence"]) if "divergence" in saved_log else None
        # Rows logged after the checkpoint belong to steps that will run again; the earlier
        # rows, eval rows included, stay.
        if main_rank:
            pending_steps = {r["step"] for r in log_rows}  # saved unlogged: written again at the next log step
            kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= step and r.get("kind") in ("train", "eval")
                    and not (r.get("kind") == "train" and r["step"] in pending_steps)]
            rewrite_metrics(metrics_path, kept)
    theta = dict(model.named_parameters())
    solver = build_solver(cfg)
    if T % dist.world_size:
        raise ConfigError(f"meta-batch {T} is not divisible by the world size {dist.world_size}")
    # Every rank draws the whole meta-batch (the same stream as one process) and builds its slice.
    sample = (
        (lambda: train_sampler.build(distributed.shard(train_sampler.draw(T), dist.rank, dist.world_size)))
        if dist.active else (lambda: train_sampler.sample(T))
    )
    step_dist = dist if dist.active else None
    divergence = _Divergence(max_bad_steps, T, div_state)
    files: list[str] = []

    def drain(pending):
        # The only read-back: the pending steps' statistics in one transfer (across ranks: one
        # all_reduce of the block: means; "dropped" is a count). Every rank sees the same rows.
        if not pending:
            return
        rows = dist.reduce_stats(torch.stack(pending), summed=(STATS.index("dropped"),)).cpu().tolist()
        first = step - len(rows) + 1
        pending.clear()
        for i, r in enumerate(rows):
            row = {"kind": "train", "step": first + i, **dict(zip(STATS, r))}
            log_rows.append(row)
            divergence.see(row)
        if not _params_finite(model):
            raise RunError(
                f"the run diverged: the parameters are not finite after step {step} "
                "(likely a step size too large: --outer-lr, --inner-lr); the last good checkpoint is kept"
            )

    def save(at):
        try:
            save_checkpoint(ckpt_path, _checkpoint_state(at, cfg, model, optimizer, train_sampler,
                                                         {"rows": log_rows, "divergence": divergence.state()}))
        except OSError as exc:
            raise RunError(f"cannot write the checkpoint {ckpt_path}: {exc.strerror or exc}") from exc
        if CHECKPOINT_NAME not in files:
            files.append(CHECKPOINT_NAME)

    bar = tqdm(
        total=total, initial=step, desc="meta-step", unit="step", disable=not (progress and main_rank), dynamic_ncols=True
    )
    pending: list[torch.Tensor] = []
    t_start = t_log = time.perf_counter()
    steps_run = 0
    with MetricsLog(metrics_path if main_rank else None) as log:
        while step < total:
            for group in optimizer.param_groups:  # a host float: no launch, no sync
                group["lr"] = outer_lr_at(cfg, step)
            stats = meta_step(model, theta, optimizer, sample(), lam=cfg["lam"], inner=solver, solve=backward_solve(cfg),
                              average_gradients=step_dist.average_gradients if step_dist is not None else None)
            pending.append(stats)
            step += 1
            steps_run += 1
            log_now = step % log_every == 0 or step == total
            ckpt_now = step % ckpt_every == 0 or step == total
            if log_now or ckpt_now:
                n = len(pending)
                drain(pending)
                bar.update(n)
            if log_now and log_rows:
                now = time.perf_counter()
                tasks_per_s = len(log_rows) * T / max(now - t_log, 1e-9)
                t_log = now
                elapsed = round(now - t_start, 3)  # at the read-back, shared by its rows
                for r in log_rows:
                    r.setdefault("time", elapsed)
                log.write(log_rows)
                mean = {k: sum(r[k] for r in log_rows) / len(log_rows) for k in STATS}
                bar.set_postfix(acc=f"{100 * mean['acc']:.1f}%", loss=f"{mean['loss']:.3f}", tasks_s=f"{tasks_per_s:.1f}")
                log_rows.clear()
                if METRICS_NAME not in files:
                    files.append(METRICS_NAME)
            if main_rank and ckpt_now:
                save(step)
                if plot_curves(metrics_path, out / CURVES_NAME) and CURVES_NAME not in files:
                    files.append(CURVES_NAME)
    bar.close()
    dist.barrier()  # the last checkpoint is written before any rank returns
    seconds = time.perf_counter() - t_start
    result: dict[str, Any] = {
        "step": step,
        "out": str(out),
        "seconds": seconds,
        "step_seconds": seconds / steps_run if steps_run else None,
        "eval": None,
        "files": files,
    }
    if not main_rank:
        return result
    if steps_run:
        print(f"trained {steps_run} meta-steps in {seconds:.1f} s ({seconds / steps_run:.2f} s/step, {T} tasks/step)")
    if cfg["eval_tasks"] > 0 and step > 0:
        r = evaluate(model, test_sampler, cfg, tasks=int(cfg["eval_tasks"]), seed=0, batch=eval_batch)
        print(describe(r, cfg, 0, cfg["inner"]))
        summary = {k: v for k, v in r.items() if k != "per_task"}
        with MetricsLog(metrics_path) as log:
            log.write([{"kind": "eval", "step": step, "seed": 0, **summary}])
        # eval.json is the latest; eval_step<N>.json keeps each evaluation of an extended run.
        for name in (f"eval_step{step}.json", "eval.json"):
            write_json(out / name, {"step": step, "seed": 0, "config": dict(cfg), **r})
        files += [n for n in (METRICS_NAME, "eval.json") if n not in files]
        result["eval"] = summary
    if plot_curves(metrics_path, out / CURVES_NAME) and CURVES_NAME not in files:
        files.append(CURVES_NAME)
    return result


# ------------------------------------------------------------------ command line

# CLI flag -> configuration key (the flags that override a preset).
_OVERRIDES = {
    "way": int, "shot": int, "query": int, "meta_batch": int, "inner_steps": int, "inner_lr": float,
    "lam": float, "cg_iters": int, "cg_damping": float, "lam_damping": float, "outer_lr": float, "hf_steps": int, "hf_cg_iters": int,
    "channels": int, "steps": int, "seed": int, "eval_tasks": int, "warmup_steps": int,
}


_HELP = {
    "way": "classes per task", "shot": "support drawings per class (K)",
    "query": "query drawings per class (default: = shot)", "meta_batch": "tasks per meta-step (T)",
    "inner_steps": "GD / SGD inner steps", "inner_lr": "GD / SGD inner step size", "lam": "λ of the proximal term",
    "cg_iters": "CG iterations of the meta-gradient",
    "cg_damping": "c in ((1+c) I + H/(λ+d)) x = g (authors' code: 1; 0 with --lam-damping 0: (I + H/λ))",
    "lam_damping": "d in ((1+c) I + H/(λ+d)) x = g (authors' code: 10)", "outer_lr": "Adam step size",
    "hf_steps": "Newton steps of the Hessian-Free inner solver", "hf_cg_iters": "CG iterations per Newton step",
    "channels": "conv filters (default: 64 Omniglot, 32 MiniImagenet)", "steps": "meta-steps in total",
    "seed": "seed of θ₀ and of the task stream", "eval_tasks": "meta-test tasks evaluated at the end (0: none)",
    "warmup_steps": "linear warm-up of the outer step size over the first N meta-steps (default 0)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imaml-train",
        description="Implicit MAML (Rajeswaran et al. 2019): meta-train with implicit gradients "
        "(GD, Hessian-Free or the released SGD-then-pull-back inner loop, CG meta-gradient, Adam). Every hyperparameter of the "
        "preset can be overridden.",
        epilog="presets (how each differs from the paper's text):\n"
        + "\n".join(f"  {name}: {PRESET_NOTES[name]}" for name in preset_names()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", help=f"one of: {', '.join(preset_names())} (default: omniglot-5w1s; "
                   "with --resume: the checkpoint's configuration)")
    p.add_argument("--inner", choices=INNER_SOLVERS,
                   help="inner solver: gd, proximal gradient descent (the paper's text); hf, Hessian-Free (Newton-CG); "
                   "sgd-pullback, the authors' released code: --inner-steps plain SGD steps on the support loss, "
                   "then one step φ ← φ − lr·λ(φ − θ)")
    p.add_argument("--outer-schedule", choices=SCHEDULES,
                   help="outer step size over the run: constant (default) or cosine (to 0 at --steps), after the warm-up")
    p.add_argument("--init", choices=INITS,
                   help="θ₀: torch, PyTorch's default; released, the authors' code: xavier_uniform(gain 1.73) "
                   "weights and U(0, 0.05) biases for every conv and linear layer")
    for key, typ in _OVERRIDES.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, metavar=typ.__name__.upper(), help=_HELP[key])
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--out", help="run folder (default: runs/<preset>)")
    p.add_argument("--data-root", help="data folder (default: $IMAML_DATA, else the user cache)")
    p.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="continue from CKPT (default: <out>/ckpt.pt) bit-for-bit")
    p.add_argument("--log-every", type=int, default=10, help="read metrics back every N steps (default: 10)")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps (default: 100)")
    p.add_argument("--eval-batch", type=int, default=50, help="tasks adapted at once in the final evaluation")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--world-size", type=int, metavar="N",
                   help="data-parallel processes to spawn on this machine, T/N tasks each (gloo on CPU, "
                   "nccl on CUDA: one GPU per rank); under torchrun the world size comes from it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a folder holding a run is refused)")
    p.add_argument("--max-bad-steps", type=int, default=3, metavar="N",
                   help="stop after N meta-steps in a row with every task dropped or a non-finite loss (default: 3)")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="S",
                   help="seconds a rank waits for its peers before it exits with an error (default: 300)")
    return p


def main(argv=None) -> int:
    """``imaml-train``; returns the exit status (0; 2 with a one-line error on stderr, also when
    the run diverged; 1 when a peer rank of a distributed run failed; 143/130 when the launcher
    of ``--world-size N`` was stopped by SIGTERM/SIGINT, its ranks stopped with it). Under torchrun (WORLD_SIZE set) this process is
    one rank; with ``--world-size N`` it spawns N ranks that run ``main(argv)`` again."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    launched = distributed.env_world_size()  # set by torchrun or by our own spawn
    world = launched or args.world_size or 1
    rank = int(os.environ.get("RANK", 0)) if launched else 0
    device = args.device
    if launched and launched > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    dist = None
    overrides = {k: getattr(args, k) for k in _OVERRIDES}
    overrides["inner"] = args.inner
    overrides["init"] = args.init
    overrides["outer_schedule"] = args.outer_schedule
    run = None
    try:
        for flag, value in (("--log-every", args.log_every), ("--ckpt-every", args.ckpt_every),
                            ("--eval-batch", args.eval_batch), ("--max-bad-steps", args.max_bad_steps),
                            ("--threads", args.threads)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if args.resume is not None and args.overwrite:
            raise ConfigError("--resume continues the run in the folder and --overwrite replaces it: give one")
        check_device(args.device)
        if args.world_size is not None and (args.world_size < 1 or (launched and args.world_size != launched)):
            raise ConfigError(f"--world-size {args.world_size} does not match WORLD_SIZE={launched} of the launcher"
                              if launched else f"--world-size must be >= 1, got {args.world_size}")
        if args.threads:
            torch.set_num_threads(args.threads)
        resume = None
        if args.resume is not None:
            if args.resume:
                ckpt_path = Path(args.resume)
            elif args.out:
                ckpt_path = Path(args.out) / CHECKPOINT_NAME
            else:
                raise ConfigError("--resume needs a checkpoint path or --out")
            resume = load_checkpoint(ckpt_path, map_location=device)
            saved = checkpoint_config(resume, ckpt_path)
            requested = (
                resolve_config(args.preset, overrides) if args.preset else apply_overrides(saved, overrides)
            )
            diff = config_diff(saved, requested)
            if diff:
                detail = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
                raise ConfigError(f"{ckpt_path} comes from another configuration ({detail})")
            cfg = requested
            out = Path(args.out) if args.out else (ckpt_path if ckpt_path.is_dir() else ckpt_path.parent)
        else:
            cfg = resolve_config(args.preset or "omniglot-5w1s", overrides)
            out = Path(args.out or Path("runs") / cfg["preset"])
        if cfg["meta_batch"] % world:
            raise ConfigError(
                f"meta-batch {cfg['meta_batch']} is not divisible by the world size {world}: "
                f"each rank takes meta-batch / world-size tasks of every meta-step"
            )
        check_out_dir(out)
        RunFolder(out).check_free(resume=resume is not None, overwrite=args.overwrite)
        if world > 1 and not launched:
            return distributed.spawn(main, argv, world)  # each rank runs this main again
        if rank == 0:
            run = RunFolder(out)
            run.lock()  # released in finally, and by the kernel if this process dies
            run.claim(resume=resume is not None, overwrite=args.overwrite)
        dist = distributed.init(device, args.dist_timeout)
        if rank == 0:
            print(
                "config: " + " ".join(f"{k}={cfg[k]}" for k in cfg)
                + f" device={device} threads={torch.get_num_threads()}"
                + (f" world_size={world}" if world > 1 else ""),
                flush=True,
            )
        result = train(
            cfg, out, device=device, data_root=args.data_root, resume=resume, log_every=args.log_every,
            ckpt_every=args.ckpt_every, eval_batch=args.eval_batch, progress=not args.no_progress, dist=dist,
            max_bad_steps=args.max_bad_steps, checkpoint_path=ckpt_path if resume is not None else None,
        )
    except (ConfigError, CheckpointError, DataError, RunError) as exc:
        where = f" (rank {rank})" if launched and launched > 1 else ""
        print(f"imaml-train: error{where}: {one_line(exc)}", file=sys.stderr)
        return 2
    except distributed.DistributedError as exc:
        print(f"imaml-train: error: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if dist is not None:
            dist.close()
        if run is not None:
            run.release()
    if rank:
        return 0
    files = result["files"]
    print(f"run folder: {result['out']} ({', '.join(files)})" if files else f"run folder: {result['out']} (nothing written: no step ran)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
