"""Seconds per iMAML meta-step: the fused engine, the generic torch.func path, the authors'
released learner (``--official DIR``, see :mod:`bench.official`), the in-repo serial
per-task baseline and (when installed) torchopt's implicit-differentiation iMAML.

Omniglot 5-way 1-shot shapes by default: the paper's conv net (113,221 parameters),
T=32 tasks, 16 inner GD steps, 5 CG iterations, 5 support and 5 query images per task.
Inputs are random images of the right shape (timing does not depend on the data). Every
row runs in fresh worker processes, one per round (:mod:`bench.fresh`).
"""

import sys

import torch

import imaml_kernels as ik
from imaml_kernels.nets import OmniglotConv

from . import fresh
from .baselines import serial_imaml_meta_grad
from .common import markdown_table
from .fresh import Row
from .torchopt_imaml import torchopt_available


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
    "engine-bf16": "imaml_kernels, fused engine, bf16 GEMMs (gemm_precision='bf16')",
    "engine-compiled": "imaml_kernels, fused engine under torch.compile(fullgraph=True)",
    "graph": "imaml_kernels, fused engine, one CUDA graph",
    "batched": "imaml_kernels, generic torch.func path",
    "official": "authors' released learner (aravindr93/imaml_dev, per task)",
    "serial": "serial per-task baseline (in-repo, the learner's algorithm)",
    "torchopt": "torchopt ImplicitMetaGradientModule (per task)",
}

TARGET = 5.0  # issue 14: the fused meta-step at least 5x the authors' learner, same run


def prepare(row, T, way, shot, query, inner_steps, cg_iters, device="cpu", official=None):
    """In a worker (:mod:`bench.fresh_worker`): the model, the tasks and the meta-step of ``row``
    (a key of :data:`LABELS`), ready to time."""
    torch.manual_seed(0)
    model = OmniglotConv(way).to(device)
    theta = dict(model.named_parameters())
    tasks = make_tasks(T, way, shot, query, device)
    kw = dict(lam=2.0, inner_steps=inner_steps, inner_lr=0.1, cg_iters=cg_iters)
    if row == "graph":  # captured here, in the worker that replays it
        from imaml_kernels.graphs import CUDAGraphStep

        graphed = CUDAGraphStep(lambda *b: batched_meta_step(model, theta, b, engine=True, **kw), tasks)
        return lambda: graphed(*tasks)
    if row == "official":
        from .official import OfficialStep

        learner = OfficialStep(official, model, **kw)
        return lambda: learner(tasks)
    if row == "serial":
        return lambda: serial_imaml_meta_grad(model, theta, tasks, cg_tol=0.0, **kw)
    if row == "torchopt":
        from .torchopt_imaml import torchopt_meta_grad

        return lambda: torchopt_meta_grad(model, tasks, **kw)
    if row == "engine-compiled":  # adapt + query loss + backward, traced whole (the first call compiles)
        return compiled_meta_step(model, theta, tasks, **kw)
    if row == "engine-bf16":
        ik.set_gemm_precision("bf16")  # this worker process only
        return lambda: batched_meta_step(model, theta, tasks, engine=True, **kw)
    if row not in ("engine", "batched"):
        raise ValueError(f"unknown meta-step row {row!r}; the rows are {list(LABELS)}")
    return lambda: batched_meta_step(model, theta, tasks, engine=row == "engine", **kw)


def compiled_meta_step(model, theta, tasks, *, lam, inner_steps, inner_lr, cg_iters):
    """One meta-step's work as a user compiles it: ``torch.compile(fullgraph=True)`` of the
    adaptation and the query loss (engine), then the backward (the implicit meta-gradient)."""
    import torch.nn.functional as F

    def loss_of(xs, ys, xq, yq):
        phi = ik.implicit_adapt(model, theta, (xs, ys), lam=lam, inner=ik.GD(inner_steps, inner_lr), cg_iters=cg_iters,
                                engine=True)
        return F.cross_entropy(ik.query_logits(model, phi, xq, engine=True).flatten(0, 1), yq.flatten(), reduction="sum")

    compiled = torch.compile(loss_of, fullgraph=True)
    params = list(theta.values())
    return lambda: torch.autograd.grad(compiled(*tasks), params)


def bf16_available(device="cpu") -> str | None:
    """None where this device has bfloat16 GEMM units, else why the bf16 row is skipped."""
    if torch.device(device).type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bfloat16 support"
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return "this CPU has no bfloat16 units (avx512_bf16 / AMX): a bf16 GEMM would be emulated"
    return None


def make_rows(T=32, way=5, shot=1, query=1, inner_steps=16, cg_iters=5, device="cpu", repeat=3, serial=True, generic=True,
         torchopt=True, official=None, bf16=False, compiled=False):
    """The :class:`~bench.fresh.Row` of each method (the engine first: the ratios' reference)."""
    few = max(1, repeat // 2)
    keys = [("engine", 1, repeat)]
    if bf16:
        keys.append(("engine-bf16", 1, repeat))
    if compiled:  # its warm-up call is the compilation (not timed)
        keys.append(("engine-compiled", 1, repeat))
    if torch.device(device).type == "cuda":
        keys.append(("graph", 2, max(10, repeat)))
    if generic:
        keys.append(("batched", 1, repeat // 2 + 1))
    if official is not None:
        keys.append(("official", 1, few))
    if serial:
        keys.append(("serial", 1, few))
    if torchopt and torchopt_available():
        keys.append(("torchopt", 1, few))
    kw = dict(T=T, way=way, shot=shot, query=query, inner_steps=inner_steps, cg_iters=cg_iters, device=device, official=official)
    return [Row(k, LABELS[k], "bench.meta_step:prepare", {"row": k, **kw}, warmup=w, repeat=n, device=device) for k, w, n in keys]


def run(T=32, way=5, shot=1, query=1, inner_steps=16, cg_iters=5, device="cpu", repeat=3, serial=True, generic=True,
        torchopt=True, official=None, rounds=1, log=None, bf16=False, compiled=False):
    """Rows ``(method, s/step, tasks/s, engine speedup over it, peak MiB)`` and ``{key: seconds}``.

    Every method runs in fresh worker processes, one per round (:mod:`bench.fresh`).
    ``official``: an unpacked aravindr93/imaml_dev checkout (its learner becomes a row; see
    :mod:`bench.official`), or ``None``. Seconds are medians over rounds; ``{key: seconds}``
    also holds ``"spread": {key: (lo, hi)}`` (the min-max over rounds of each per-round ratio
    to the engine), ``"rounds"``, ``"peak": {key: (median, lo, hi)}`` (MiB) and ``"failed":
    {key: reason}`` for the rows not measured.
    """
    if bf16 and bf16_available(device) is not None:
        if log:
            log(f"bf16 GEMM row skipped: {bf16_available(device)}")
        bf16 = False
    measured = fresh.run_rows(make_rows(T, way, shot, query, inner_steps, cg_iters, device, repeat, serial, generic, torchopt,
                                   official, bf16, compiled), rounds=rounds, log=log)
    eng, mem = measured["engine"], fresh.memory_field(device)
    results = {k: m.seconds for k, m in measured.items() if m.ok}
    spread = {k: fresh.ratio(m, eng)[1:] for k, m in measured.items() if m.ok and eng.ok}
    table = []
    for k, m in measured.items():
        if not m.ok:
            table.append((LABELS[k], f"not measured: {m.error}", "", "", ""))
            continue
        table.append((LABELS[k], f"{m.seconds:.3f}", f"{T / m.seconds:.1f}", fresh.ratio_text(fresh.ratio(m, eng), rounds),
                      fresh.stat_text(m.stat(mem), fmt=".0f", rounds=rounds)))
    results.update(spread=spread, rounds=rounds, peak={k: m.stat(mem) for k, m in measured.items() if m.ok},
                   failed={k: m.error for k, m in measured.items() if not m.ok})
    return table, results


def main(args):
    official = getattr(args, "official", None)
    rounds = getattr(args, "rounds", 1)
    table, res = run(T=args.tasks, way=args.way, shot=args.shot, query=args.query, inner_steps=args.inner_steps,
                     cg_iters=args.cg_iters, device=args.device, repeat=args.repeat, serial=not args.no_serial,
                     generic=not args.no_generic, official=official, rounds=rounds,
                     log=lambda m: print(m, file=sys.stderr, flush=True), bf16=getattr(args, "bf16", False),
                     compiled=getattr(args, "compiled", False))
    print(f"\n## iMAML meta-step: OmniglotConv({args.way}), T={args.tasks}, {args.way}-way {args.shot}-shot, "
          f"{args.inner_steps} inner GD steps, {args.cg_iters} CG iterations, {args.device}\n")
    print(fresh.method(rounds, "seconds per meta-step") + " " + fresh.memory_note(args.device) + "\n")
    print(markdown_table(HEADER, table))
    print()
    print(summary(res))
    return table


HEADER = ("method", "s / meta-step", "tasks / s", "fused engine speedup over it", "peak MiB")


def summary(res):
    """The printed ratios (and targets) of a run."""
    spread = res.get("spread", {})
    rounds = res.get("rounds", 1)
    failed = res.get("failed", {})
    if "engine" not in res:
        return f"fused engine: not measured: {failed.get('engine')}"

    def ratio(k):
        text = f"{res[k] / res['engine']:.2f}x"
        if rounds > 1 and k in spread:
            text += f" (min {spread[k][0]:.2f}x, max {spread[k][1]:.2f}x over {rounds} rounds)"
        return text

    lines = [f"fused engine: {res['engine']:.3f} s / meta-step"]
    if "graph" in res:
        lines.append(f"one CUDA graph: {res['graph'] * 1e3:.2f} ms / meta-step ({res['engine'] / res['graph']:.2f}x the eager engine)")
    if "engine-bf16" in res:
        lines.append(f"bf16 GEMMs: {res['engine-bf16']:.3f} s / meta-step, {res['engine'] / res['engine-bf16']:.2f}x the float32 engine"
                     + (f" (min {1 / spread['engine-bf16'][1]:.2f}x, max {1 / spread['engine-bf16'][0]:.2f}x over {rounds} rounds)"
                        if rounds > 1 and "engine-bf16" in spread else ""))
    if "engine-compiled" in res:
        lines.append(f"torch.compile(fullgraph=True): {res['engine-compiled']:.3f} s / meta-step after its compilation, "
                     f"{res['engine'] / res['engine-compiled']:.2f}x the eager engine")
    for k in ("official", "batched", "serial", "torchopt"):
        if k in res:
            lines.append(f"engine speedup over {LABELS[k]}: {ratio(k)}")
        elif k in failed:
            lines.append(f"{LABELS[k]}: not measured: {failed[k]}")
    if "official" in res:
        worst = spread.get("official", (res["official"] / res["engine"],))[0]
        verdict = "met" if worst >= TARGET else "NOT met"
        lines.append(f"target: >= {TARGET:.0f}x the authors' learner in every round: {verdict} (worst round {worst:.2f}x)")
    elif "official" not in failed:
        lines.append("authors' released learner: not measured (give --official DIR, an unpacked aravindr93/imaml_dev checkout)")
    if "torchopt" not in res and "torchopt" not in failed:
        lines.append("torchopt: not installed, not measured (pip install -r requirements-bench.txt to add it)")
    return "\n".join(lines)
