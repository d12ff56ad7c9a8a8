"""``python -m bench all [--quick]``: every suite, tables on stdout, CSV and PNG plots under
``--out`` (default ``bench/results/<machine>/``). Every comparison runs each implementation in
its own fresh processes (:mod:`bench.fresh`)."""

import re
from pathlib import Path

import torch

from . import cg, hvp, memory, meta_step, models
from .common import cpu_model_and_flags, gemm_rate, machine_header, markdown_table, write_csv


def machine_slug():
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{cpu_model_and_flags()[0]}-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9]+", "-", name.strip()).strip("-").lower()


def _plot_cg(path, records, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for (P, backend), pts in sorted(records.items()):
        Ts, ms = zip(*sorted(pts))
        ax.plot(Ts, ms, "o-" if backend != "eager" else "s--", label=f"{backend}, P={P:,}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tasks T")
    ax.set_ylabel("ms per CG iteration (vector work)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_speedup(path, labels, speedups, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.barh(labels, speedups, color="tab:orange")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speedup (x)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    from tqdm import tqdm

    out = Path(args.out or Path(__file__).parent / "results" / machine_slug())
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    quick = args.quick
    Ts = (1, 8, 32) if quick else (1, 8, 32, 128)
    Ps = (10_000, 113_221) if quick else (10_000, 113_221, 1_000_000)
    report = [machine_header(), ""]

    cg_rows, cg_records = [], {}
    for T, P in tqdm([(T, P) for P in Ps for T in Ts], desc="cg"):
        rows, res = cg.run(T=T, P=P, device=device, repeat=5 if quick else 20)
        for name, sec in res.items():
            gbs = 10 * T * P * 4 / sec / 1e9
            cg_rows.append((T, P, name, f"{sec * 1e3:.3f}", f"{gbs:.1f}"))
            key = "eager" if name.startswith("eager (masked") else name
            if key in ("eager", "cpu", "cuda", "triton"):
                cg_records.setdefault((P, key), []).append((T, sec * 1e3))
    header = ("T", "P", "backend", "ms / iteration", "effective GB/s")
    write_csv(out / "cg.csv", header, cg_rows)
    _plot_cg(out / "cg_time_vs_T.png", cg_records, f"CG iteration, {device}")
    report += ["## cg: one CG iteration's vector work (float32)", "", markdown_table(header, cg_rows), ""]
    solve_rows = []
    for T, P in [(T, P) for P in Ps for T in Ts if T * P <= 32 * 1_000_000]:
        rows, _ = cg.run_solve(T=T, P=P, device=device, repeat=3 if quick else 10)
        solve_rows += [(T, P, *r) for r in rows]
    header = ("T", "P", "backend", "ms / 5-iteration solve", "ms / iteration")
    write_csv(out / "cg_solve.csv", header, solve_rows)
    report += ["## cg: a full 5-iteration cg_solve (diagonal matvec, float32)", "", markdown_table(header, solve_rows), ""]

    hvp_rows, _ = hvp.run(["omniglot-5w1s"] if quick else list(hvp.SHAPES), device=device, repeat=2 if quick else 5, T=8 if quick else None)
    write_csv(out / "hvp.csv", hvp.HEADER, hvp_rows)
    report += ["## hvp: batched Hessian-vector products", "", markdown_table(hvp.HEADER, hvp_rows), "",
               f"measured float32 GEMM rate (1024^3): {gemm_rate(device):.1f} GFLOP/s", ""]

    T_ms, steps_ms = (8, 4) if quick else (32, 16)
    ms_rows, ms = meta_step.run(T=T_ms, inner_steps=steps_ms, device=device, repeat=1 if quick else 3)
    write_csv(out / "meta_step.csv", meta_step.HEADER, ms_rows)
    others = [k for k in ("batched", "serial", "torchopt") if k in ms]
    _plot_speedup(out / "meta_step_speedup.png", [f"vs {meta_step.LABELS[k]}" for k in others],
                  [ms[k] / ms["engine"] for k in others], f"iMAML meta-step (fused engine), {device}")
    report += [f"## meta-step: OmniglotConv(5), 5-way 1-shot, T={T_ms}, {steps_ms} inner steps, 5 CG iterations", "",
               markdown_table(meta_step.HEADER, ms_rows), "", meta_step.summary(ms), ""]

    mem_rows, _ = memory.run(T=2 if quick else 8, device=device, steps=(1, 5, 25) if quick else memory.STEPS, channels=16 if quick else 64, out=out, progress=True)
    header = ("inner steps", "iMAML MiB", "MAML MiB", "iMAML RSS MiB", "MAML RSS MiB")
    report += ["## memory: peak of one meta-gradient vs inner steps", "", markdown_table(header, mem_rows), ""]

    rounds = 1 if quick else 3
    model_results = models.run(device=device, rounds=rounds, repeat=1 if quick else 3)
    models.write(out, model_results, rounds, device)
    report += [models.report(model_results, rounds, device), ""]

    text = "\n".join(report)
    (out / "report.md").write_text(text)
    print(text)
    print(f"wrote {out}/report.md, *.csv, *.png")

