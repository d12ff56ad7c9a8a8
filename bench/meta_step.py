"""Seconds per iMAML meta-step: the batched op vs the serial per-task baseline.

Omniglot 5-way 1-shot shapes by default: the paper's conv net (113,221 parameters),
T=32 tasks, 16 inner GD steps, 5 CG iterations, 5 support and 5 query images per task.
Inputs are random images of the right shape (timing does not depend on the data).
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

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


def batched_meta_step(model, theta, tasks, *, lam, inner_steps, inner_lr, cg_iters):
    xs, ys, xq, yq = tasks
    for v in theta.values():
        v.grad = None
    phi = ik.implicit_adapt(model, theta, (xs, ys), lam=lam, inner=ik.GD(inner_steps, inner_lr), cg_iters=cg_iters)
    loss = vmap(lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y))(dict(phi), xq, yq)
    loss.sum().backward()
    return {k: v.grad for k, v in theta.items()}


def run(T=32, way=5, shot=1, query=1, inner_steps=16, cg_iters=5, device="cpu", repeat=3, serial=True):
    torch.manual_seed(0)
    model = OmniglotConv(way).to(device)
    theta = dict(model.named_parameters())
    tasks = make_tasks(T, way, shot, query, device)
    kw = dict(lam=2.0, inner_steps=inner_steps, inner_lr=0.1, cg_iters=cg_iters)
    t_batched = time_fn(lambda: batched_meta_step(model, theta, tasks, **kw), device=device, warmup=1, repeat=repeat)
    rows = [("imaml_kernels (batched, generic torch.func path)", f"{t_batched[0]:.3f}", f"{T / t_batched[0]:.1f}", "1.00x")]
    results = {"batched": t_batched[0]}
    if serial:
        t_serial = time_fn(lambda: serial_imaml_meta_grad(model, theta, tasks, cg_tol=0.0, **kw), device=device, warmup=0, repeat=max(1, repeat // 2))
        results["serial"] = t_serial[0]
        rows.append(("serial per-task baseline (public-code style)", f"{t_serial[0]:.3f}", f"{T / t_serial[0]:.1f}", f"{t_batched[0] / t_serial[0]:.2f}x"))
    return rows, results


def main(args):
    rows, res = run(T=args.tasks, way=args.way, shot=args.shot, query=args.query, inner_steps=args.inner_steps,
                    cg_iters=args.cg_iters, device=args.device, repeat=args.repeat, serial=not args.no_serial)
    print(f"\n## iMAML meta-step: OmniglotConv({args.way}), T={args.tasks}, {args.way}-way {args.shot}-shot, "
          f"{args.inner_steps} inner GD steps, {args.cg_iters} CG iterations, {args.device}\n")
    print(markdown_table(("method", "s / meta-step", "tasks / s", "speed vs batched"), rows))
    if "serial" in res:
        print(f"\nbatched / serial speedup: {res['serial'] / res['batched']:.2f}x (target >= 2x on CPU)")
    return rows
