"""The markdown report of ``bench launches`` (:func:`report`), from the result dicts of
:func:`bench.launches.counting.measure`, and the launch budget it checks."""

from __future__ import annotations

import subprocess

from ..common import ROOT, machine_header, markdown_table

BUDGET = 800  # launches per 5-way 1-shot meta-step (the target; goal 500)
GOAL = 500

_METHOD = (
    "`python -m bench launches` (`bench/launches/`): the meta-step runs on fake `cuda` tensors "
    "(FakeTensorMode: no data, no compute) under a counting TorchDispatchMode. *Kernel launches*: aten ops on "
    "CUDA tensors except views, metadata and `empty*` allocations, one kernel each (cuBLAS may use 2 for a GEMM); "
    "`imaml::` ops as their Triton launches {hook} *Host syncs*: `.item()`/`bool()`/`int()` "
    "(`_local_scalar_dense`), `nonzero`, `masked_select`, `unique*`, "
    "`equal`, boolean-mask indexing, device-to-host copies and `synchronize()` calls. One warm-up step (Adam's "
    "state), then one counted step. Adam `foreach=True` (its default on CUDA parameters), step counters on "
    "the host as in the trainer: CPU-tensor ops, neither launches nor syncs. Task sampling is outside the "
    "meta-step and not counted. The baseline is counted at T = 1 and 2 and extrapolated linearly (exact: "
    "the loop body is the same for every task)."
)
_HOOKED = ("(counted through `imaml_kernels.ops.record_triton_launches`).",
           "(1 each: `imaml_kernels.ops.record_triton_launches` is not there yet).")


def _n(x):
    return f"{x:,}"


def _revision():
    """``<commit>`` of the checkout, ``+ local changes`` when ``imaml_kernels/`` differs from it."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "imaml_kernels"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + (" + local changes in imaml_kernels/" if dirty else "")


def _summary(results, fused, base):
    """The table of every counted step, then the ratios, the budget and the backends."""
    rows = []
    for shape in dict.fromkeys(r["shape"] for r in results):
        for kind, d in (("fused: trainer `meta_step`", fused), ("per-task baseline (imaml_dev style)", base)):
            r = d.get(shape)
            if r is None:
                continue
            c = r["config"]
            rows.append((kind, shape, c["meta_batch"], c["inner_steps"], c["cg_iters"], _n(r["launches"]), _n(r["ops"]),
                         _n(r["sync_count"]), sum(n for _, n in r["h2d"]), sum(r["host_ops"].values())))
    lines = [markdown_table(
        ("path", "shape", "T", "inner steps", "CG iters", "kernel launches", "launching ops", "host syncs",
         "H2D copies", "CPU-tensor ops"), rows), ""]
    for shape in fused:
        if shape in base:
            lines.append(f"- {shape}: the baseline launches {base[shape]['launches'] / fused[shape]['launches']:.0f}x "
                         f"as many kernels as the fused path.")
    f5 = fused.get("omniglot-5w1s")
    if f5 is not None:
        ok = f5["launches"] <= BUDGET and not f5["sync_count"]
        lines.append(f"- Budget at 5-way 1-shot (<= {BUDGET} launches, goal <= {GOAL}; 0 host syncs): "
                     f"{'met' if ok else 'not met'} ({_n(f5['launches'])} launches, {f5['sync_count']} syncs).")
    b = next(iter(fused.values()), None)
    if b is not None:
        lines.append(f"- Backends for CUDA float32: CG `{b['backends']['cg']}`, engine stages `{b['backends']['engine']}`.")
    return lines


def _by_op(shape, r, top):
    """One fused step's launches by op (the top ``top``), its Triton kernels and its phases."""
    lines = ["", f"## Fused {shape}: launches by op (top {top})", ""]
    tot = r["launches"]
    rows = [(f"`{op}`", calls, kern, f"{100 * kern / tot:.1f}%") for op, (calls, kern) in list(r["by_op"].items())[:top]]
    rest = sum(k for _, (_, k) in list(r["by_op"].items())[top:])
    rows.append((f"{len(r['by_op']) - top} other ops", "", rest, f"{100 * rest / tot:.1f}%"))
    lines.append(markdown_table(("op", "calls", "kernels", "share"), rows))
    if r["triton"]:
        lines += ["", "Triton kernels: " + ", ".join(f"`{k}` {v}" for k, v in r["triton"].items())]
    if r.get("phases"):
        lines += ["", ("Launches by phase (the outermost frames of each op's call stack; `[Node]`: run by the "
                       "autograd engine in that node's backward):"), ""]
        lines.append(markdown_table(("phase", "kernels"), [(f"`{p}`", n) for p, n in list(r["phases"].items())[:top]]))
    return lines


def _call_sites(f5, top, sites_per_op, every_site):
    """The fused 5w1s step's call sites of its top ops, and every call site of ``every_site``."""
    lines = ["", "## Fused omniglot-5w1s: call sites of the top ops (innermost project frame first)", ""]
    rows = []
    for op, _ in list(f5["by_op"].items())[:top]:
        for site, n, _ in f5["sites"].get(op, [])[:sites_per_op]:
            rows.append((f"`{op}`", n, f"`{site}`"))
    lines.append(markdown_table(("op", "kernels", "call site < callers"), rows))
    for op in every_site:
        if op in f5["sites"]:
            lines += ["", (f"Every call site of `{op}` (omniglot-5w1s, {_n(f5['by_op'][op][1])} kernels) and what it "
                           "copies (shape, strides when not contiguous; `a -> b`: source -> destination):"), ""]
            rows = [(n, f"`{s}`", "; ".join(f"{w} x{c}" for w, c in lay.items())) for s, n, lay in f5["sites"][op]]
            lines.append(markdown_table(("kernels", "call site < callers", "copies"), rows))
    return lines


def _host_syncs(results):
    lines = ["", "## Host synchronisations", ""]
    for r in results:
        label = f"{r['kind']} {r['shape']}"
        if not r["sync_count"]:
            lines.append(f"- {label}: none.")
            continue
        lines.append(f"- {label}: {_n(r['sync_count'])}")
        for x in r["syncs"][:8]:
            lines.append(f"  - {_n(x['count'])} x `{x['op']}` ({x['detail']}) at `{x['site']}`")
    return lines


def report(results, header=None, top=15, sites_per_op=6, every_site=("aten::clone", "aten::copy_")) -> str:
    """The markdown report of :func:`bench.launches.counting.measure`'s results."""
    header = header or machine_header()
    fused = {r["shape"]: r for r in results if r["kind"] == "fused"}
    base = {r["shape"]: r for r in results if r["kind"] == "baseline"}
    hooked = any(r["triton_hook"] for r in results)
    rev = _revision()
    lines = [
        "# Kernel launches and host synchronisations per meta-step (GPU code path)",
        "",
        header + (f" | code {rev}" if rev else ""),
        "",
        _METHOD.format(hook=_HOOKED[0] if hooked else _HOOKED[1]),
        "",
    ]
    lines += _summary(results, fused, base)
    for shape, r in fused.items():
        lines += _by_op(shape, r, top)
    f5 = fused.get("omniglot-5w1s")
    if f5 is not None and f5["sites"]:
        lines += _call_sites(f5, top, sites_per_op, every_site)
    lines += _host_syncs(results)
    return "\n".join(lines) + "\n"
