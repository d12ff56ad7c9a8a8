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

from . import fresh
from .common import gemm_rate, markdown_table
from .fresh import Row

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


def _loss_fn(model):
    def loss_fn(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    return loss_fn


def prepare(shape, method, T=None, device="cpu"):
    """In a worker (:mod:`bench.fresh_worker`): all T tasks' HVPs at ``shape`` by ``method``:
    ``engine`` (``net.hvp``), ``engine_cached`` (``hvp`` of a linearisation made here, as CG
    does), ``vmap`` (``ik.batched_hvp``) or ``serial`` (per-task double backward)."""
    model, params, v, x, y = _setup(shape, device, T)
    loss_fn = _loss_fn(model)
    if method in ("engine", "engine_cached"):
        net = model.batched()
        flat_p, flat_v = net.layout.flatten(params), net.layout.flatten(v)
        if method == "engine":
            return lambda: net.hvp(flat_p, flat_v, x, y)
        lin = net.linearize(flat_p, x, y)
        return lambda: lin.hvp(flat_v)
    if method == "vmap":
        return lambda: ik.batched_hvp(loss_fn, params, v, x, y)
    if method != "serial":
        raise ValueError(f"unknown HVP method {method!r}")

    def serial():
        out = []
        for t in range(x.shape[0]):
            p = {k: params[k][t].clone().requires_grad_() for k in params}
            g = torch.autograd.grad(loss_fn(p, x[t], y[t]), list(p.values()), create_graph=True)
            out.append(torch.autograd.grad(g, list(p.values()), [v[k][t] for k in params]))
        return out

    return serial


def count_flops(name, T=None):
    """One task's reference forward-over-reverse HVP counted unbatched, times T (under vmap
    the convolutions become grouped ones, which the counter over-counts by the group count)."""
    model, params, v, x, y = _setup(name, "cpu", T)
    p0 = {k: params[k][0] for k in params}
    v0 = {k: v[k][0] for k in params}
    loss_fn = _loss_fn(model)
    with FlopCounterMode(display=False) as fc:
        torch.func.jvp(lambda q: torch.func.grad(loss_fn)(q, x[0], y[0]), (p0,), (v0,))
    return fc.get_total_flops() * x.shape[0], x.shape[0]


METHODS = ("engine", "engine_cached", "vmap", "serial")


def run(names=tuple(SHAPES), device="cpu", repeat=5, T=None, per_task=True, rounds=1):
    """Per shape, each method in fresh worker processes (:mod:`bench.fresh`): table rows and
    ``{shape: {method: seconds, "flops", "T"}}`` (NaN for a method not measured; ``serial`` is
    skipped without ``per_task``)."""
    rows, raw = [], {}
    methods = METHODS if per_task else METHODS[:-1]
    for name in names:
        flops, T_ = count_flops(name, T)
        specs = [Row(m, f"{name}: {m}", "bench.hvp:prepare", {"shape": name, "method": m, "T": T, "device": device}, warmup=1,
                     repeat=max(1, repeat // 2) if m == "serial" else repeat, device=device) for m in methods]
        measured = fresh.run_rows(specs, rounds=rounds)
        raw[name] = {**{m: measured[m].seconds if m in measured and measured[m].ok else float("nan") for m in METHODS},
                     "flops": flops, "T": T_}
        rows.append(_table_row(name, T_, flops, measured, rounds))
    return rows, raw


def _table_row(name, T, flops, measured, rounds):
    def ms(m):
        if m not in measured:
            return "-"
        return f"{measured[m].seconds * 1e3:.1f}" if measured[m].ok else f"not measured: {measured[m].error}"

    def gflops(m):
        return f"{flops / measured[m].seconds / 1e9:.1f}" if measured[m].ok else "-"

    def vs(a, b):
        return fresh.ratio_text(fresh.ratio(measured[a], measured[b]), rounds) if a in measured else "-"

    return (name, T, *map(ms, METHODS), gflops("engine"), gflops("vmap"), vs("vmap", "engine"), vs("vmap", "engine_cached"),
            vs("serial", "engine"))


HEADER = (
    "shape", "T", "engine ms", "engine cached-lin ms", "torch.func vmap ms", "per-task double backward ms",
    "engine GFLOP/s", "vmap GFLOP/s", "engine vs vmap", "cached vs vmap", "engine vs per-task",
)


def main(args):
    names = args.shapes or list(SHAPES)
    rounds = getattr(args, "rounds", 1)
    rows, raw = run(names, device=args.device, repeat=args.repeat, T=args.tasks, rounds=rounds)
    print(f"\n## Batched HVP (all T tasks), {args.device}\n")
    print(fresh.method(rounds, "milliseconds per batched HVP") + "\n")
    print(markdown_table(HEADER, rows))
    print(f"\nmeasured float32 GEMM rate (1024^3): {gemm_rate(args.device):.1f} GFLOP/s")
    if "omniglot-5w1s" in raw:
        r = raw["omniglot-5w1s"]
        print(f"engine / vmap at omniglot-5w1s: {r['vmap'] / r['engine']:.2f}x (cached linearisation "
              f"{r['vmap'] / r['engine_cached']:.2f}x; target >= 3x on this CPU)")
    return rows
