"""How far the engine's bf16 GEMM mode moves the meta-gradient, on real Omniglot tasks.

``python -m bench precision [--checkpoint RUN] [--tasks 32] [--preset omniglot-5w1s]`` draws
one meta-batch of the preset's tasks from the Omniglot meta-training split and computes the
summed implicit meta-gradient (the preset's inner solver and damped CG, through the fused
engine) three ways: float32, float32 with ``gemm_precision("bf16")``, and float64 (the
reference). It prints the relative error ‖g − g₆₄‖/‖g₆₄‖ and the cosine to the reference, in
all and per layer, and the query loss of each. θ is the preset's θ₀ or a trained checkpoint's
(``--checkpoint``: a run folder or file). Speed: ``python -m bench meta-step --bf16``.
"""

from __future__ import annotations

import torch

import imaml_kernels as ik
from imaml_kernels.trainer.builders import build_backward_solve, build_model, build_samplers, build_solver
from imaml_kernels.trainer.checkpoint import checkpoint_config, find_checkpoint
from imaml_kernels.trainer.presets import resolve_config

from .common import markdown_table


def meta_grad(model, batch, cfg, dtype, precision):
    m = build_model(cfg)
    m.load_state_dict(model.state_dict())
    m = m.to(dtype)
    theta = dict(m.named_parameters())
    xs, ys, xq, yq = (t.to(dtype) if t.is_floating_point() else t for t in batch)
    with ik.gemm_precision(precision):
        g, info = ik.implicit_meta_grad(m, theta, (xs, ys), (xq, yq), lam=float(cfg["lam"]), inner=build_solver(cfg),
                                        solve=build_backward_solve(cfg), engine=True)
    return {k: v.detach().double() for k, v in g.items()}, float(info["outer_loss"].sum())


def _rel(a, b):
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def run(preset="omniglot-5w1s", tasks=32, checkpoint=None, seed=0, data_root=None):
    """``(rows, summary)``: per layer and in all, the relative error and cosine of the float32
    and bf16-GEMM meta-gradients against float64."""
    if checkpoint:
        found = find_checkpoint(checkpoint)
        cfg = {**checkpoint_config(found.state, found.path), "meta_batch": tasks}
        model = build_model(cfg)
        model.load_state_dict(found.state["model"])
        where = f"θ of {found.path} (step {found.state['step']})"
    else:
        cfg = resolve_config(preset, {"meta_batch": tasks, "seed": seed})
        torch.manual_seed(cfg["seed"])
        model = build_model(cfg)
        where = f"θ₀ of preset {preset} (seed {cfg['seed']})"
    train, _ = build_samplers(cfg, "cpu", data_root)
    batch = train.sample(tasks)
    g = {name: meta_grad(model, batch, cfg, dt, prec)[0]
         for name, dt, prec in (("fp32", torch.float32, "fp32"), ("bf16", torch.float32, "bf16"), ("f64", torch.float64, "fp32"))}
    layers = list(dict.fromkeys(k.rpartition(".")[0] for k in g["f64"]))
    rows = []
    for layer in layers + ["all"]:
        keys = [k for k in g["f64"] if layer == "all" or k.rpartition(".")[0] == layer]
        cat = {n: torch.cat([g[n][k].flatten() for k in keys]) for n in g}
        rows.append([layer, f"{_rel(cat['fp32'], cat['f64']):.2e}", f"{_rel(cat['bf16'], cat['f64']):.2e}",
                     f"{_cos(cat['bf16'], cat['f64']):.5f}", f"{_rel(cat['bf16'], cat['fp32']):.2e}"])
    summary = {"where": where, "cfg": cfg, "tasks": tasks,
               "fp32": float(rows[-1][1]), "bf16": float(rows[-1][2]), "bf16_cos": float(rows[-1][3])}
    return rows, summary


HEADER = ("layer", "fp32: rel. error vs f64", "bf16 GEMMs: rel. error vs f64", "bf16: cosine to f64", "bf16 vs fp32")


def main(args):
    rows, s = run(args.preset, args.tasks, args.checkpoint, args.seed)
    cfg = s["cfg"]
    print(f"\n## The meta-gradient under bf16 GEMMs: {s['tasks']} real Omniglot {cfg['way']}-way {cfg['shot']}-shot "
          f"tasks (meta-training split), {s['where']}; inner {cfg['inner']} ({cfg['inner_steps']} steps, lr {cfg['inner_lr']}), "
          f"λ {cfg['lam']}, CG {cfg['cg_iters']} (c {cfg['cg_damping']}, d {cfg['lam_damping']}); summed over the tasks\n")
    print(markdown_table(HEADER, rows))
    print(f"\nmeta-gradient relative error against float64: float32 {s['fp32']:.2e}, bf16 GEMMs {s['bf16']:.2e} "
          f"(cosine {s['bf16_cos']:.5f})")
    return rows
