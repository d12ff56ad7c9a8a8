"""Seconds per iMAML meta-step: the fused engine, the generic torch.func path, the authors'
released learner (``--official DIR``, see :mod:`bench.official`), the in-repo serial
per-task baseline and (when installed) torchopt's implicit-differentiation iMAML.

Omniglot 5-way 1-shot shapes by default: the paper's conv net (113,221 parameters),
T=32 tasks, 16 inner GD steps, 5 CG iterations, 5 support and 5 query images per task.
Inputs are random images of the right shape (timing does not depend on the data).
"""

import statistics
import sys

import torch

import imaml_kernels as ik
from imaml_kernels.nets import OmniglotConv

from .baselines import serial_imaml_meta_grad
from .common import markdown_table, time_fn


def make_tasks(T, way, shot, query, device="cpu", image=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(T, way * shot, 1, image, image, generator=g).to(device)
    xq = torch.rand(T, way * query, 1, image, image, generator=g).to(device)
    ys = torch.arange(way).repeat_interleave(shot).expand(T, -1).contiguous().to(device)
    yq = torch.arange(way).repeat_interleave(query).expand(T, -1).contiguous().to(device)
    return xs, ys, xq, yq


def batched_meta_step(model, theta, tasks, *, lam, inner_steps, inner_lr, cg_iters, engine=None):
    """Sum over tasks of the implicit meta-gradients, all tasks at once (``engine``: as in
    :func:`imaml_kernels.implicit_adapt`; ``False`` = the generic torch.func path)."""
    xs, ys, xq, yq = tasks
    g, _ = ik.implicit_meta_grad(
        model, theta, (xs, ys), (xq, yq), lam=lam, inner=ik.GD(inner_steps, inner_lr), cg_iters=cg_iters, engine=engine
    )
    return g


LABELS = {
    "engine": "imaml_kernels, fused engine",
    "graph": "imaml_kernels, fused engine, one CUDA graph",
    "batched": "imaml_kernels, generic torch.func path",
    "official": "authors' released learner (aravindr93/imaml_dev, per task)",
    "serial": "serial per-task baseline (in-repo, the learner's algorithm)",
    "torchopt": "torchopt ImplicitMetaGradientModule (per task)",
}

TARGET = 5.0  # issue 14: the fused meta-step at least 5x the authors' learner, same run


def run(T=32, way=5, shot=1, query=1, inner_steps=16, cg_iters=5, device="cpu", repeat=3, serial=True, generic=True,
        torchopt=True, official=None, rounds=1, log=None):
    """Rows ``(method, s/step, tasks/s, engine speedup over it)`` and ``{key: seconds}``.

    ``official``: an unpacked aravindr93/imaml_dev checkout (its learner becomes a row; see
    :mod:`bench.official`), or ``None``. ``rounds``: every method is timed once per round,
    in turn, so each round's ratios come from one stretch of the machine's (noisy) time;
    seconds are the median over rounds and each ratio's min–max over rounds is kept
    (``{key: seconds}`` then also holds ``"spread": {key: (lo, hi)}`` and ``"rounds"``).
    """
    torch.manual_seed(0)
    model = OmniglotConv(way).to(device)
    theta = dict(model.named_parameters())
    tasks = make_tasks(T, way, shot, query, device)
    kw = dict(lam=2.0, inner_steps=inner_steps, inner_lr=0.1, cg_iters=cg_iters)
    few = max(1, repeat // 2)
    methods = {"engine": (lambda: batched_meta_step(model, theta, tasks, engine=True, **kw), 1, repeat)}
    if torch.device(device).type == "cuda":
        from imaml_kernels.graphs import CUDAGraphStep

        graphed = CUDAGraphStep(lambda *b: batched_meta_step(model, theta, b, engine=True, **kw), tasks)
        methods["graph"] = (lambda: graphed(*tasks), 2, max(10, repeat))
    if generic:
        methods["batched"] = (lambda: batched_meta_step(model, theta, tasks, engine=False, **kw), 1, repeat // 2 + 1)
    if official is not None:
        from .official import OfficialStep

        learner = OfficialStep(official, model, **kw)
        methods["official"] = (lambda: learner(tasks), 1, few)
    if serial:
        methods["serial"] = (lambda: serial_imaml_meta_grad(model, theta, tasks, cg_tol=0.0, **kw), 1, few)
    if torchopt and torchopt_available():
        from .torchopt_imaml import torchopt_meta_grad

        methods["torchopt"] = (lambda: torchopt_meta_grad(model, tasks, **kw), 0, few)
    per_round = []
    for r in range(rounds):
        res = {}
        for key, (fn, warmup, reps) in methods.items():
            res[key] = time_fn(fn, device=device, warmup=warmup if r == 0 else 0, repeat=reps)[0]
            if log:
                log(f"round {r + 1}/{rounds}: {LABELS[key]}: {res[key]:.3f} s")
        per_round.append(res)
    results = {k: statistics.median(r[k] for r in per_round) for k in methods}
    spread = {k: (min(r[k] / r["engine"] for r in per_round), max(r[k] / r["engine"] for r in per_round)) for k in methods}
    e = results["engine"]
    rows = []
    for k, sec in results.items():
        ratio = f"{sec / e:.2f}x"
        if rounds > 1 and k != "engine":
            ratio += f" ({spread[k][0]:.2f}-{spread[k][1]:.2f})"
        rows.append((LABELS[k], f"{sec:.3f}", f"{T / sec:.1f}", ratio))
    if rounds > 1:
        results["spread"], results["rounds"] = spread, rounds
    return rows, results


def torchopt_available():
    try:
        import torchopt  # noqa: F401

        return True
    except ImportError:
        return False


def main(args):
    official = getattr(args, "official", None)
    rows, res = run(T=args.tasks, way=args.way, shot=args.shot, query=args.query, inner_steps=args.inner_steps,
                    cg_iters=args.cg_iters, device=args.device, repeat=args.repeat, serial=not args.no_serial,
                    generic=not args.no_generic, official=official, rounds=getattr(args, "rounds", 1),
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"\n## iMAML meta-step: OmniglotConv({args.way}), T={args.tasks}, {args.way}-way {args.shot}-shot, "
          f"{args.inner_steps} inner GD steps, {args.cg_iters} CG iterations, {args.device}\n")
    print(markdown_table(HEADER, rows))
    print()
    print(summary(res))
    return rows


HEADER = ("method", "s / meta-step", "tasks / s", "fused engine speedup over it")


def summary(res):
    """The printed ratios (and targets) of a run."""
    spread = res.get("spread", {})
    rounds = res.get("rounds", 1)

    def ratio(k):
        text = f"{res[k] / res['engine']:.2f}x"
        if k in spread:
            text += f" (min {spread[k][0]:.2f}x, max {spread[k][1]:.2f}x over {rounds} rounds)"
        return text

    lines = [f"fused engine: {res['engine']:.3f} s / meta-step"]
    if "graph" in res:
        lines.append(f"one CUDA graph: {res['graph'] * 1e3:.2f} ms / meta-step ({res['engine'] / res['graph']:.2f}x the eager engine)")
    for k in ("official", "batched", "serial", "torchopt"):
        if k in res:
            lines.append(f"engine speedup over {LABELS[k]}: {ratio(k)}")
    if "official" in res:
        worst = spread.get("official", (res["official"] / res["engine"],))[0]
        verdict = "met" if worst >= TARGET else "NOT met"
        lines.append(f"target: >= {TARGET:.0f}x the authors' learner in every round: {verdict} (worst round {worst:.2f}x)")
    else:
        lines.append("authors' released learner: not measured (give --official DIR, an unpacked aravindr93/imaml_dev checkout)")
    if "torchopt" not in res:
        lines.append("torchopt: not installed, not measured (pip install -r requirements-bench.txt to add it)")
    return "\n".join(lines)
