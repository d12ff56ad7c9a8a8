"""Compiling a :class:`~bench.compile.specialisation.Spec` for ``sm_<arch>`` with
``triton.compile`` and reading registers, spills and shared memory from the wheel's
``ptxas -v`` (:func:`compile_spec`, cached; :func:`prefetch` fills the cache in forked
processes); the occupancy those allow on an H100 (:meth:`Resources.occupancy`)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional

from .specialisation import Spec

ARCHS = (90, 80)


def sm(arch: int) -> str:
    """The target's name: Triton compiles capability 9.0 for ``sm_90a`` (wgmma, setmaxnreg)."""
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


# H100 SXM limits per SM (the occupancy estimate).
SM_REGS, SM_THREADS, SM_SMEM, SM_BLOCKS = 65536, 2048, 228 * 1024, 32
BLOCK_SMEM_RESERVED = 1024
REG_ALLOC_UNIT = 256  # registers per warp are allocated in units of 256
H100_SMS = 132


@dataclasses.dataclass
class Resources:
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int  # bytes: Triton's dynamic shared memory + ptxas' static
    warps: int
    error: Optional[str] = None

    @property
    def spills(self):
        return self.spill_stores + self.spill_loads

    def occupancy(self):
        """(blocks per SM, fraction of the 64 warp slots) on an H100."""
        if self.error:
            return 0, 0.0
        warp_regs = -(-max(self.regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        by_regs = (SM_REGS // warp_regs) // self.warps
        by_threads = SM_THREADS // (32 * self.warps)
        by_smem = SM_SMEM // (self.smem + BLOCK_SMEM_RESERVED)
        blocks = min(by_regs, by_threads, by_smem, SM_BLOCKS)
        return blocks, blocks * self.warps / (SM_THREADS // 32)


def ptxas_path():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def ptxas_report(ptx: str) -> Dict[str, int]:
    """``ptxas -v`` of ``ptx`` (for the ``.target`` it names) -> regs, stack, spills, static smem."""
    arch = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"ptxas failed:\n{res.stderr}")
    return _parse_ptxas(res.stderr)


def _parse_ptxas(log: str) -> Optional[Dict[str, int]]:
    if not _PTXAS_RE["regs"].search(log):
        return None
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        out[key] = int(m.group(1)) if m else 0
    return out


def _first_line(e):
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:300]


_RESULTS: Dict[tuple, "Resources"] = {}


def compile_spec(spec: Spec, arch: int) -> Resources:
    """Compiles ``spec`` for ``sm_<arch>`` (cached for the session; Triton's on-disk cache makes
    reruns cheap) -> its resources; a compile error is returned in ``error``."""
    key = (spec, arch)
    if key not in _RESULTS:
        _RESULTS[key] = _compile(spec, arch)
    return _RESULTS[key]


def _compile(spec: Spec, arch: int) -> Resources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec.kernel, dict(spec.signature), dict(spec.constexprs),
                    {k: [list(a) for a in v] for k, v in spec.attrs})
    # Triton runs ptxas -v itself and prints its log when asked: read it there; on a hit of
    # Triton's on-disk cache (no ptxas run) run ptxas on the PTX.
    log = io.StringIO()
    dump = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        rep = _parse_ptxas(log.getvalue()) or ptxas_report(k.asm["ptx"])
    except Exception as e:  # noqa: BLE001 - reported per kernel, the test fails on it
        return Resources(0, 0, 0, 0, 0, spec.num_warps, error=f"{type(e).__name__}: {_first_line(e)}")
    finally:
        triton.knobs.nvidia.dump_ptxas_log = dump
    return Resources(rep["regs"], rep["spill_stores"], rep["spill_loads"], rep["stack"],
                     int(k.metadata.shared) + rep["smem"], spec.num_warps)


_PREFETCH: List[tuple] = []


def _compile_job(i):
    return compile_spec(*_PREFETCH[i])


def prefetch(spec_list, archs=ARCHS, workers=None):
    """Compiles every (spec, arch) into :func:`compile_spec`'s cache in ``workers`` forked
    processes (default: ``IMAML_COMPILE_WORKERS`` or the CPU count, at most 4; the compiler
    holds the GIL, so threads would not help)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    global _PREFETCH
    workers = workers or int(os.environ.get("IMAML_COMPILE_WORKERS", 0)) or min(4, os.cpu_count() or 1)
    jobs = [(s, a) for s in spec_list for a in archs if (s, a) not in _RESULTS]
    if workers <= 1 or len(jobs) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        for s, a in jobs:
            compile_spec(s, a)
        return
    _PREFETCH = jobs  # the children inherit it (fork): only indices and results are pickled
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for (s, a), res in zip(jobs, pool.map(_compile_job, range(len(jobs)), chunksize=1)):
                _RESULTS[(s, a)] = res
    finally:
        _PREFETCH = []
