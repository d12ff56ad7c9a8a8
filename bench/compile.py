"""``python -m bench compile``: every Triton kernel compiled for the GPU (no GPU needed) at each
specialisation its launcher makes for the paper's shapes, with the registers, spills and
shared memory ``ptxas -v`` reports and the occupancy they allow on an H100.

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
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import io
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# The paper's configurations (Rajeswaran et al. 2019; imaml_kernels.trainer.presets): name -> (network,
# way, shot, query per class, tasks per meta-step T).
CONFIGS = {
    "omniglot-5w1s": ("omniglot", 5, 1, 1, 32),
    "omniglot-20w1s": ("omniglot", 20, 1, 1, 16),
    "miniimagenet-5w1s": ("miniimagenet", 5, 1, 15, 4),
}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
ARCHS = (90, 80)

# H100 SXM limits per SM (the occupancy estimate).
SM_REGS, SM_THREADS, SM_SMEM, SM_BLOCKS = 65536, 2048, 228 * 1024, 32
BLOCK_SMEM_RESERVED = 1024
REG_ALLOC_UNIT = 256  # registers per warp are allocated in units of 256
H100_SMS = 132


# --------------------------------------------------------------------------- recording


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: Tuple[int, ...]
    args: tuple
    kwargs: dict
    config: str = ""
    dtype: str = ""


def _jit(kernel):
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        # Under TRITON_INTERPRET=1 even triton.language's own jit functions (tl.zeros, tl.sum)
        # are interpreted ones, which cannot be compiled: see run_isolated.
        raise RuntimeError(f"{kernel!r} is not a JITFunction: compile without TRITON_INTERPRET=1 (run_isolated)")
    return kernel


class Recorder:
    """A ``wrap`` for the launchers: ``Recorder(kernel)[grid](*args, **kwargs)`` appends a
    :class:`Launch` to :attr:`launches` and launches nothing."""

    launches: List[Launch] = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            Recorder.launches.append(Launch(self.kernel, tuple(int(g) for g in grid), args, kwargs))

        return record


def record(fn) -> List[Launch]:
    """The launches ``fn()`` makes through the launchers called with ``wrap=Recorder``."""
    Recorder.launches = []
    try:
        fn(Recorder)
        return list(Recorder.launches)
    finally:
        Recorder.launches = []


@contextlib.contextmanager
def _shapes_only(device):
    """Where the step's tensors live. ``"cuda"`` needs ``FakeTensorMode``, but on a CPU-only
    build of torch a fake CUDA tensor cannot even be sliced; so the default is ``"meta"``
    (shapes only: every op runs its fake), with ``backend="triton"`` let through the dispatch
    check for meta tensors while recording (nothing is launched)."""
    if torch.device(device).type != "meta":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            yield
        return
    from imaml_kernels import dispatch

    if not dispatch.backend_problems("triton", "meta", torch.float32):
        yield
        return
    real = dispatch.backend_problems

    def problems(backend, dev, dtype):
        if backend == "triton" and torch.device(dev).type == "meta":
            return real(backend, "cuda", dtype)
        return real(backend, dev, dtype)

    dispatch.backend_problems = problems
    try:
        yield
    finally:
        dispatch.backend_problems = real


def meta_step_launches(config: str, dtype: torch.dtype, device="meta") -> List[Launch]:
    """The Triton launches of one meta-step of ``config``: the support-set inner loop (two
    proximal steps stand for all: every step launches the same kernels), the query loss's
    linearisation at φ, HVPs and the CG solve of the implicit gradient, on tensors without
    data (``device="meta"``: every ``imaml::`` op runs its fake, which calls the Triton
    launcher with the recording ``wrap``)."""
    import imaml_kernels as ik
    from imaml_kernels import nets, ops

    net_name, way, shot, query, T = CONFIGS[config]
    # The network only gives the engine its structure (parameters are passed flat): built
    # for real on the CPU; every tensor of the step is data-less.
    net = nets.OmniglotConv(way) if net_name == "omniglot" else nets.MiniImagenetConv(way)
    eng = net.batched(backend="triton")
    P = sum(p.numel() for p in net.parameters())
    shape = net.input_shape
    with _shapes_only(device):
        theta = torch.empty(P, device=device, dtype=dtype)
        xs = torch.empty(T, way * shot, *shape, device=device, dtype=dtype)
        ys = torch.zeros(T, way * shot, device=device, dtype=torch.int64)
        xq = torch.empty(T, way * query, *shape, device=device, dtype=dtype)
        yq = torch.zeros(T, way * query, device=device, dtype=torch.int64)
        lam = torch.full((T,), 2.0, device=device, dtype=dtype)

        def run(wrap):
            with ops.record_triton_launches(wrap):
                phi = eng.inner_loop(theta, xs, ys, lam=lam, steps=2, lr=0.1)
                lin = eng.linearize(phi, xq, yq)
                ik.cg_solve(lambda v: v + lin.hvp(v) / 2.0, lin.grad, iters=2, backend="triton")

        launches = record(run)
    for launch in launches:
        launch.config = config
        launch.dtype = {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    return launches


# --------------------------------------------------------------------------- specialisation


class _Mock:
    """Stands in for a tensor in Triton's binder: its dtype and a 16-byte-aligned address
    (as every CUDA allocation and the launchers' contiguous tensors have)."""

    def __init__(self, dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr():
        return 0


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compilation: what ``JITFunction.run`` would key its cache on."""

    kernel: object
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[tuple, object], ...]
    attrs: Tuple[Tuple[tuple, tuple], ...]
    num_warps: int
    num_stages: int

    @property
    def name(self):
        return self.kernel.fn.__name__

    def constexprs_named(self):
        """``[(argument name, value)]`` of the constexpr arguments."""
        names = [n for n, _ in self.signature]
        return [(names[p[0]], v) for p, v in self.constexprs if len(p) == 1]

    def blocks(self) -> str:
        """The constexpr arguments, named (block sizes and flags)."""
        return " ".join(f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in self.constexprs_named()
                        if not n.endswith("_ptr"))


@functools.lru_cache(maxsize=None)
def _binder(kernel):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialise(launch: Launch) -> Spec:
    """The specialisation Triton's JIT would compile for ``launch`` (its own binder)."""
    kernel = _jit(launch.kernel)
    backend, binder = _binder(kernel)
    args = tuple(_Mock(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*args, **kwargs)
    opts, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return Spec(
        kernel,
        tuple(signature.items()),
        tuple(sorted(constexprs.items())),
        tuple(sorted((k, tuple(tuple(a) for a in v)) for k, v in attrs.items())),
        int(opts.num_warps),
        int(opts.num_stages),
    )


# --------------------------------------------------------------------------- compiling


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


# --------------------------------------------------------------------------- the table


def _shape(launch: Launch) -> str:
    t = next((a for a in launch.args if isinstance(a, torch.Tensor)), None)
    return "x".join(map(str, t.shape)) if t is not None else "-"


@dataclasses.dataclass
class Row:
    spec: Spec
    launch: Launch
    programs: int
    count: int  # launches of this (config, shape, spec) in the recorded meta-step


def collect(configs: Sequence[str] = tuple(CONFIGS), dtypes: Sequence[str] = tuple(DTYPES)) -> List[Row]:
    """One row per distinct (config, dtype, kernel, first tensor's shape, grid, specialisation)."""
    rows: Dict[tuple, Row] = {}
    for dt in dtypes:
        for cfg in configs:
            for launch in meta_step_launches(cfg, DTYPES[dt]):
                spec = specialise(launch)
                key = (cfg, dt, spec.name, _shape(launch), launch.grid, spec)
                if key in rows:
                    rows[key].count += 1
                else:
                    programs = 1
                    for g in launch.grid:
                        programs *= g
                    rows[key] = Row(spec, launch, programs, 1)
    return list(rows.values())


def specs(rows: Sequence[Row]) -> List[Spec]:
    """The distinct specialisations of ``rows``, in first-seen order."""
    return list(dict.fromkeys(r.spec for r in rows))


def markdown(rows: Sequence[Row], archs: Sequence[int] = ARCHS) -> str:
    archs = list(archs)
    head = ["kernel", "dtype", "config", "shape", "grid (programs)", "blocks", "warps"]
    for a in archs:
        head += [f"regs sm_{a}", f"spills sm_{a} (B)"]
    head += ["smem (B)", f"occupancy sm_{archs[0]} (blocks/SM, warps)", "launches"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda r: (r.spec.name, r.launch.dtype, list(CONFIGS).index(r.launch.config)
                                        if r.launch.config in CONFIGS else 99, -r.programs))
    for r in order:
        res = [compile_spec(r.spec, a) for a in archs]
        cells = [f"`{r.spec.name}`", r.launch.dtype, r.launch.config, _shape(r.launch),
                 f"{'x'.join(map(str, r.launch.grid))} ({r.programs})", r.spec.blocks(), str(r.spec.num_warps)]
        for x in res:
            if x.error:
                cells += ["**error**", x.error.replace("|", "/")]
            else:
                cells += [str(x.regs), f"**{x.spill_stores}+{x.spill_loads}**" if x.spills else "0"]
        blocks, frac = res[0].occupancy()
        cells += [str(res[0].smem), f"{blocks}, {frac:.0%}", str(r.count)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: Sequence[Row], archs: Sequence[int] = ARCHS) -> str:
    """Per kernel: the most registers and spill bytes over its specialisations."""
    by = collections.defaultdict(list)
    for s in specs(rows):
        by[s.name].append(s)
    head = ["kernel", "specialisations"] + [f"max regs sm_{a}" for a in archs] + [f"max spills sm_{a} (B)" for a in archs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(by):
        res = {a: [compile_spec(s, a) for s in by[name]] for a in archs}
        cells = [f"`{name}`", str(len(by[name]))]
        cells += [str(max(x.regs for x in res[a])) for a in archs]
        cells += [str(max(x.spills for x in res[a])) for a in archs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(configs=tuple(CONFIGS), dtypes=tuple(DTYPES), archs=ARCHS, rows=None) -> str:
    rows = collect(configs, dtypes) if rows is None else rows
    prefetch(specs(rows), archs)
    n = len(specs(rows))
    from .common import machine_header

    head = (f"# Triton kernels compiled for the GPU at the paper's shapes\n\n"
            f"{machine_header()} (compiled only: no GPU needed) | "
            f"targets {', '.join(f'sm_{a}' for a in archs)}\n\n"
            f"`python -m bench compile`: {n} distinct specialisations, from one meta-step of each of "
            f"{', '.join(configs)} ({', '.join(dtypes)}) recorded without a GPU (2 inner steps, the query "
            f"linearisation, 2 CG iterations: `launches` counts them). Registers and spills (stores+loads, "
            f"bytes) are `ptxas -v`'s (the wheel's); smem is Triton's dynamic shared memory plus ptxas' static; "
            f"occupancy is estimated per SM against the H100's limits (65,536 registers, 2,048 threads, "
            f"228 KB shared memory, 32 blocks; {H100_SMS} SMs).\n")
    return "\n".join([head, "## Per kernel\n", summary(rows, archs), "", "## Per launch\n", markdown(rows, archs), ""])


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


def results(configs=tuple(CONFIGS), dtypes=tuple(DTYPES), archs=ARCHS) -> dict:
    """Everything as plain data: ``{"rows": [...], "markdown": report}``; a row per launch
    shape with its specialisation's resources per target."""
    rows = collect(configs, dtypes)
    prefetch(specs(rows), archs)
    out = []
    for r in rows:
        res = {}
        for a in archs:
            x = compile_spec(r.spec, a)
            res[str(a)] = dict(dataclasses.asdict(x), spills=x.spills, occupancy=x.occupancy()[1])
        out.append(dict(kernel=r.spec.name, dtype=r.launch.dtype, config=r.launch.config, shape=_shape(r.launch),
                        grid=list(r.launch.grid), programs=r.programs, count=r.count, warps=r.spec.num_warps,
                        blocks=r.spec.blocks(), constexprs={n: v for n, v in r.spec.constexprs_named()},
                        spec=specs(rows).index(r.spec), res=res))
    return {"rows": out, "markdown": report(configs, dtypes, archs, rows)}


def run_isolated(configs=tuple(CONFIGS), dtypes=tuple(DTYPES), archs=ARCHS, timeout=900) -> dict:
    """:func:`results` computed in a fresh interpreter with ``TRITON_INTERPRET=0``: under the
    Triton interpreter (the test suite) ``triton.language``'s own jit functions are interpreted
    ones, which the compiler cannot take."""
    import json
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "compile.json")
        cmd = [sys.executable, "-m", "bench.compile", "--json", path, "--configs", *configs, "--dtypes", *dtypes,
               "--arch", *map(str, archs)]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"bench.compile failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        with open(path) as f:
            return json.load(f)


def _interpreting():
    import triton

    return bool(triton.knobs.runtime.interpret)


def main(args):
    configs = tuple(getattr(args, "configs", None) or CONFIGS)
    dtypes = tuple(getattr(args, "dtypes", None) or DTYPES)
    archs = tuple(getattr(args, "arch", None) or ARCHS)
    if _interpreting():
        text = run_isolated(configs, dtypes, archs)["markdown"]
    else:
        text = report(configs, dtypes, archs)
    print(text)
    if getattr(args, "out", None):
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS))
    parser.add_argument("--dtypes", nargs="*", choices=list(DTYPES))
    parser.add_argument("--arch", type=int, nargs="*", choices=[80, 90])
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="write results() as JSON here instead of printing the table")
    a = parser.parse_args()
    if a.json:
        data = results(tuple(a.configs or CONFIGS), tuple(a.dtypes or DTYPES), tuple(a.arch or ARCHS))
        with open(a.json, "w") as f:
            json.dump(data, f)
    else:
        main(a)
