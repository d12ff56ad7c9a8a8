"""``python -m bench compile``: every Triton kernel compiled for the GPU (no GPU needed) at each
specialisation its launcher makes for the paper's shapes, with the registers, spills and
shared memory ``ptxas -v`` reports and the occupancy they allow on an H100. ``--grid`` adds a
grid of shapes beyond the paper's (:func:`~bench.compile.recording.grid_shapes`: T = 1 .. 64,
1 .. 100 support examples, 16 .. 128 channels, fp32 and fp64; 960 shapes), each distinct
specialisation compiled once (``bench/results/compile.md`` is that report).

How the launches are found: on data-less ``meta`` tensors (no GPU, no memory) the paper's
networks run one meta-step's engine work (inner loop, linearisation, HVPs, CG solve) inside
:func:`imaml_kernels.ops.record_triton_launches`: every ``imaml::`` op (its fake, here) also
calls its Triton launcher with a ``wrap`` that records ``(kernel, grid, args, kwargs)`` and
never launches. Triton's own binder (the one ``JITFunction.run`` uses) turns each recorded call into
the signature, constexprs (ints equal to 1 included) and divisibility attributes a real launch
would specialise on; each distinct specialisation is compiled once with ``triton.compile(
ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))`` and the
PTX is run through the wheel's ``ptxas -v``.

Occupancy per SM is estimated from registers, threads and shared memory against the H100's
limits (65,536 registers, 2,048 threads, 228 KB shared memory, 32 blocks; registers allocated
per warp in units of 256, 1 KB of shared memory reserved per block).

The package, by concern: :mod:`.recording` (the launches of one meta-step),
:mod:`.specialisation` (what Triton would compile for each), :mod:`.compiling` (``triton.compile``
and ``ptxas -v``, the occupancy estimate), :mod:`.tables` (the markdown and plain-data results).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from ..common import ROOT, child_env
from .compiling import ARCHS, H100_SMS, Resources, compile_spec, prefetch, ptxas_path, ptxas_report
from .recording import CONFIGS, DTYPES, Launch, Recorder, Shape, grid_shapes, launches, meta_step_launches, record
from .specialisation import Spec, specialise
from .tables import GridEntry, Row, collect, collect_grid, grid_numbers, markdown, report, results, specs, summary

__all__ = [
    "ARCHS", "CONFIGS", "DTYPES", "GridEntry", "H100_SMS", "Launch", "Recorder", "Resources", "Row", "Shape", "Spec",
    "collect", "collect_grid", "compile_spec", "grid_numbers", "grid_shapes", "launches", "main", "markdown",
    "meta_step_launches", "prefetch", "ptxas_path", "ptxas_report", "record", "report", "results", "run_isolated",
    "specialise", "specs", "summary",
]


def run_isolated(configs=tuple(CONFIGS), dtypes=tuple(DTYPES), archs=ARCHS, timeout=900, grid=False) -> dict:
    """:func:`results` computed in a fresh interpreter with ``TRITON_INTERPRET=0``: under the
    Triton interpreter (the test suite) ``triton.language``'s own jit functions are interpreted
    ones, which the compiler cannot take."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "compile.json")
        cmd = [sys.executable, "-m", "bench.compile", "--json", path, "--configs", *configs, "--dtypes", *dtypes,
               "--arch", *map(str, archs)] + (["--grid"] if grid else [])
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(TRITON_INTERPRET="0"), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"bench.compile failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        with open(path) as f:
            return json.load(f)


def _interpreting():
    import triton

    return bool(triton.knobs.runtime.interpret)


def main(args):
    """``python -m bench compile``: the table (compiled in a fresh interpreter when this one runs
    Triton's interpreter), printed and written to ``--out``."""
    configs = tuple(getattr(args, "configs", None) or CONFIGS)
    dtypes = tuple(getattr(args, "dtypes", None) or DTYPES)
    archs = tuple(getattr(args, "arch", None) or ARCHS)
    grid = bool(getattr(args, "grid", False))
    if _interpreting():
        text = run_isolated(configs, dtypes, archs, timeout=7200, grid=grid)["markdown"]
    else:
        text = report(configs, dtypes, archs, grid=collect_grid(grid_shapes(dtypes)) if grid else None)
    print(text)
    if getattr(args, "out", None):
        with open(args.out, "w") as f:
            f.write(text)
