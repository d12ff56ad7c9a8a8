"""Meta-test evaluation: :func:`evaluate` (also the trainer's last step) and
``imaml-eval CHECKPOINT`` (the network, samplers and solver come from
:mod:`imaml_kernels.trainer.builders`).

Protocol (the paper's): a fixed, seeded set of meta-test tasks (600 by default) from the
held-out classes; on each task the inner solver adapts θ to the support set (the proximal
problem with the training λ, no meta-gradient) and the adapted network is scored on the
query set. The result is the mean task accuracy ± the 95% interval ``1.96·std/√n``.

Example::

    $ imaml-eval runs/omniglot-5w1s-demo/ckpt.pt --tasks 600
    meta-test accuracy: 92.41% ± 0.73% (95% CI, 600 tasks of 5-way 1-shot, 15 query, inner gd, seed 0)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from .._atomic import folder_problem, write_text
from ..engine import gemm_precision
from ..implicit import implicit_adapt
from ..inner import SGDThenPullBack
from ..query import query_logits
from . import builders
from ._cli_util import check_device, one_line
from .checkpoint import CheckpointError, check_model_state, checkpoint_config, fallback_warning, find_checkpoint
from .lam import LearnedLam
from .presets import INNER_SOLVERS, ConfigError, apply_overrides

__all__ = ["check_destination", "describe", "evaluate", "main", "mean_ci95", "write_json"]


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the 95% half-width ``1.96·std/√n`` (sample std; 0 for n = 1)."""
    v = values.double()
    n = v.numel()
    std = v.std(unbiased=True).item() if n > 1 else 0.0
    return v.mean().item(), 1.96 * std / math.sqrt(n)


# ------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    sampler,
    cfg: Mapping[str, Any],
    *,
    tasks: int = 600,
    seed: int = 0,
    batch: int = 50,
    solver=None,
    lam=None,
) -> dict[str, Any]:
    """Adapt the model's parameters (θ) to ``tasks`` fixed meta-test tasks and score them.

    Args:
        model: the network holding θ (not modified).
        sampler: the meta-test :class:`~imaml_kernels.data.TaskSampler`; its training
            stream is untouched (``eval_tasks`` uses its own seeded generator).
        cfg: the run's configuration (``lam`` and the inner solver settings).
        tasks, seed, batch: how many tasks, which, and how many adapted at once (the
            tasks do not depend on ``batch``).
        solver: inner solver; default :func:`~imaml_kernels.trainer.builders.build_solver` of ``cfg``.
        lam: λ of the inner problem; default ``cfg["lam"]``. A run that learned λ
            (``--learn-lam``) passes what it learned (:meth:`LearnedLam.current`): a tensor, or
            ``{layer: λ}`` per layer.

    Returns:
        ``{"accuracy": mean, "ci95": half-width, "tasks": n, "per_task": [n] list, "seconds"}``
        with accuracies as fractions in [0, 1].

    Example::

        >>> r = evaluate(model, test_sampler, cfg, tasks=600)
        >>> print(f"{100 * r['accuracy']:.2f}% ± {100 * r['ci95']:.2f}%")
    """
    solver = solver or builders.build_solver(cfg)
    lam = float(cfg["lam"]) if lam is None else lam
    theta = {k: v.detach() for k, v in model.named_parameters()}
    t0 = time.perf_counter()
    accs = []
    for x_s, y_s, x_q, y_q in sampler.eval_tasks(tasks, batch, seed=seed):
        # θ detached, under no_grad: the op runs the inner solve only (no backward machinery).
        phi = implicit_adapt(model, theta, (x_s, y_s), lam=lam, inner=solver)
        accs.append((query_logits(model, phi, x_q).argmax(-1) == y_q).float().mean(1))
    per_task = torch.cat(accs).cpu()
    acc, ci = mean_ci95(per_task)
    return {
        "accuracy": acc,
        "ci95": ci,
        "tasks": per_task.numel(),
        "per_task": per_task.tolist(),
        "seconds": time.perf_counter() - t0,
    }


def describe(result: Mapping[str, Any], cfg: Mapping[str, Any], seed: int, inner: str) -> str:
    """One line: ``accuracy ± CI (95% CI, n tasks of W-way K-shot, ...)``."""
    return (
        f"meta-test accuracy: {100 * result['accuracy']:.2f}% ± {100 * result['ci95']:.2f}% "
        f"(95% CI, {result['tasks']} tasks of {cfg['way']}-way {cfg['shot']}-shot, {cfg['query']} query, "
        f"inner {inner}, seed {seed}, {result['seconds']:.1f} s)"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imaml-eval",
        description="Evaluate an imaml-train checkpoint on fixed meta-test tasks: "
        "mean query accuracy ± 95% confidence interval (1.96·std/√n).",
    )
    p.add_argument("checkpoint", help="checkpoint file, or a run folder: its latest good checkpoint (ckpt.pt, else "
                   "ckpt.1.pt, ...: one warning names each one skipped)")
    p.add_argument("--tasks", type=int, default=600, help="meta-test tasks (default: 600, the paper's protocol)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fixed task set (default: 0)")
    p.add_argument("--inner", choices=INNER_SOLVERS, help="inner solver (default: the checkpoint's)")
    p.add_argument("--protocol", choices=("run", "released"), default="run",
                   help="run: adapt with the run's inner solver (default); released: the authors' released "
                   "evaluation (measure_accuracy.py --n_steps 16 --lam 0.0 --inner_lr 0.1): plain SGD steps on the "
                   "support loss, no proximal term, no pull-back (--inner-steps / --inner-lr override 16 / 0.1)")
    p.add_argument("--inner-steps", type=int, help="GD / SGD steps (default: the checkpoint's; 16 with --protocol released)")
    p.add_argument("--inner-lr", type=float, help="GD / SGD step size (default: the checkpoint's; 0.1 with --protocol released)")
    p.add_argument("--hf-steps", type=int, help="Hessian-Free steps (default: the checkpoint's)")
    p.add_argument("--batch", type=int, default=50, help="tasks adapted at once (default: 50)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--data-root", help="data folder (default: $IMAML_DATA, else the user cache)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="where to write the result (default: eval_seed<S>_<n>.json next to the checkpoint)")
    return p


def check_destination(path: Path, flag: str | None = "--json") -> None:
    """Fail before any work where the result cannot be written to ``path``: a folder there, a
    parent that is a file, or a nearest existing folder that is not writable
    (:func:`~imaml_kernels._atomic.write_text` creates missing folders). ``flag`` is the option
    that chose ``path`` (None: the default next to the checkpoint); the message names it."""

    def fail(reason: str) -> None:
        if flag:
            raise ConfigError(f"{flag} {path}: {reason}")
        raise ConfigError(f"cannot write the result to {path}: {reason}; pass --json PATH")

    if path.is_dir():
        fail("is a folder, not a file")
    problem = folder_problem(path.parent)
    if problem:
        fail(problem)


def main(argv=None) -> int:
    """``imaml-eval``; returns the exit status (0, or 2 with a one-line error).

    Everything is checked before any data is loaded or any task adapted: the arguments, the
    device, where the result goes, the checkpoint (finite, config complete, model matching).
    """
    args = _parser().parse_args(argv)
    try:
        for flag, value in (("--tasks", args.tasks), ("--batch", args.batch), ("--threads", args.threads)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        device = check_device(args.device)
        if args.json:
            check_destination(Path(args.json), "--json")
        found = find_checkpoint(args.checkpoint)
        state, ckpt_path = found.state, found.path
        saved = checkpoint_config(state, ckpt_path)
        if args.protocol == "released" and args.inner is not None:
            raise ConfigError("--protocol released sets the inner solver (plain SGD); drop --inner")
        cfg = apply_overrides(saved, {"inner": args.inner, "inner_steps": args.inner_steps, "inner_lr": args.inner_lr,
                                      "hf_steps": args.hf_steps})
        solver, inner_name = None, cfg["inner"]
        if args.protocol == "released":
            steps = 16 if args.inner_steps is None else args.inner_steps
            lr = 0.1 if args.inner_lr is None else args.inner_lr
            solver = SGDThenPullBack(steps, lr, pull_back=False)
            inner_name = f"sgd ({steps} steps, lr {lr}, no proximal term: the released evaluation)"
        out = Path(args.json) if args.json else ckpt_path.parent / f"eval_seed{args.seed}_{args.tasks}.json"
        if not args.json:
            check_destination(out, None)
        if args.threads:
            torch.set_num_threads(args.threads)
        model = builders.build_model(cfg)
        check_model_state(model, state["model"], ckpt_path)
        model = model.to(device)
        if found.skipped:
            print(f"imaml-eval: warning: {fallback_warning(found, 'evaluating')}", file=sys.stderr)
        # A run that learned λ is evaluated at the λ it learned (the checkpoint's log λ).
        learned = LearnedLam(cfg, model, device)
        learned.load(state.get("lam"), ckpt_path)
        _, test = builders.build_samplers(cfg, device, args.data_root)
        with gemm_precision(cfg.get("gemm_precision", "fp32")):  # as the run trained
            result = evaluate(model, test, cfg, tasks=args.tasks, seed=args.seed, batch=args.batch, solver=solver,
                              lam=learned.current() if learned.learned else None)
    except (ConfigError, CheckpointError, builders.DataError) as exc:
        print(f"imaml-eval: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(describe(result, cfg, args.seed, inner_name))
    try:
        record = {"checkpoint": str(ckpt_path), "step": state["step"], "seed": args.seed, "protocol": args.protocol,
                  "inner": inner_name, "config": cfg}
        write_json(out, {**record, **result})
    except OSError as exc:
        reason = exc.strerror or one_line(exc) or type(exc).__name__
        print(f"imaml-eval: error: cannot write the result to {out}: {reason}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (:func:`imaml_kernels._atomic.write_text`)."""
    write_text(path, json.dumps(obj, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
