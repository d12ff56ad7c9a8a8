"""Fixed against meta-learned λ at the CPU demo's budget (issue 23).

``python -m bench lam-study [--runs DIR] [--out DIR] [--tabulate-only]`` trains the demo preset
(``omniglot-5w1s-demo``: same seed, same steps, same tasks) three times, each in its own
process, one after the other: λ fixed at the preset's 2.0, ``--learn-lam scalar`` and
``--learn-lam per-layer`` (log λ from 2.0, Adam 1e-2, within [1e-2, 1e2]). Each run ends with
the trainer's evaluation on the same 600 meta-test tasks (seed 0), at the λ it learned. The
table gives accuracy ± 95% interval, the final λ (per layer), the training seconds, and the
query loss/accuracy over the last 10% of the steps; the figure overlays the λ curves and the
smoothed training accuracy.

``--tabulate-only`` reads existing run folders (``<runs>/fixed``, ``scalar``, ``per-layer``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .common import machine_header, markdown_table

MODES = ("fixed", "scalar", "per-layer")
PRESET = "omniglot-5w1s-demo"


def command(mode: str, out: Path, threads: int, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "imaml_kernels.trainer", "--preset", PRESET, "--out", str(out), "--overwrite",
           "--threads", str(threads), "--no-progress", *extra]
    if mode != "fixed":
        cmd += ["--learn-lam", mode]
    return cmd


def read_run(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    ev = json.loads((folder / "eval.json").read_text())
    tail = train[-max(1, len(train) // 10):]
    mean = lambda k: sum(r[k] for r in tail if r.get(k) is not None) / max(1, sum(r.get(k) is not None for r in tail))  # noqa: E731
    lam_keys = sorted({k for r in train for k in r if k == "lam" or k.startswith("lam/")})
    return {
        "train": train,
        "lam_keys": lam_keys,
        "final_lam": {k: train[-1][k] for k in lam_keys},
        "accuracy": ev["accuracy"],
        "ci95": ev["ci95"],
        "tasks": ev["tasks"],
        "steps": train[-1]["step"] if train else 0,
        "tail_loss": mean("loss"),
        "tail_acc": mean("acc"),
        "seconds": train[-1].get("time") if train else None,
    }


def _lam_text(final: dict) -> str:
    if not final:
        return "2.0 (fixed)"
    if list(final) == ["lam"]:
        return f"{final['lam']:.3f}"
    def order(k):
        name = k.split("/", 1)[1]
        return (0, int(name), "") if name.isdigit() else (1, 0, name)

    return ", ".join(f"{k.split('/', 1)[1] or '·'}: {final[k]:.3f}" for k in sorted(final, key=order))


def tabulate(runs: Path, out: Path, header: str, argv: str, wall: dict) -> str:
    res = {m: read_run(runs / m) for m in MODES if (runs / m / "eval.json").exists()}
    rows = []
    for m, r in res.items():
        rows.append([m, f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}", r["steps"], _lam_text(r["final_lam"]),
                     f"{r['tail_loss']:.3f}", f"{100 * r['tail_acc']:.1f}",
                     "-" if r["seconds"] is None else f"{r['seconds']:.0f}", f"{wall[m]:.0f}" if m in wall else "-"])
    table = markdown_table(["λ", f"meta-test accuracy (%), {next(iter(res.values()))['tasks'] if res else 0} tasks, 95% CI",
                            "meta-steps", "final λ", "query loss, last 10%", "train acc. (%), last 10%",
                            "training s", "process s"], rows)
    text = (f"# Fixed against meta-learned λ at the CPU demo's budget\n\n{header}\n\n`{argv}`\n\n"
            f"Preset `{PRESET}`, same seed and task stream in every run; each run in its own process, one after "
            f"the other; evaluation: the trainer's, on the same meta-test tasks (seed 0), at the λ the run ended "
            f"with. Per-layer λ are named by the module that owns the parameters (the paper's network, an `nn.Sequential`: 0, 3, 7, 10 the convolutions, 1, 4, 8, 11 their BatchNorms, 14 the head).\n\n{table}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lam_study.md").write_text(text)
    _plot(res, out / "lam_study.png")
    return text


def _plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (m, r) in enumerate(res.items()):
        steps = [t["step"] for t in r["train"]]
        acc = [100 * t["acc"] for t in r["train"]]
        w = max(1, len(acc) // 25)
        sm = [sum(acc[max(0, j - w + 1):j + 1]) / len(acc[max(0, j - w + 1):j + 1]) for j in range(len(acc))]
        a1.plot(steps, sm, color=f"C{i}", label=f"{m}: {100 * r['accuracy']:.2f}% meta-test")
        for j, k in enumerate(r["lam_keys"]):
            a2.plot(steps, [t[k] for t in r["train"]], color=f"C{i}", ls=["-", "--", ":", "-."][j % 4], lw=1.2,
                    label=f"{m}: {k}")
    a2.axhline(2.0, color="C0", lw=1, label="fixed: 2.0")
    a1.set(xlabel="meta-step", ylabel="train query accuracy (%), running mean")
    a1.legend(fontsize=8)
    a2.set(xlabel="meta-step", ylabel="λ", yscale="log")
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(args) -> None:
    runs, out = Path(args.runs), Path(args.out)
    wall = {}
    if not args.tabulate_only:
        for m in MODES:
            t0 = time.perf_counter()
            subprocess.run(command(m, runs / m, args.threads, args.extra or []), check=True)
            wall[m] = time.perf_counter() - t0
        (runs / "wall.json").write_text(json.dumps(wall))
    elif (runs / "wall.json").exists():
        wall = json.loads((runs / "wall.json").read_text())
    argv = "python -m bench lam-study " + " ".join(sys.argv[2:])
    print(tabulate(runs, out, machine_header(), argv, wall))
