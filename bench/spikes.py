"""``python -m bench spikes``: train with this package's trainer step and measure, step by step,
what could make a run spike (issue 27: the paper-text preset's query loss jumped at steps
~2,350 and ~3,300 of a 3,600-step run).

The meta-steps are the trainer's (:class:`bench.trajectory.OursLoop`: ``meta_step`` with the
configuration's builders, on the trainer's task stream from the trainer's θ₀); everything
measured here is computed outside the meta-step, in this process, so the trainer itself reads
nothing more back. Every step (``steps_<name>.jsonl`` under ``--out``):

- the trainer's statistics: query loss and accuracy, the support loss after adaptation
  (``inner_loss``), dropped tasks, the CG relative residual;
- ‖θ‖ (and of its conv weights, BatchNorm γ/β and head), the meta-gradient's norm ‖g‖, Adam's
  update ‖Δθ‖ and its largest entry over the step size, max |Δθ| / lr.

Every ``--probe-every`` steps, on the first ``--probe-tasks`` tasks of the step's meta-batch
at θ before the step (the tasks it trains on):

- the inner loop replayed step by step (the same update as the engine's, one step at a time)
  with the support loss after every step: its largest one-step rise (> 0: the inner loop
  went up somewhere) and the final loss;
- the largest-magnitude eigenvalue of the support-loss Hessian at θ and at the adapted φ
  (``--power-iters`` power iterations of the engine's HVP, the Rayleigh quotient, signed),
  and ``lr·(λ + λ_max)`` at φ: proximal GD on a quadratic diverges where it exceeds 2;
- BatchNorm's batch statistics on the support set at θ: per BatchNorm layer the smallest
  per-channel standard deviation (over the N support images and the pixels) of its input.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .common import machine_header, markdown_table
from .trajectory import OursLoop, TaskStream, flat, initial_model, parse_overrides


def group_norms(model):
    """‖·‖ of the conv weights (scale-free under BatchNorm), BatchNorm γ and β, and the head."""
    groups = {"conv_w": [], "bn_gamma": [], "bn_beta": [], "head": []}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            groups["conv_w"].append(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            groups["bn_gamma"].append(m.weight)
            groups["bn_beta"].append(m.bias)
        elif isinstance(m, nn.Linear):
            groups["head"] += [m.weight, m.bias]
    return {f"norm_{k}": flat(v).norm().item() for k, v in groups.items() if v}


def step_metrics(loop, before, lr):
    """The cheap per-step measurements after a meta-step from θ = ``before``."""
    after, g = loop.params(), loop.grad()
    d = after - before
    return {"norm_theta": after.norm().item(), "norm_grad": g.norm().item(), "norm_update": d.norm().item(),
            "max_update_over_lr": d.abs().max().item() / lr, **group_norms(loop.model)}


def power_eig(net, params, x, y, iters, seed=0):
    """``[T]`` the largest-magnitude eigenvalue of each task's Hessian (Rayleigh quotient, signed)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(params.shape, generator=g, dtype=params.dtype)
    v = v / v.norm(dim=1, keepdim=True)
    ray = torch.zeros(params.shape[0], dtype=params.dtype)
    for _ in range(iters):
        w = net.hvp(params, v, x, y)
        ray = (v * w).sum(1)
        v = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return ray


def replay_inner(net, theta, x, y, cfg):
    """The inner loop one step at a time: ``(losses [steps + 1, T], φ [T, P])``, the support
    loss at θ, after each step and (sgd-pullback) after the pull-back step."""
    lr, lam, steps = float(cfg["inner_lr"]), float(cfg["lam"]), int(cfg["inner_steps"])
    phi, losses = theta.clone(), []
    for _ in range(steps):
        loss, grad = net.loss_and_grad(phi, x, y)
        losses.append(loss)
        step = grad + lam * (phi - theta) if cfg["inner"] == "gd" else grad
        phi = phi - lr * step
    if cfg["inner"] == "sgd-pullback":
        phi = phi - lr * lam * (phi - theta)
    losses.append(net.loss(phi, x, y))
    return torch.stack(losses), phi


def bn_input_std(model, x):
    """Per BatchNorm layer, the smallest per-channel std of its input over the batch ``x``
    (one task's support set) and the pixels, with BatchNorm's ε: what it divides by."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(
        (inp[0].var(dim=(0, 2, 3), unbiased=False) + mod.eps).sqrt().min().item()))
        for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def probe(model, tasks, cfg, k, power_iters):
    """The probe measurements on the first ``k`` tasks of ``tasks`` at the model's θ."""
    if cfg["inner"] not in ("gd", "sgd-pullback"):
        return {}
    net = model.batched()
    xs, ys = tasks[0][:k], tasks[1][:k]
    theta = model.flat_params().expand(xs.shape[0], -1).contiguous()
    with torch.no_grad():
        losses, phi = replay_inner(net, theta, xs, ys, cfg)
        eig_theta = power_eig(net, theta, xs, ys, power_iters)
        eig_phi = power_eig(net, phi, xs, ys, power_iters)
    rise = (losses[1:] - losses[:-1]).max(0).values
    bn = [bn_input_std(model, xs[t]) for t in range(xs.shape[0])]
    lr, lam = float(cfg["inner_lr"]), float(cfg["lam"])
    return {"inner_rise_max": rise.max().item(), "inner_rise_tasks": int((rise > 0).sum()),
            "inner_final_max": losses[-1].max().item(), "inner_final_mean": losses[-1].mean().item(),
            "eig_theta_max": eig_theta.abs().max().item(), "eig_phi_max": eig_phi.abs().max().item(),
            "eig_phi_min_signed": eig_phi.min().item(), "gd_stability": lr * (lam + eig_phi.abs().max().item()),
            **{f"bn{i + 1}_min_std": min(b[i] for b in bn) for i in range(len(bn[0]))}}


# ------------------------------------------------------------------ the run


def train(preset, overrides, steps, *, probe_every=10, probe_tasks=4, power_iters=10, log=None, data_root=None):
    """``steps`` trainer meta-steps with the measurements above; returns ``(cfg, records, model)``
    (the records also go to ``log``, a path, as they come)."""
    from imaml_kernels.trainer.presets import outer_lr_at, resolve_config

    cfg = resolve_config(preset, {"steps": steps, **overrides})
    stream = TaskStream(cfg, "cpu", data_root)
    loop = OursLoop(cfg, initial_model(cfg))
    records = []
    with open(log, "w") if log else contextlib.nullcontext() as sink:
        for step in range(steps):
            tasks, _ = next(stream)
            rec = {"step": step + 1}
            if probe_every and step % probe_every == 0:
                rec.update(probe(loop.model, tasks, cfg, probe_tasks, power_iters))
            before, lr = loop.params(), outer_lr_at(cfg, step)
            t0 = time.perf_counter()
            rec.update(loop.step(tasks, step))
            rec["seconds"] = time.perf_counter() - t0
            rec.update(step_metrics(loop, before, lr))
            records.append(rec)
            if sink:
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
    return cfg, records, loop.model


COLUMNS = (("loss", "query loss", ".3f"), ("acc", "query acc", ".3f"), ("inner_loss", "support loss at φ", ".3f"),
           ("norm_grad", "‖g‖", ".3f"), ("norm_update", "‖Δθ‖", ".4f"), ("max_update_over_lr", "max Δθ / lr", ".2f"),
           ("norm_theta", "‖θ‖", ".1f"), ("norm_bn_gamma", "‖γ‖", ".2f"), ("norm_head", "‖head‖", ".2f"),
           ("cg_residual", "CG res.", ".1e"), ("inner_rise_max", "inner rise", ".3f"), ("eig_phi_max", "λmax H(φ)", ".1f"),
           ("gd_stability", "lr(λ+λmax)", ".2f"), ("bn4_min_std", "BN4 min σ", ".3f"))


def window_table(records, width):
    """Means over windows of ``width`` steps of :data:`COLUMNS` (probe columns over the probed steps)."""
    rows = []
    for lo in range(0, len(records), width):
        w = records[lo:lo + width]
        row = [f"{w[0]['step']}-{w[-1]['step']}"]
        for key, _, fmt in COLUMNS:
            vals = [r[key] for r in w if key in r and r[key] is not None and math.isfinite(r[key])]
            row.append(f"{sum(vals) / len(vals):{fmt}}" if vals else "-")
        rows.append(tuple(row))
    return ("meta-steps", *(c[1] for c in COLUMNS)), rows


def plot(path, records, title, width=10):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .trajectory import _smooth

    panels = (("loss", "query loss"), ("inner_loss", "support loss at φ"), ("norm_grad", "‖g‖ (meta-gradient)"),
              ("max_update_over_lr", "max |Δθ| / lr"), ("eig_phi_max", "|λ|max of H at φ (probe)"),
              ("bn4_min_std", "BN4: min per-channel σ (probe)"))
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    for ax, (key, label) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=0.5, alpha=0.4, color="C0")
            if len(pts) > width:
                ax.plot(xs, _smooth(list(ys), width), lw=1.2, color="C1")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("meta-step")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COMPARED = (("loss", "query loss", ".3f"), ("inner_loss", "support loss at φ", ".3f"),
            ("inner_rise_max", "inner rise", ".3f"), ("eig_theta_max", "λmax H(θ)", ".0f"),
            ("gd_stability", "lr(λ+λmax H(φ))", ".2f"))


def compare_tables(runs, width):
    """Per :data:`COMPARED` column, a table of the runs' means over ``width`` meta-steps."""
    n_max = max(len(r) for r in runs.values())
    header = ("run", *(f"{lo + 1}-{min(lo + width, n_max)}" for lo in range(0, n_max, width)))
    lines = []
    for key, label, fmt in COMPARED:
        rows = []
        for n, recs in runs.items():
            cells = []
            for lo in range(0, len(recs), width):
                vals = [r[key] for r in recs[lo:lo + width] if r.get(key) is not None]
                cells.append(f"{sum(vals) / len(vals):{fmt}}" if vals else "-")
            rows.append((n, *cells, *("",) * (len(header) - 1 - len(cells))))  # a shorter run: blank cells
        lines += [f"## {label}", "", markdown_table(header, rows), ""]
    return lines


def compare_plot(path, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .trajectory import _smooth

    fig, axes = plt.subplots(1, len(COMPARED), figsize=(4 * len(COMPARED), 3.8))
    for ax, (key, label, _) in zip(axes, COMPARED):
        for i, (n, recs) in enumerate(runs.items()):
            xs, ys = zip(*[(r["step"], r[key]) for r in recs if r.get(key) is not None])
            ax.plot(xs, _smooth(list(ys), 20 if len(xs) > 100 else 3), lw=1.2, color=f"C{i}", label=n)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("meta-step")
        ax.grid(alpha=0.3)
    axes[-1].axhline(2.0, color="k", lw=0.8, ls="--")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(runs), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(out, names, width=100):
    """``spikes_compare.md`` and ``.png``: the runs ``steps_<name>.jsonl`` under ``out`` side by
    side, means over ``width`` steps of :data:`COMPARED` (the probe columns over probed steps)."""
    runs = {n: [json.loads(line) for line in (Path(out) / f"steps_{n}.jsonl").read_text().splitlines()] for n in names}
    source = ("From the runs' steps_<name>.jsonl (each run's spikes_<name>.md names its machine, command and "
              f"configuration). Means over {width} meta-steps (probe columns: over the probed steps).")
    lines = ["# Spike probe: runs side by side", "", source, "",
             *compare_tables(runs, width), "![runs](spikes_compare.png)", ""]
    compare_plot(Path(out) / "spikes_compare.png", runs)
    (Path(out) / "spikes_compare.md").write_text("\n".join(lines))
    return "\n".join(lines)


def main(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compare:
        print(compare(out, args.compare))
        return None
    overrides = parse_overrides(args.set)
    torch.set_num_threads(args.threads)
    name = args.name or args.preset
    cfg, records, _ = train(args.preset, overrides, args.steps, probe_every=args.probe_every, probe_tasks=args.probe_tasks,
                         power_iters=args.power_iters, log=str(out / f"steps_{name}.jsonl"))
    header, rows = window_table(records, args.window)
    changed = " ".join(f"{k}={v}" for k, v in overrides.items())
    text = "\n".join([f"# Spike probe: {args.preset} {changed}".rstrip(), "", machine_header(), "",
                      "`python -m bench " + " ".join(sys.argv[1:]) + "`", "",
                      "config: " + " ".join(f"{k}={cfg[k]}" for k in cfg), "",
                      (f"Means over {args.window} meta-steps; probe columns (inner rise, λmax, lr(λ+λmax), BN4 min σ) "
                       f"over the probed steps (every {args.probe_every}, first {args.probe_tasks} tasks)."), "",
                      markdown_table(header, rows), "", f"![probe](spikes_{name}.png)", ""])
    (out / f"spikes_{name}.md").write_text(text)
    plot(out / f"spikes_{name}.png", records, f"{args.preset} {changed}")
    print(text)
    return records
