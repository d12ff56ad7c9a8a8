"""Peak memory of one meta-gradient vs the number of inner steps: iMAML (implicit_adapt)
against fully unrolled MAML, each configuration in a fresh process.

CPU: peak of live tensor-storage bytes counted by a dispatch-mode tracker
(:mod:`bench.memtrack`), plus the process's peak RSS growth for reference; GPU:
``torch.cuda.max_memory_allocated`` after a reset.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from .common import markdown_table

STEPS = (1, 5, 10, 25, 50, 100)


def worker(method, steps, T, device, channels):
    import resource

    import torch

    import imaml_kernels as ik
    from imaml_kernels.nets import OmniglotConv

    from .baselines import maml_meta_grad
    from .meta_step import make_tasks

    torch.manual_seed(0)
    model = OmniglotConv(5, channels=channels).to(device)
    theta = dict(model.named_parameters())
    tasks = make_tasks(T, 5, 1, 1, device)
    # Warm-up at 1 step so that allocator pools and lazy init are not counted.
    run = lambda k: (  # noqa: E731
        maml_meta_grad(model, theta, tasks, inner_steps=k, inner_lr=0.1)
        if method == "maml"
        else ik.implicit_meta_grad(model, theta, tasks[:2], tasks[2:], lam=2.0, inner=ik.GD(k, 0.1), cg_iters=5)
    )
    run(1)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run(steps)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        from .memtrack import PeakTensorBytes

        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with PeakTensorBytes() as tracker:
            run(steps)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        peak = tracker.peak
    print(json.dumps({"method": method, "steps": steps, "peak_bytes": max(peak, 0), "rss_growth_bytes": max(rss, 0) if device != "cuda" else None}))


def run(T=8, device="cpu", steps=STEPS, channels=64, out=None, progress=True):
    rows, records = [], []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    cases = [(m, s) for s in steps for m in ("imaml", "maml")]
    it = tqdm(cases, desc="memory", disable=not progress) if tqdm else cases
    root = Path(__file__).resolve().parents[1]
    for method, k in it:
        cmd = [sys.executable, "-m", "bench.memory", "--worker", method, str(k), str(T), device, str(channels)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode != 0:
            raise RuntimeError(f"memory worker failed ({method}, {k} steps):\n{res.stderr[-2000:]}")
        records.append(json.loads(res.stdout.strip().splitlines()[-1]))
    by = {(r["method"], r["steps"]): r["peak_bytes"] / 2**20 for r in records}
    rss = {(r["method"], r["steps"]): (r.get("rss_growth_bytes") or 0) / 2**20 for r in records}
    for k in steps:
        rows.append((k, f"{by[('imaml', k)]:.1f}", f"{by[('maml', k)]:.1f}", f"{rss[('imaml', k)]:.0f}", f"{rss[('maml', k)]:.0f}"))
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "memory.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["inner_steps", "imaml_peak_mib", "maml_peak_mib", "imaml_rss_growth_mib", "maml_rss_growth_mib"])
            w.writerows(rows)
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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        m, s, t, d, c = sys.argv[2:7]
        worker(m, int(s), int(t), d, int(c))
