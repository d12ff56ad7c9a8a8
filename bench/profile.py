"""``python -m bench profile``: where one fused meta-step's time goes, by kind of work and by
stage, with the GEMMs' achieved GFLOP/s against this machine's measured GEMM rate.

The meta-step is :func:`bench.meta_step.batched_meta_step` at the bench's Omniglot shapes
(5-way 1-shot, T=32, 16 inner steps, 5 CG iterations). Kinds come from
``torch.profiler`` (each op's self time); "Python and dispatch" is the wall time no op
accounts for (interpreter, argument checks, autograd bookkeeping). Stages are timed by
calling the engine's parts directly (inner loop, linearisation, the HVPs of the solve).
"""

import math
import statistics
import time

import torch

from .common import gemm_rate, markdown_table
from .meta_step import batched_meta_step, make_tasks

KINDS = [  # (kind, predicate on the op name); the first match wins
    ("GEMM (bmm / baddbmm / addmm)", lambda n: n in ("aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addmm", "aten::addmm_", "aten::mm", "aten::matmul")),
    ("im2col", lambda n: n == "imaml::im2col"),
    ("col2im (alone)", lambda n: n == "imaml::col2im"),
    ("col2im fused with the BatchNorm backward", lambda n: n.startswith("imaml::col2im_bn")),
    ("BatchNorm (+ReLU) forward, backward, tangents", lambda n: n.startswith("imaml::bn_")),
    ("softmax-CE (+ tangent)", lambda n: n.startswith("imaml::softmax_ce")),
    ("max-pool", lambda n: n.startswith("imaml::maxpool")),
    ("proximal step and CG vector work", lambda n: n in ("imaml::prox_step", "imaml::cg_dots", "imaml::cg_update")),
    ("copies, clones, permutes, fills", lambda n: n in ("aten::copy_", "aten::clone", "aten::index_select", "aten::cat", "aten::fill_",
                                                       "aten::zero_", "aten::zeros_like", "aten::_to_copy", "aten::contiguous")),
    ("allocation", lambda n: n in ("aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty")),
    ("views and shape ops", lambda n: n in ("aten::view", "aten::reshape", "aten::select", "aten::slice", "aten::transpose", "aten::as_strided",
                                            "aten::expand", "aten::unsqueeze", "aten::permute", "aten::squeeze", "aten::t", "aten::alias",
                                            "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view", "aten::unflatten", "aten::split")),
    ("other elementwise and reductions (norms, finite checks, sums)", lambda n: n.startswith("aten::")),
]


def _kind(name):
    for kind, pred in KINDS:
        if pred(name):
            return kind
    return "Python and dispatch"  # autograd nodes' own time is their Python code


def _gemm_flops(event):
    shapes = event.input_shapes
    if not shapes or len(shapes) < 2:
        return 0
    a, b = (shapes[0], shapes[1]) if event.key in ("aten::bmm", "aten::mm", "aten::matmul") else (shapes[1], shapes[2])
    if len(a) == 3 and len(b) == 3:
        return 2 * a[0] * a[1] * a[2] * b[2] * event.count
    if len(a) == 2 and len(b) == 2:
        return 2 * a[0] * a[1] * b[1] * event.count
    return 0


def _gemm_operands(event):
    """``(op, a, b)`` shapes of a batched GEMM event (``a @ b``), ``None`` for others."""
    shapes = event.input_shapes
    if not shapes or len(shapes) < 2:
        return None
    a, b = (shapes[0], shapes[1]) if event.key == "aten::bmm" else (shapes[1], shapes[2]) if len(shapes) > 2 else (None, None)
    if event.key not in ("aten::bmm", "aten::baddbmm", "aten::baddbmm_") or a is None or len(a) != 3 or len(b) != 3:
        return None
    return event.key, tuple(a), tuple(b)


def shape_floor(counts, repeat=7):
    """The GEMMs' time at the best rate this machine's BLAS reaches *at their own shapes*:
    ``{(op, a_shape, b_shape): calls}`` -> ``(seconds, rows)``. Each shape is timed alone
    (operands in cache from the call before: a best case), in each of the four operand layouts
    (either factor transposed or not), a fresh output per call as the engine's calls have; the
    best layout counts. A floor under the meta-step's GEMMs that no reordering of the same
    products through this BLAS goes below, unlike the 1024^3 rate, which these small-sided
    products do not reach."""
    total, rows = 0.0, []
    for (op, a, b), n in sorted(counts.items(), key=lambda kv: -kv[1] * math.prod(kv[0][1]) * kv[0][2][2]):
        (T, M, K), N = a, b[2]
        best = math.inf
        for ta, tb in ((False, False), (True, False), (False, True), (True, True)):
            x = torch.randn(T, K, M).transpose(1, 2) if ta else torch.randn(T, M, K)
            y = torch.randn(T, N, K).transpose(1, 2) if tb else torch.randn(T, K, N)
            if op == "aten::bmm":
                fn = lambda: torch.bmm(x, y)  # noqa: E731
            else:
                out = torch.randn(T, M, N)
                fn = lambda: out.baddbmm_(x, y)  # noqa: E731
            best = min(best, _time(fn, repeat))
        total += n * best
        rows.append((f"{op[6:]} [{T}, {M}, {K}] @ [{T}, {K}, {N}]", n, f"{n * best * 1e3:.1f}", f"{2 * T * M * K * N / best / 1e9:.0f}"))
    return total, rows


def _time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(T=32, way=5, shot=1, query=1, inner_steps=16, cg_iters=5, repeat=3):
    """``(kind_rows, stage_rows, facts)``."""
    from torch.profiler import ProfilerActivity, profile

    from imaml_kernels.engine.net import batched_net
    from imaml_kernels.nets import OmniglotConv

    torch.manual_seed(0)
    model = OmniglotConv(way)
    theta = dict(model.named_parameters())
    tasks = make_tasks(T, way, shot, query)
    kw = dict(lam=2.0, inner_steps=inner_steps, inner_lr=0.1, cg_iters=cg_iters)
    step = lambda: batched_meta_step(model, theta, tasks, engine=True, **kw)  # noqa: E731
    wall = _time(step, repeat)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        step()
        prof_wall = time.perf_counter() - t0
    by_kind, flops, gemm_s, shapes = {}, 0, 0.0, {}
    for e in prof.key_averages(group_by_input_shape=True):
        kind = _kind(e.key)
        sec = e.self_cpu_time_total / 1e6
        by_kind[kind] = by_kind.get(kind, 0.0) + sec
        if kind.startswith("GEMM"):
            flops += _gemm_flops(e)
            gemm_s += sec
            key = _gemm_operands(e)
            if key is not None:
                shapes[key] = shapes.get(key, 0) + e.count
    accounted = sum(by_kind.values())
    by_kind["Python and dispatch"] = by_kind.get("Python and dispatch", 0.0) + max(0.0, prof_wall - accounted)
    rate = max(gemm_rate() for _ in range(3))  # the VM's rate drifts: its best of three
    shape_s, shape_rows = shape_floor(shapes)
    shape_gflop = sum(2 * n * math.prod(a) * b[2] for (_, a, b), n in shapes.items()) / 1e9
    kind_rows = []
    for kind, _ in KINDS + [("Python and dispatch", None)]:
        sec = by_kind.get(kind, 0.0)
        if sec <= 0:
            continue
        rows_extra = f"{flops / gemm_s / 1e9:.0f} GFLOP/s ({flops / gemm_s / 1e9 / rate:.0%} of {rate:.0f})" if kind.startswith("GEMM") else ""
        kind_rows.append((kind, f"{sec * 1e3:.0f}", f"{sec / prof_wall:.1%}", rows_extra))

    net = batched_net(model, tasks[0].shape[2:])
    xs, ys = tasks[0], tasks[1]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    inner = _time(lambda: net.inner_loop(flat, xs, ys, lam=2.0, steps=inner_steps, lr=0.1), repeat)
    phi = net.inner_loop(flat, xs, ys, lam=2.0, steps=inner_steps, lr=0.1)
    lin_s = _time(lambda: net.linearize(phi, xs, ys), repeat)
    lin = net.linearize(phi, xs, ys)
    v = torch.randn_like(lin.params_native)
    hvp_s = _time(lambda: lin.hvp(v), repeat)
    stages = [(f"inner loop ({inner_steps} fused proximal GD steps)", inner),
              ("linearisation at φ (forward + backward, kept for the HVPs)", lin_s),
              (f"{cg_iters} HVPs of the CG solve", cg_iters * hvp_s)]
    rest = wall - sum(s for _, s in stages)
    stages.append(("the rest: query loss and gradient, CG vectors, permutes, checks, Python", max(0.0, rest)))
    stage_rows = [(name, f"{sec * 1e3:.0f}", f"{sec / wall:.1%}") for name, sec in stages]
    facts = dict(wall=wall, prof_wall=prof_wall, gemm_gflop=flops / 1e9, gemm_s=gemm_s, gemm_rate=rate,
                 floor=flops / 1e9 / rate, shape_floor=shape_s, shape_rows=shape_rows, shape_gflop=shape_gflop)
    return kind_rows, stage_rows, facts


KIND_HEADER = ("kind of work", "ms", "share", "achieved")
SHAPE_HEADER = ("GEMM (op, shapes)", "calls", "ms at its best rate alone", "best GFLOP/s alone")
STAGE_HEADER = ("stage", "ms", "share")


def report(kind_rows, stage_rows, facts, title):
    f = facts
    return "\n".join([
        title, "",
        f"Fused meta-step: {f['wall']:.3f} s (median); the profiled one {f['prof_wall']:.3f} s.", "",
        "### By kind of work (torch.profiler self time; Python and dispatch = wall time no op accounts for)", "",
        markdown_table(KIND_HEADER, kind_rows), "",
        f"GEMMs: {f['gemm_gflop']:.1f} GFLOP in {f['gemm_s']:.3f} s; at the measured {f['gemm_rate']:.0f} GFLOP/s "
        f"(1024^3 sgemm, best of three) they would take {f['floor']:.3f} s, the meta-step's floor on this machine.", "",
        f"At the best rate this machine's BLAS reaches at the GEMMs' own shapes (each shape timed alone, operands in cache, "
        f"the best of its four operand layouts, a fresh output per call) the batched ones ({f['shape_gflop']:.1f} GFLOP) take "
        f"{f['shape_floor']:.3f} s ({f['shape_gflop'] / f['shape_floor']:.0f} GFLOP/s): the floor of these products through this BLAS.", "",
        markdown_table(SHAPE_HEADER, f["shape_rows"]), "",
        "### By stage (each part timed alone)", "",
        markdown_table(STAGE_HEADER, stage_rows), "",
    ])


def main(args):
    kind_rows, stage_rows, facts = run(T=args.tasks, inner_steps=args.inner_steps, cg_iters=args.cg_iters, repeat=args.repeat)
    text = report(kind_rows, stage_rows, facts,
                  f"## Profile of one fused meta-step: OmniglotConv(5), T={args.tasks}, 5-way 1-shot, "
                  f"{args.inner_steps} inner steps, {args.cg_iters} CG iterations, cpu")
    print(text)
    if args.out:
        from .common import machine_header

        with open(args.out, "w") as fh:
            fh.write(machine_header() + "\n\n" + text)
