"""``curves.png`` of a run: training loss and query accuracy against meta-step, from its
``metrics.jsonl`` (plus the meta-test points, and the learned λ per layer when it is learned)."""

from __future__ import annotations

from pathlib import Path

from .._atomic import atomic_write
from .runs import read_metrics

__all__ = ["plot_curves"]


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Training loss and query accuracy against meta-step (plus meta-test points) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path, warn=False)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        return None
    steps = [r["step"] for r in train]
    # One meta-batch is a noisy estimate: draw each step faintly and a running mean over
    # about 2% of the run on top.
    w = max(1, len(train) // 50)

    def smooth(v):
        c = [0.0]
        for x in v:
            c.append(c[-1] + x)
        return [(c[i + 1] - c[max(0, i + 1 - w)]) / min(w, i + 1) for i in range(len(v))]

    nan = float("nan")
    loss = [nan if r["loss"] is None else r["loss"] for r in train]
    acc = [nan if r["acc"] is None else 100 * r["acc"] for r in train]
    lam_keys = sorted({k for r in train for k in r if k == "lam" or k.startswith("lam/")})
    fig, axes = plt.subplots(1, 3 if lam_keys else 2, figsize=(15 if lam_keys else 10, 3.8))
    a1, a2 = axes[0], axes[1]
    a1.plot(steps, loss, lw=0.6, alpha=0.3, color="C0")
    a1.plot(steps, smooth(loss), lw=1.5, color="C0")
    a1.set(xlabel="meta-step", ylabel="query loss (train tasks)", yscale="log")
    a2.plot(steps, acc, lw=0.6, alpha=0.3, color="C0")
    a2.plot(steps, smooth(acc), lw=1.5, color="C0", label=f"train tasks (query), mean of {w}")
    if evals:
        a2.errorbar(
            [r["step"] for r in evals], [100 * r["accuracy"] for r in evals],
            yerr=[100 * r["ci95"] for r in evals], fmt="o", color="C3", capsize=3,
            label=f"meta-test ({evals[-1]['tasks']} tasks, 95% CI)",
        )
    a2.set(xlabel="meta-step", ylabel="accuracy (%)")
    a2.legend(loc="lower right")
    if lam_keys:  # a learned λ, per layer: logged at each read-back
        for i, k in enumerate(lam_keys):
            pts = [(r["step"], r[k]) for r in train if r.get(k) is not None]
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, color=f"C{i % 10}", label=k)
        axes[2].set(xlabel="meta-step", ylabel="learned λ", yscale="log")
        axes[2].legend(loc="best", fontsize=7, ncol=2)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(metrics_path.parent.name)
    fig.tight_layout()
    try:
        with atomic_write(out_png) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out_png
