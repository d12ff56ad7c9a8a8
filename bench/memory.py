"""Peak memory of one meta-gradient vs the number of inner steps: iMAML (implicit_adapt)
against fully unrolled MAML, each configuration in a fresh process (:mod:`bench.fresh`).

CPU: peak of live tensor-storage bytes counted by a dispatch-mode tracker
(:mod:`bench.memtrack`), plus the process's peak RSS growth for reference; GPU:
``torch.cuda.max_memory_allocated`` after a reset.
"""

import sys
from pathlib import Path

from . import fresh
from .common import markdown_table, write_csv
from .fresh import Row

STEPS = (1, 5, 10, 25, 50, 100)


def measure(method, steps, T, device, channels):
    """In a worker (:mod:`bench.fresh_worker`): one meta-gradient of ``method`` ("imaml" or
    "maml") at ``steps`` inner steps, after a warm-up at 1 step so that allocator pools and
    lazy initialisation are not counted: ``{"peak_bytes", "rss_growth_bytes"}``."""
    import torch

    import imaml_kernels as ik
    from imaml_kernels.nets import OmniglotConv

    from .baselines import maml_meta_grad
    from .common import PeakMemory
    from .memtrack import PeakTensorBytes
    from .meta_step import make_tasks

    torch.manual_seed(0)
    model = OmniglotConv(5, channels=channels).to(device)
    theta = dict(model.named_parameters())
    tasks = make_tasks(T, 5, 1, 1, device)
    run = lambda k: (  # noqa: E731
        maml_meta_grad(model, theta, tasks, inner_steps=k, inner_lr=0.1)
        if method == "maml"
        else ik.implicit_meta_grad(model, theta, tasks[:2], tasks[2:], lam=2.0, inner=ik.GD(k, 0.1), cg_iters=5)
    )
    run(1)
    if device == "cuda":
        with PeakMemory(device) as mem:
            run(steps)
        return {"method": method, "steps": steps, "peak_bytes": int(mem.cuda_mib * 2**20), "rss_growth_bytes": None}
    with PeakMemory(device) as mem, PeakTensorBytes() as tracker:
        run(steps)
    return {"method": method, "steps": steps, "peak_bytes": max(tracker.peak, 0), "rss_growth_bytes": int(mem.rss_mib * 2**20)}


def run(T=8, device="cpu", steps=STEPS, channels=64, out=None, progress=True):
    """Every (method, steps) configuration in a fresh process (one thread): table rows and
    ``{(method, steps): peak MiB}``; a configuration whose worker fails raises."""
    specs = [Row(f"{m}-{k}", f"{m}, {k} steps", "bench.memory:measure",
                 {"method": m, "steps": k, "T": T, "device": device, "channels": channels}, device=device)
             for k in steps for m in ("imaml", "maml")]
    measured = fresh.run_rows(specs, threads=1, log=(lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None)
    failed = {k: m.error for k, m in measured.items() if not m.ok}
    if failed:
        raise RuntimeError(f"memory workers failed: {failed}")
    records = [m.rounds[0]["custom"] for m in measured.values()]
    by = {(r["method"], r["steps"]): r["peak_bytes"] / 2**20 for r in records}
    rss = {(r["method"], r["steps"]): (r.get("rss_growth_bytes") or 0) / 2**20 for r in records}
    rows = [(k, f"{by[('imaml', k)]:.1f}", f"{by[('maml', k)]:.1f}", f"{rss[('imaml', k)]:.0f}", f"{rss[('maml', k)]:.0f}") for k in steps]
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "memory.csv", ["inner_steps", "imaml_peak_mib", "maml_peak_mib", "imaml_rss_growth_mib", "maml_rss_growth_mib"], rows)
        _plot(steps, [by[("imaml", k)] for k in steps], [by[("maml", k)] for k in steps], out / "memory.png", T, device)
    return rows, by


def _plot(steps, imaml, maml, path, T, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(steps, maml, "o-", label="MAML (unrolled)")
    ax.plot(steps, imaml, "s-", label="iMAML (imaml_kernels)")
    ax.set_xlabel("inner steps")
    ax.set_ylabel("peak memory of one meta-gradient (MiB)")
    ax.set_title(f"OmniglotConv, T={T}, {device}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    rows, by = run(T=args.tasks, device=args.device, steps=tuple(args.steps), channels=args.channels, out=args.out)
    print(f"\n## Peak memory of one meta-gradient (MiB) vs inner steps: OmniglotConv, T={args.tasks}, {args.device}\n")
    print("(peak live tensor bytes; RSS columns: the process's peak resident growth, allocator-noisy)\n")
    print(markdown_table(("inner steps", "iMAML", "MAML (unrolled)", "iMAML RSS", "MAML RSS"), rows))
    s0, s1 = args.steps[0], args.steps[-1]
    growth = by[("imaml", s1)] / max(by[("imaml", s0)], 1e-9) - 1
    print(f"\niMAML growth {s0} -> {s1} steps: {100 * growth:+.1f}% (target <= 5%); "
          f"MAML: {by[('maml', s1)] / max(by[('maml', s0)], 1e-9):.1f}x")
    if args.out:
        print(f"wrote {args.out}/memory.csv and memory.png")
    return rows
