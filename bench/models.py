"""``python -m bench models``: one iMAML meta-gradient on models users bring (issue 21).

For each model of :mod:`bench.models_zoo` (ResNet-12, a wide MLP, a transformer encoder layer,
the paper's CNN): inner GD on the proximal objective (λ = 2), CG of 5 iterations, the query
loss's backward, summed over the tasks. Rows, each in fresh worker processes, one per round
(:mod:`bench.fresh`):

- ``default``: the package's default plan, ``ik.implicit_meta_grad(model, theta, support,
  query, lam=2.0, inner=ik.GD(steps, lr), cg_iters=5)``;
- ``lean``: the same with ``chunk=1`` (one task at a time, end to end);
- ``loop``: the hand-written per-task loop (:func:`bench.baselines.serial_imaml_meta_grad`
  with ``cg_tol=None``: inner steps from ``autograd.grad`` with the proximal gradient in
  closed form, the query gradient, the support gradient built once with ``create_graph``
  and reused by every double-backward HVP of a plain CG, the tasks' solutions summed);
- ``torchopt``: :func:`bench.torchopt_imaml.torchopt_meta_grad` (any ``nn.Module``
  classifier; normal-equation CG, so not the same numbers), when torchopt is installed.

Targets (printed, never asserted): the default plan at least 1.5x the loop's speed on ResNet-12
and the transformer and 1x on the MLP; the default plan's peak memory at most 2x the loop's,
the lean plan's at most 1.25x.
"""

import sys
from pathlib import Path

from torch.nn.attention import SDPBackend, sdpa_kernel

import imaml_kernels as ik

from . import fresh
from .baselines import serial_imaml_meta_grad
from .common import machine_header, markdown_table, write_csv
from .fresh import Prepared, Row
from .models_zoo import build, cases, make_tasks
from .torchopt_imaml import torchopt_available, torchopt_meta_grad

LAM, CG_ITERS = 2.0, 5
LABELS = {
    "default": "imaml_kernels, default plan",
    "lean": "imaml_kernels, lean plan",
    "loop": "hand-written per-task loop",
    "torchopt": "torchopt ImplicitMetaGradientModule (per task)",
}
SPEED_TARGETS = {"resnet12": 1.5, "transformer": 1.5, "mlp": 1.0}  # the default plan's speed over the loop's, at least
PEAK_TARGETS = {"default": 2.0, "lean": 1.25}  # peak memory over the loop's, at most


def meta_grad_fn(row, case, model, tasks, lam=LAM):
    """A zero-argument callable computing ``row``'s meta-gradient (a dict shaped like the
    model's parameters) for ``case`` on ``model`` and ``tasks = (x_s, y_s, x_q, y_q)``; the
    package's rows return ``(meta_grad, info)`` as :func:`imaml_kernels.implicit_meta_grad` does."""
    theta = dict(model.named_parameters())
    kw = dict(lam=lam, inner_steps=case.steps, inner_lr=case.lr, cg_iters=CG_ITERS)
    if row in ("default", "lean"):
        xs, ys, xq, yq = tasks
        extra = {"chunk": 1} if row == "lean" else {}
        inner = ik.GD(case.steps, case.lr)
        return lambda: ik.implicit_meta_grad(model, theta, (xs, ys), (xq, yq), lam=lam, inner=inner, cg_iters=CG_ITERS, **extra)
    if row == "loop":
        fn = lambda: serial_imaml_meta_grad(model, theta, tasks, cg_tol=None, **kw)  # noqa: E731
    elif row == "torchopt":
        fn = lambda: torchopt_meta_grad(model, tasks, **kw)  # noqa: E731
    else:
        raise ValueError(f"unknown row {row!r}; the rows are {list(LABELS)}")

    def double_backward():
        # Reverse-over-reverse HVPs differentiate attention's backward, which only the math
        # SDPA kernel can (flash attention has no double backward); no effect without attention.
        with sdpa_kernel(SDPBackend.MATH):
            return fn()

    return double_backward


def prepare(model, row, tiny=False, device="cpu"):
    """In a worker (:mod:`bench.fresh_worker`): ``model``'s network and tasks and ``row``'s
    meta-gradient, ready to time. ``info``, after the timed calls: on the CPU the allocator peak
    of one more call (:func:`bench.memtrack.allocator_peak_bytes`: the tensors the call holds at
    once, without module imports or the C allocator's cache); for the package's rows which plan
    ran (path, chunk, HVP mode) and in how many tasks the last call's CG broke down (``I + H/λ``
    not positive definite along a search direction: CG keeps its last good iterate, where the
    loop goes on)."""
    from .memtrack import allocator_peak_bytes

    case = cases(tiny)[model]
    net, tasks = build(case, device), make_tasks(case, device)
    fn = meta_grad_fn(row, case, net, tasks)
    last = {}

    def step():
        last["out"] = fn()

    def info():
        out = {}
        if row in ("default", "lean"):
            cg = last["out"][1].get("cg")
            plan = last["out"][1]["plan"]
            side = f" x{plan.workers} side by side" if plan.workers > 1 else ""
            out.update(path=f"{plan.path}, chunk {plan.chunk}{side}" + ("" if plan.hvp == "engine" else f", {plan.hvp}"),
                       cg_breakdowns=int(cg.breakdown.sum()) if cg is not None else 0, tasks=case.T)
        last.clear()  # the timed calls' results are not alive during the accounted call
        if not str(device).startswith("cuda"):
            out["alloc_peak_mib"] = allocator_peak_bytes(fn) / 2**20
        return out

    return Prepared(step, info=info)


def make_rows(model, tiny=False, device="cpu", repeat=3, torchopt=True):
    keys = ["default", "lean", "loop"] + (["torchopt"] if torchopt and torchopt_available() else [])
    label = {**LABELS, "lean": f"{LABELS['lean']} (chunk=1)"}
    kw = dict(model=model, tiny=tiny, device=device)
    return [Row(k, label[k], "bench.models:prepare", {**kw, "row": k}, warmup=1, repeat=repeat, device=device) for k in keys]


def run(names=None, tiny=False, device="cpu", rounds=3, repeat=3, torchopt=True, log=None):
    """``{model: {row: Measured}}``: each model's rows alternate over ``rounds`` rounds, each row
    of each round in a fresh process."""
    names = names or list(cases(tiny))
    out = {}
    for name in names:
        rows = make_rows(name, tiny, device, repeat, torchopt)
        out[name] = fresh.run_rows(rows, rounds=rounds, log=(lambda m, n=name: log(f"{n}: {m}")) if log else None)
    return out


HEADER = ("model", "method", "path", "s / meta-gradient", "peak MiB", "speed vs the loop", "peak vs the loop",
          "tensor peak MiB", "tensor peak vs the loop")
ALLOC = "info.alloc_peak_mib"  # the allocator peak of one call, CPU only (prepare's info)


def table(results, rounds, device="cpu"):
    """The markdown table's rows: time and peak with their min-max, ratios to the loop."""
    mem, rows = fresh.memory_field(device), []
    for name, measured in results.items():
        loop = measured.get("loop")
        for key, m in measured.items():
            if not m.ok:
                rows.append((name, m.row.label, "", f"not measured: {m.error}", "", "", "", "", ""))
                continue
            speed = fresh.ratio(loop, m) if loop is not None else None
            peak = fresh.ratio(m, loop, mem) if loop is not None else None
            tensors = fresh.ratio(m, loop, ALLOC) if loop is not None else None
            rows.append((name, m.row.label, path_text(m), fresh.stat_text(m.stat("seconds"), rounds=rounds),
                         fresh.stat_text(m.stat(mem), fmt=".0f", rounds=rounds), fresh.ratio_text(speed, rounds),
                         fresh.ratio_text(peak, rounds), fresh.stat_text(m.stat(ALLOC), fmt=".1f", rounds=rounds),
                         fresh.ratio_text(tensors, rounds)))
    return rows


def path_text(m):
    """The package's path in a row, and its CG breakdowns when there were any. Each worker decides
    its own plan: where the rounds' plans differ (the probe timed them differently), each is
    named with the rounds that ran it."""
    info = m.info
    paths = [p for p in m.values("info.path") if p] if m.ok else []
    if len(set(paths)) > 1:
        text = "; ".join(f"{p} (round{'s' if paths.count(p) > 1 else ''} "
                         f"{', '.join(str(r + 1) for r, q in enumerate(paths) if q == p)})" for p in dict.fromkeys(paths))
    else:
        text = info.get("path", "")
    if info.get("cg_breakdowns"):
        text += f"; CG broke down in {info['cg_breakdowns']}/{info['tasks']} tasks"
    return text


def targets(results, device="cpu"):
    """One line per target: the measured ratio (median over rounds, min-max) and met / NOT met."""
    mem, lines = fresh.memory_field(device), []
    for name, measured in results.items():
        loop = measured.get("loop")
        checks = []
        if name in SPEED_TARGETS and "default" in measured:
            checks.append(("default plan's speed over the loop's", fresh.ratio(loop, measured["default"]), ">=", SPEED_TARGETS[name]))
        for key, limit in PEAK_TARGETS.items():
            if key in measured:
                checks.append((f"{measured[key].row.label}: peak memory over the loop's", fresh.ratio(measured[key], loop, mem), "<=", limit))
                if mem == "peak_mib":
                    checks.append((f"{measured[key].row.label}: tensor peak over the loop's",
                                   fresh.ratio(measured[key], loop, ALLOC), "<=", limit))
        for what, r, op, limit in checks:
            if r is None:
                lines.append(f"target {name}: {what} {op} {limit:g}x: not measured")
                continue
            held = r[0] >= limit if op == ">=" else r[0] <= limit
            lines.append(f"target {name}: {what} {op} {limit:g}x: {'met' if held else 'NOT met'} "
                         f"({r[0]:.2f}x, rounds {r[1]:.2f}-{r[2]:.2f}x)")
    return lines


def write(out, results, rounds, device):
    """``models.csv`` (every row's median, min and max, ratios to the loop) and ``models.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mem = fresh.memory_field(device)
    header = ["model", "row", "label", "path", "s_median", "s_min", "s_max", "peak_mib_median", "peak_mib_min",
              "peak_mib_max", "speed_vs_loop", "speed_vs_loop_min", "speed_vs_loop_max", "peak_vs_loop", "tensor_peak_mib",
              "tensor_peak_vs_loop", "rounds", "not_measured"]
    rows = []
    for name, measured in results.items():
        for key, m in measured.items():
            t, p = m.stat("seconds"), m.stat(mem)
            loop = measured.get("loop")
            speed = fresh.ratio(loop, m) if loop is not None else None
            peak = fresh.ratio(m, loop, mem) if loop is not None else None
            a = m.stat(ALLOC)
            tensors = fresh.ratio(m, loop, ALLOC) if loop is not None else None
            rows.append([name, key, m.row.label, path_text(m), *(t or ("",) * 3), *(p or ("",) * 3),
                         *(speed or ("",) * 3), peak[0] if peak else "", a[0] if a else "", tensors[0] if tensors else "",
                         rounds, m.error or ""])
    write_csv(out / "models.csv", header, rows)
    _plot(out / "models.png", results, mem, device)


def _plot(path, results, mem, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    labels = {k: m.row.label for measured in results.values() for k, m in measured.items()}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    width = 0.8 / max(len(labels), 1)
    for j, key in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(names))]
        for ax, field in zip(axes, ("seconds", mem)):
            vals = [(results[n][key].stat(field) or (0,))[0] if key in results[n] else 0 for n in names]
            ax.bar(xs, vals, width, label=labels[key])
    for ax, ylabel in zip(axes, ("seconds per meta-gradient (log)", "peak memory growth (MiB)")):
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_yscale("log")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle(f"one iMAML meta-gradient, {device}: median over rounds, each row in fresh processes", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results, rounds, device, tiny=False):
    """The markdown report (without the machine header, which the CLI prints first)."""
    lines = [f"## One iMAML meta-gradient on user models: λ = {LAM:g}, CG {CG_ITERS} iterations, {device}", ""]
    lines += [f"- {name}: {cases(tiny)[name].describe()}" for name in results]
    lines += ["", fresh.method(rounds, "seconds per meta-gradient") + " " + fresh.memory_note(device),
              "'speed vs the loop': the loop's time over the row's; 'peak vs the loop': the row's peak over the loop's.",
              *(["'tensor peak': the peak of the bytes PyTorch's CPU allocator held during one more call after the "
                 "timed ones (torch.profiler's allocation and free records, bench/memtrack.py): what the meta-gradient "
                 "holds at once, without the modules its first call imports (torch.func's first call imports "
                 "torch._dynamo: about 65 MiB of the resident peak) or the C allocator's cache."]
                if fresh.memory_field(device) == "peak_mib" else []), "",
              markdown_table(HEADER, table(results, rounds, device)), "", *targets(results, device)]
    return "\n".join(lines)


def main(args):
    names = args.models or None
    results = run(names, tiny=args.tiny, device=args.device, rounds=args.rounds, repeat=args.repeat,
                  torchopt=not args.no_torchopt, log=lambda m: print(m, file=sys.stderr, flush=True))
    text = report(results, args.rounds, args.device, args.tiny)
    print("\n" + text)
    if not args.no_torchopt and not torchopt_available():
        print("torchopt: not installed, not measured (pip install -r requirements-bench.txt to add it)")
    if args.out:
        write(args.out, results, args.rounds, args.device)
        (Path(args.out) / "models.md").write_text(machine_header() + "\n\n" + text + "\n")
        print(f"wrote {args.out}/models.md, models.csv and models.png")
    return results
