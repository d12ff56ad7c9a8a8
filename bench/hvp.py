"""Batched Hessian-vector products at the paper's shapes: the fused engine
(``net.hvp``: one primal pass + the tangent passes; and a CG-style HVP that reuses a cached
linearisation), the package's generic torch.func vmap path (``imaml_kernels.batched_hvp``)
and a per-task double-backward loop (public-code style).

FLOPs are counted with ``torch.utils.flop_counter`` on one task's reference forward-over-
reverse HVP, times T; every GFLOP/s column divides that same count (so the cached HVP's
column is an effective rate), printed beside the machine's measured float32 GEMM rate.
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

import imaml_kernels as ik
from imaml_kernels.nets import MiniImagenetConv, OmniglotConv

from .common import gemm_rate, markdown_table, time_fn

# name -> (network factory, T, support images per task, image shape)
SHAPES = {
    "omniglot-5w1s": (lambda: OmniglotConv(5), 32, 5, (1, 28, 28)),
    "omniglot-20w1s": (lambda: OmniglotConv(20), 16, 20, (1, 28, 28)),
    "miniimagenet-5w1s": (lambda: MiniImagenetConv(5), 4, 5, (3, 84, 84)),
}


def _setup(name, device, T=None):
    make, T0, n, shape = SHAPES[name]
    T = T or T0
    torch.manual_seed(0)
    model = make().to(device)
    way = model.way
    x = torch.rand(T, n, *shape, device=device)
    y = torch.arange(n, device=device).remainder(way).expand(T, -1).contiguous()
    params = {k: v.detach().unsqueeze(0).repeat(T, *([1] * v.dim())) for k, v in model.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}
    return model, params, v, x, y


def run(names=tuple(SHAPES), device="cpu", repeat=5, T=None, per_task=True):
    rows, raw = [], {}
    for name in names:
        model, params, v, x, y = _setup(name, device, T)
        net = model.batched()
        flat_p, flat_v = net.layout.flatten(params), net.layout.flatten(v)

        def loss_fn(p, xb, yb):
            return F.cross_entropy(functional_call(model, p, (xb,)), yb)

        vmap_path = lambda: ik.batched_hvp(loss_fn, params, v, x, y)  # noqa: E731
        # Count one task's forward-over-reverse HVP unbatched, times T: under vmap the
        # convolutions become grouped ones, which the counter over-counts by the group count.
        p0 = {k: params[k][0] for k in params}
        v0 = {k: v[k][0] for k in params}
        with FlopCounterMode(display=False) as fc:
            torch.func.jvp(lambda q: torch.func.grad(loss_fn)(q, x[0], y[0]), (p0,), (v0,))
        flops = fc.get_total_flops() * x.shape[0]

        def serial():
            out = []
            for t in range(x.shape[0]):
                p = {k: params[k][t].clone().requires_grad_() for k in params}
                g = torch.autograd.grad(loss_fn(p, x[t], y[t]), list(p.values()), create_graph=True)
                out.append(torch.autograd.grad(g, list(p.values()), [v[k][t] for k in params]))
            return out

        t_engine = time_fn(lambda: net.hvp(flat_p, flat_v, x, y), device=device, warmup=1, repeat=repeat)[0]
        lin = net.linearize(flat_p, x, y)
        t_cached = time_fn(lambda: lin.hvp(flat_v), device=device, warmup=1, repeat=repeat)[0]
        t_vmap = time_fn(vmap_path, device=device, warmup=1, repeat=repeat)[0]
        t_serial = time_fn(serial, device=device, warmup=1, repeat=max(1, repeat // 2))[0] if per_task else float("nan")
        T_ = x.shape[0]
        raw[name] = {"engine": t_engine, "engine_cached": t_cached, "vmap": t_vmap, "serial": t_serial, "flops": flops, "T": T_}
        gf = lambda t: f"{flops / t / 1e9:.1f}"  # noqa: E731
        rows.append((
            name, T_, f"{t_engine * 1e3:.1f}", f"{t_cached * 1e3:.1f}", f"{t_vmap * 1e3:.1f}", f"{t_serial * 1e3:.1f}",
            gf(t_engine), gf(t_vmap), f"{t_vmap / t_engine:.2f}x", f"{t_vmap / t_cached:.2f}x", f"{t_serial / t_engine:.2f}x",
        ))
    return rows, raw


HEADER = (
    "shape", "T", "engine ms", "engine cached-lin ms", "torch.func vmap ms", "per-task double backward ms",
    "engine GFLOP/s", "vmap GFLOP/s", "engine vs vmap", "cached vs vmap", "engine vs per-task",
)


def main(args):
    names = args.shapes or list(SHAPES)
    rows, raw = run(names, device=args.device, repeat=args.repeat, T=args.tasks)
    print(f"\n## Batched HVP (all T tasks), {args.device}\n")
    print(markdown_table(HEADER, rows))
    print(f"\nmeasured float32 GEMM rate (1024^3): {gemm_rate(args.device):.1f} GFLOP/s")
    if "omniglot-5w1s" in raw:
        r = raw["omniglot-5w1s"]
        print(f"engine / vmap at omniglot-5w1s: {r['vmap'] / r['engine']:.2f}x (cached linearisation "
              f"{r['vmap'] / r['engine_cached']:.2f}x; target >= 3x on this CPU)")
    return rows
