"""``imaml-train``: implicit MAML on Omniglot / MiniImagenet, from the command line.

The flags override a preset (:mod:`imaml_kernels.trainer.presets`); ``--resume`` continues a
run bit-for-bit from its latest good checkpoint, on any world size that divides the
meta-batch. SIGTERM, SIGUSR1 or SIGINT checkpoint the step reached and exit 75
(:class:`imaml_kernels.trainer.distributed.Preemption`). The run folder is checked and claimed here
(:mod:`imaml_kernels.trainer.runs`), the ranks of ``--world-size N`` spawned here
(:mod:`imaml_kernels.trainer.distributed`), and the run itself is
:func:`imaml_kernels.trainer.loop.train`. Every failure the user can fix is one
``imaml-train: error: ...`` line on stderr.

Example::

    $ imaml-train --preset omniglot-5w1s --out runs/o5w1s --device cuda
    $ imaml-train --out runs/o5w1s --resume --steps 40000      # extend a run
    $ torchrun --nproc_per_node 4 -m imaml_kernels.trainer --preset omniglot-5w1s --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from . import distributed
from ._cli_util import check_device, one_line
from .builders import DataError
from .checkpoint import CheckpointError, Found, checkpoint_config, fallback_warning, find_checkpoint, set_aside
from .loop import train
from .presets import (GEMM_PRECISIONS, INITS, INNER_SOLVERS, LEARN_LAM, PRESET_NOTES, SCHEDULES, ConfigError, apply_overrides, config_diff,
                      preset_names, resolve_config)
from .runs import RunError, RunFolder, check_out_dir

__all__ = ["check_device", "main", "one_line"]


# CLI flag -> configuration key (the flags that override a preset).
_OVERRIDES = {
    "way": int, "shot": int, "query": int, "meta_batch": int, "inner_steps": int, "inner_lr": float,
    "lam": float, "cg_iters": int, "cg_damping": float, "lam_damping": float, "outer_lr": float, "adam_eps": float,
    "hf_steps": int, "hf_cg_iters": int,
    "channels": int, "steps": int, "seed": int, "eval_tasks": int, "warmup_steps": int,
    "lam_lr": float, "lam_min": float, "lam_max": float,
}


_HELP = {
    "way": "classes per task", "shot": "support drawings per class (K)",
    "query": "query drawings per class (default: = shot)", "meta_batch": "tasks per meta-step (T)",
    "inner_steps": "GD / SGD inner steps", "inner_lr": "GD / SGD inner step size", "lam": "λ of the proximal term",
    "cg_iters": "CG iterations of the meta-gradient",
    "cg_damping": "c in ((1+c) I + H/(λ+d)) x = g (authors' code: 1; 0 with --lam-damping 0: (I + H/λ))",
    "lam_damping": "d in ((1+c) I + H/(λ+d)) x = g (authors' code: 10)", "outer_lr": "Adam step size",
    "adam_eps": "Adam's ε (default 1e-8; the authors' released code: 1e-3)",
    "hf_steps": "Newton steps of the Hessian-Free inner solver", "hf_cg_iters": "CG iterations per Newton step",
    "channels": "conv filters (default: 64 Omniglot, 32 MiniImagenet)", "steps": "meta-steps in total",
    "seed": "seed of θ₀ and of the task stream", "eval_tasks": "meta-test tasks evaluated at the end (0: none)",
    "warmup_steps": "linear warm-up of the outer step size over the first N meta-steps (default 0)",
    "lam_lr": "Adam step size of log λ when it is learned (default 1e-2)",
    "lam_min": "lower bound of a learned λ (default 1e-2)", "lam_max": "upper bound of a learned λ (default 1e2)",
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
    p.add_argument("--learn-lam", choices=LEARN_LAM,
                   help="none: λ fixed (default); scalar or per-layer: λ meta-learned by its exact implicit "
                   "hypergradient, log-parameterised, from --lam, with its own Adam step size --lam-lr, within "
                   "[--lam-min, --lam-max], logged per layer in metrics.jsonl and curves.png")
    p.add_argument("--gemm-precision", choices=GEMM_PRECISIONS,
                   help="fp32 (default) or bf16: the fused engine's GEMMs on bfloat16 operands with float32 accumulation "
                   "(parameters, gradients, CG and reductions stay float32)")
    p.add_argument("--init", choices=INITS,
                   help="θ₀: torch, PyTorch's default; released, the authors' code: xavier_uniform(gain 1.73) "
                   "weights and U(0, 0.05) biases for every conv and linear layer")
    for key, typ in _OVERRIDES.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, metavar=typ.__name__.upper(), help=_HELP[key])
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--out", help="run folder (default: runs/<preset>)")
    p.add_argument("--data-root", help="data folder (default: $IMAML_DATA, else the user cache)")
    p.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="continue bit-for-bit from CKPT, a checkpoint file or a run folder (default: --out); from a "
                   "folder, its latest good checkpoint (ckpt.pt, else ckpt.1.pt, ...: one warning names each one skipped)")
    p.add_argument("--log-every", type=int, default=10, help="read metrics back every N steps (default: 10)")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps (default: 100)")
    p.add_argument("--keep-ckpts", type=int, default=2, metavar="K",
                   help="checkpoints kept: ckpt.pt (the latest), ckpt.1.pt, ..., ckpt.<K-1>.pt (default: 2)")
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
    p.add_argument("--preempt-timeout", type=float, default=distributed.PREEMPT_TIMEOUT, metavar="S",
                   help="with --world-size N: seconds the launcher waits, after SIGTERM, SIGUSR1 or SIGINT, for its "
                   f"ranks to checkpoint and exit before it stops them (default: {distributed.PREEMPT_TIMEOUT:g})")
    return p


def _check_args(args: argparse.Namespace, launched: int | None) -> None:
    """The flags that no configuration checks: counts >= 1, --resume or --overwrite, the
    device, the world size (against the launcher's, under torchrun)."""
    for flag, value in (("--log-every", args.log_every), ("--ckpt-every", args.ckpt_every),
                        ("--eval-batch", args.eval_batch), ("--max-bad-steps", args.max_bad_steps),
                        ("--threads", args.threads), ("--keep-ckpts", args.keep_ckpts)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if not 0 < args.preempt_timeout < float("inf"):
        raise ConfigError(f"--preempt-timeout must be finite and > 0, got {args.preempt_timeout}")
    if args.resume is not None and args.overwrite:
        raise ConfigError("--resume continues the run in the folder and --overwrite replaces it: give one")
    check_device(args.device)
    if args.world_size is not None and (args.world_size < 1 or (launched and args.world_size != launched)):
        raise ConfigError(f"--world-size {args.world_size} does not match WORLD_SIZE={launched} of the launcher"
                          if launched else f"--world-size must be >= 1, got {args.world_size}")


def _resolve(args: argparse.Namespace, device: str) -> tuple[dict[str, Any], Path, Found | None]:
    """``(cfg, out, found)``: the run's configuration and folder; for ``--resume`` also the
    checkpoint read (a folder's latest good one; refused when its configuration differs from
    the requested one), else None."""
    overrides = {k: getattr(args, k) for k in _OVERRIDES}
    overrides.update(inner=args.inner, init=args.init, outer_schedule=args.outer_schedule, learn_lam=args.learn_lam,
                     gemm_precision=args.gemm_precision)
    if args.resume is None:
        cfg = resolve_config(args.preset or "omniglot-5w1s", overrides)
        return cfg, Path(args.out or Path("runs") / cfg["preset"]), None
    if not (args.resume or args.out):
        raise ConfigError("--resume needs a checkpoint path or --out")
    source = Path(args.resume or args.out)
    found = find_checkpoint(source, map_location=device, check=_resumable)
    saved = checkpoint_config(found.state, found.path)
    requested = resolve_config(args.preset, overrides) if args.preset else apply_overrides(saved, overrides)
    diff = config_diff(saved, requested)
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"{found.path} comes from another configuration ({detail})")
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent)
    return requested, out, found


def _resumable(state: dict[str, Any], path: Path) -> None:
    """What a resume needs besides θ and the configuration (a checkpoint of ``imaml-train``)."""
    missing = [k for k in ("optimizer", "sampler", "torch_rng") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: cannot be resumed (missing {', '.join(missing)})")


def _fall_back(found: Found, out: Path) -> None:
    """Rank 0, the folder locked: one warning naming the checkpoints ``--resume`` skipped and
    why; those of this run folder are set aside (``<name>.damaged``), so that the next
    checkpoints do not rotate them back into the history."""
    message = fallback_warning(found, "resuming from")
    if message is None:
        return
    ours = [p for p, _ in found.skipped if p.parent.resolve() == out.resolve()]
    try:
        aside = [set_aside(p).name for p in ours]
    except OSError as exc:
        raise RunError(f"cannot set the damaged checkpoint aside in {out}: {exc.strerror or exc}") from exc
    if aside:
        message += f" (set aside as {', '.join(aside)})"
    print(f"imaml-train: warning: {message}", file=sys.stderr)


def _report(result: dict[str, Any], rank: int) -> int:
    """The exit status of a run that returned, and (rank 0) its last line."""
    if result["preempted"]:
        if rank == 0:
            print(f"imaml-train: preempted by {result['preempted']}: checkpoint of step {result['step']} in "
                  f"{result['out']}; continue with --resume (exit status {distributed.PREEMPTED})", file=sys.stderr)
        return distributed.PREEMPTED
    if rank:
        return 0
    files = result["files"]
    print(f"run folder: {result['out']} ({', '.join(files)})" if files else f"run folder: {result['out']} (nothing written: no step ran)")
    return 0


def main(argv=None) -> int:
    """``imaml-train``; returns the exit status: 0; 2 with a one-line error on stderr (also when
    the run diverged); 1 when a peer rank of a distributed run failed; 75
    (:data:`~imaml_kernels.trainer.distributed.PREEMPTED`) when a stop signal (SIGTERM, SIGUSR1,
    SIGINT) preempted the run and the step it reached is checkpointed (``--resume`` continues);
    128 + the signal when the launcher of ``--world-size N`` stopped its ranks without such a
    checkpoint (a second signal, ranks past ``--preempt-timeout``). Under torchrun (WORLD_SIZE
    set) this process is one rank; with ``--world-size N`` it spawns N ranks that run
    ``main(argv)`` again."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    launched = distributed.env_world_size()  # set by torchrun or by our own spawn
    world = launched or args.world_size or 1
    rank = int(os.environ.get("RANK", 0)) if launched else 0
    device = args.device
    if launched and launched > 1 and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    dist = run = None
    try:
        _check_args(args, launched)
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg, out, found = _resolve(args, device)
        if cfg["meta_batch"] % world:
            raise ConfigError(
                f"meta-batch {cfg['meta_batch']} is not divisible by the world size {world}: "
                f"each rank takes meta-batch / world-size tasks of every meta-step"
            )
        check_out_dir(out)
        RunFolder(out).check_free(resume=found is not None, overwrite=args.overwrite)
        if world > 1 and not launched:
            return distributed.spawn(main, argv, world, preempt_timeout=args.preempt_timeout)  # each rank runs this main again
        if rank == 0:
            run = RunFolder(out)
            run.lock()  # released in finally, and by the kernel if this process dies
            run.claim(resume=found is not None, overwrite=args.overwrite)
            if found is not None:
                _fall_back(found, out)
        dist = distributed.init(device, args.dist_timeout)
        if rank == 0:
            print(
                "config: " + " ".join(f"{k}={cfg[k]}" for k in cfg)
                + f" device={device} threads={torch.get_num_threads()}"
                + (f" world_size={world}" if world > 1 else ""),
                flush=True,
            )
        result = train(
            cfg, out, device=device, data_root=args.data_root, resume=found and found.state,
            log_every=args.log_every, ckpt_every=args.ckpt_every, eval_batch=args.eval_batch,
            progress=not args.no_progress, dist=dist, max_bad_steps=args.max_bad_steps,
            checkpoint_path=found and found.path, keep_ckpts=args.keep_ckpts, preemption=distributed.Preemption(),
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
    return _report(result, rank)
