"""Every Triton kernel compiles for the GPU (sm_90 and sm_80, no GPU needed) at each
specialisation its launcher makes for the paper's shapes, without spilling.

The launches are those of one meta-step of Omniglot 5-way 1-shot (T = 32), 20-way 1-shot
(T = 16) and MiniImagenet 5-way 1-shot (T = 4), float32 and float64, recorded through
``imaml_kernels.ops.record_triton_launches`` on data-less tensors; signatures, constexprs and
alignment attributes come from Triton's own binder (:mod:`bench.compile`), so what compiles
is what the launchers' block-size logic asks for, not a copied list. Registers and spills are
``ptxas -v``'s. It all runs once, in a subprocess without ``TRITON_INTERPRET`` (under the
interpreter Triton's own library functions cannot be compiled): each distinct
specialisation compiles once per target, about 35 s cold on 2 cores (Triton's on-disk cache
makes reruns faster).
"""

import importlib
import os
import pkgutil

import pytest

pytest.importorskip("triton")

from bench import compile as bc  # noqa: E402

MAX_REGS_8_WARPS = 128  # the tuning target: <= 128 registers for kernels launched with 8 warps

pytestmark = pytest.mark.skipif(not os.path.exists(bc.ptxas_path()), reason="the triton wheel has no ptxas")


@pytest.fixture(scope="module")
def data():
    return bc.run_isolated()


def _specs(rows):
    """One row per distinct specialisation."""
    return list({r["spec"]: r for r in rows}.values())


@pytest.mark.parametrize("arch", bc.ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("dtype", list(bc.DTYPES))
def test_compiles_without_spills(data, dtype, arch):
    specs = _specs([r for r in data["rows"] if r["dtype"] == dtype])
    assert specs, "no launches recorded"
    bad = []
    for r in specs:
        res = r["res"][str(arch)]
        if res["error"] or res["spills"] or (r["warps"] == 8 and res["regs"] > MAX_REGS_8_WARPS):
            bad.append(f"{r['kernel']} [{r['blocks']}] warps={r['warps']} ({r['config']} {r['shape']}): "
                       + (res["error"] or f"{res['regs']} registers, spills {res['spill_stores']}+{res['spill_loads']} B"))
    assert not bad, f"{len(bad)} of {len(specs)} specialisations for sm_{arch}:\n" + "\n".join(bad)


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
    assert len(table) >= len(data["rows"])
