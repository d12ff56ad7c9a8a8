"""Every Triton kernel compiles for the GPU (sm_90a and sm_80, no GPU needed) at each
specialisation its launchers make, at the paper's shapes and over a grid beyond them, without
spilling.

The paper's shapes: one meta-step of Omniglot 5-way 1-shot (T = 32), 20-way 1-shot (T = 16)
and MiniImagenet 5-way 1-shot (T = 4), float32 and float64. The grid
(:func:`bench.compile.grid_shapes`, 960 shapes): both networks at T in {1, 2, 8, 32, 64}, 1 to
100 support examples, 16 to 128 channels, float32 and float64. Launches are recorded through
``imaml_kernels.ops.record_triton_launches`` on data-less tensors; signatures, constexprs and
alignment attributes come from Triton's own binder (:mod:`bench.compile`), so what compiles is
what the launchers' block-size logic asks for, not a copied list. The grid's shapes share most
specialisations (distinct constexprs, warps and alignment are what compile, not shapes): each
distinct one is compiled once per target, in parallel workers, and Triton's on-disk cache
makes reruns cheap. Registers and spills are ``ptxas -v``'s. It all runs once, in a subprocess
without ``TRITON_INTERPRET`` (under the interpreter Triton's own library functions cannot be
compiled): about 8 minutes cold on 2 cores (recording the grid about 1.5 of them), under a
minute warm.

The committed table, ``bench/results/compile.md`` (``python -m bench compile --grid --out
...``), must list the grid's specialisations as they are now.
"""

import collections
import importlib
import os
import pkgutil
import re
from pathlib import Path

import pytest

pytest.importorskip("triton")

from bench import compile as bc  # noqa: E402

MAX_REGS_8_WARPS = 128  # the tuning target: <= 128 registers for kernels launched with 8 warps
TABLE = Path(__file__).resolve().parents[1] / "bench" / "results" / "compile.md"

pytestmark = pytest.mark.skipif(not os.path.exists(bc.ptxas_path()), reason="the triton wheel has no ptxas")


@pytest.fixture(scope="module")
def data():
    return bc.run_isolated(grid=True, timeout=3600)


def _specs(rows):
    """One row per distinct specialisation."""
    return list({r["spec"]: r for r in rows}.values())


def _bad(entries, arch):
    out = []
    for r in entries:
        res = r["res"][str(arch)]
        if res["error"] or res["spills"] or (r["warps"] == 8 and res["regs"] > MAX_REGS_8_WARPS):
            out.append(f"{r['kernel']} [{r['blocks']}] warps={r['warps']} ({r['config']} {r['shape']}): "
                       + (res["error"] or f"{res['regs']} registers, spills {res['spill_stores']}+{res['spill_loads']} B"))
    return out


@pytest.mark.parametrize("arch", bc.ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("dtype", list(bc.DTYPES))
def test_compiles_without_spills(data, dtype, arch):
    specs = _specs([r for r in data["rows"] if r["dtype"] == dtype])
    assert specs, "no launches recorded"
    bad = _bad(specs, arch)
    assert not bad, f"{len(bad)} of {len(specs)} specialisations for sm_{arch}:\n" + "\n".join(bad)


@pytest.mark.parametrize("arch", bc.ARCHS, ids=lambda a: f"sm{a}")
def test_grid_compiles_without_spills(data, arch):
    """Every distinct specialisation of the grid: compiles, no spills, <= 128 registers at 8 warps."""
    specs = data["grid"]["specs"]
    bad = _bad(specs, arch)
    assert not bad, f"{len(bad)} of {len(specs)} grid specialisations for sm_{arch}:\n" + "\n".join(bad)


def test_grid_spans_the_shapes_users_meet():
    """T = 1 (adapting on one task) to 64, 1 to 100 support examples, 16 to 128 channels, both dtypes."""
    shapes = bc.grid_shapes()
    assert len(shapes) == 960
    assert {s.T for s in shapes} >= {1, 2, 8, 32, 64}
    support = {s.way * s.shot for s in shapes}
    assert min(support) == 1 and 2 in support and max(support) == 100
    assert min(s.channels for s in shapes) == 16 and max(s.channels for s in shapes) == 128
    assert {s.dtype for s in shapes} == {"fp32", "fp64"} and {s.net for s in shapes} == {"omniglot", "miniimagenet"}


def test_committed_table_covers_the_grid(data):
    """bench/results/compile.md lists the grid's specialisations as the launchers make them now
    (regenerate: ``python -m bench compile --grid --out bench/results/compile.md``), none spilling."""
    text = TABLE.read_text()
    section = text[text.index("## The grid"):]
    n = len(data["grid"]["specs"])
    assert f"**{n} distinct specialisations; 0 spill, 0 fail to compile;" in section, \
        f"the committed table is stale: the grid has {n} specialisations now"
    rows = re.findall(r"^\| `(_\w+)` \| (fp\d\d) \| ([^|]*) \| (\d+) \|", section.split("### Per specialisation")[1], re.M)
    committed = collections.Counter((k, dt, b.strip(), int(w)) for k, dt, b, w in rows)
    now = collections.Counter((s["kernel"], s["dtype"], s["blocks"], s["warps"]) for s in data["grid"]["specs"])
    assert committed == now, f"stale rows: {sorted((committed - now).elements())}; missing: {sorted((now - committed).elements())}"


def test_every_kernel_is_launched(data):
    """Each ``@triton.jit`` kernel of :mod:`imaml_kernels.triton` (``*_kernel``; the other jit
    functions are helpers inlined into them) is launched at the paper's shapes."""
    import imaml_kernels.triton as pkg

    kernels = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and getattr(getattr(obj, "fn", None), "__module__", None) == mod.__name__:
                kernels.add(name)
    launched = {r["kernel"] for r in data["rows"]}
    assert kernels and kernels <= launched, f"never launched at the paper's shapes: {sorted(kernels - launched)}"


def test_batchnorm_fills_the_gpu(data):
    """BatchNorm at T = 32: the largest layer runs at least 2 programs per SM of an H100 (row
    splits, two launches); the smallest (2 x 2 pixels) stays one launch per stage."""
    bn = [r for r in data["rows"] if r["config"] == "omniglot-5w1s" and r["kernel"].startswith("_bn_")]
    assert max(r["programs"] for r in bn) >= 2 * bc.H100_SMS
    assert any(r["constexprs"]["PHASE"] == 0 for r in bn)


def test_table(data):
    text = data["markdown"]
    assert text.startswith("# Triton kernels compiled") and "| kernel | dtype | config |" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| `_")]
    assert len(table) >= len(data["rows"]) + len(data["grid"]["specs"])
    assert "## The grid" in text and "### Per specialisation" in text
