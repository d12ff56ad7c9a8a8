"""Seconds per iMAML meta-step: the fused engine, the generic torch.func path, the serial
per-task baseline and (when installed) torchopt's implicit-differentiation iMAML.

Omniglot 5-way 1-shot shapes by default: the paper's conv net (113,221 parameters),
T=32 tasks, 16 inner GD steps, 5 CG iterations, 5 support and 5 query images per task.
Inputs are random images of the right shape (timing does not depend on the data).
"""

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
    "serial": "serial per-task baseline (public-code style)",
    "torchopt": "torchopt ImplicitMetaGradientModule (per task)",
}


def run(T=32, way=5, shot=1, query=1, inner_steps=16, cg_iters=5, device="cpu", repeat=3, serial=True, generic=True,
        torchopt=True):
    """Rows ``(method, s/step, tasks/s, engine speedup over it)`` and ``{key: seconds}``."""
    torch.manual_seed(0)
    model = OmniglotConv(way).to(device)
    theta = dict(model.named_parameters())
    tasks = make_tasks(T, way, shot, query, device)
    kw = dict(lam=2.0, inner_steps=inner_steps, inner_lr=0.1, cg_iters=cg_iters)
    results = {"engine": time_fn(lambda: batched_meta_step(model, theta, tasks, engine=True, **kw), device=device, warmup=1, repeat=repeat)[0]}
    if torch.device(device).type == "cuda":
        from imaml_kernels.graphs import CUDAGraphStep

        graphed = CUDAGraphStep(lambda *b: batched_meta_step(model, theta, b, engine=True, **kw), tasks)
        results["graph"] = time_fn(lambda: graphed(*tasks), device=device, warmup=2, repeat=max(10, repeat))[0]
    if generic:
        results["batched"] = time_fn(lambda: batched_meta_step(model, theta, tasks, engine=False, **kw), device=device, warmup=1, repeat=max(1, repeat // 2 + 1))[0]
    if serial:
        results["serial"] = time_fn(lambda: serial_imaml_meta_grad(model, theta, tasks, cg_tol=0.0, **kw), device=device, warmup=0, repeat=max(1, repeat // 2))[0]
    if torchopt and torchopt_available():
        from .torchopt_imaml import torchopt_meta_grad

        results["torchopt"] = time_fn(lambda: torchopt_meta_grad(model, tasks, **kw), device=device, warmup=0, repeat=max(1, repeat // 2))[0]
    e = results["engine"]
    rows = [(LABELS[k], f"{s:.3f}", f"{T / s:.1f}", f"{s / e:.2f}x") for k, s in results.items()]
    return rows, results


def torchopt_available():
    try:
        import torchopt  # noqa: F401

        return True
    except ImportError:
        return False


def main(args):
    rows, res = run(T=args.tasks, way=args.way, shot=args.shot, query=args.query, inner_steps=args.inner_steps,
                    cg_iters=args.cg_iters, device=args.device, repeat=args.repeat, serial=not args.no_serial,
                    generic=not args.no_generic)
    print(f"\n## iMAML meta-step: OmniglotConv({args.way}), T={args.tasks}, {args.way}-way {args.shot}-shot, "
          f"{args.inner_steps} inner GD steps, {args.cg_iters} CG iterations, {args.device}\n")
    print(markdown_table(HEADER, rows))
    print()
    print(summary(res))
    return rows


HEADER = ("method", "s / meta-step", "tasks / s", "fused engine speedup over it")


def summary(res):
    """The printed ratios (and targets) of a run."""
    lines = [f"fused engine: {res['engine']:.3f} s / meta-step"]
    if "graph" in res:
        lines.append(f"one CUDA graph: {res['graph'] * 1e3:.2f} ms / meta-step ({res['engine'] / res['graph']:.2f}x the eager engine)")
    for k in ("batched", "serial", "torchopt"):
        if k in res:
            lines.append(f"engine speedup over {LABELS[k]}: {res[k] / res['engine']:.2f}x")
    if "torchopt" not in res:
        lines.append("torchopt: not installed, not measured (pip install -r requirements-bench.txt to add it)")
    return "\n".join(lines)
