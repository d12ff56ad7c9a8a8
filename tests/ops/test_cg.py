"""The fused CG iteration: ``cg_dots`` (per-block float64 partial dot products) and
``cg_update`` (per-task α, β and status from the summed partials, then the vector updates), on
every backend against the twin (:mod:`imaml_kernels.reference.cg`); the masking of converged
and broken-down tasks; validation; opcheck. The solver built on them, ``cg_solve``, is
tested in ``tests/test_cg.py``."""

import math

import pytest
import torch

from imaml_kernels import dispatch
from imaml_kernels import reference as ref

from .common import (BACKENDS, F32, F64, FAMILIES, KERNELS, backends, case, cast, check_op, device, gen, grid, op_of,
                     opcheck, poisoned, randn, runs)

assert FAMILIES["cg"] == ("cg_dots", "cg_update")
CHUNK = 4096  # the block length of the CUDA C++ and Triton kernels (any for the C++ and the twin)


def cg_args(name, T, P, chunk, dtype, dev):
    """``cg_dots``: random r, p, Ap (p·Ap > 0) and poisoned partials. ``cg_update``: the same
    vectors with their partials from the twin; task 2 has converged (threshold inf), task 3
    broke down before (with fewer tasks, the last takes their role); status_out poisoned."""
    g = gen(f"cg-{T}-{P}")
    x, r, p = cast(dtype, dev, randn(g, T, P), randn(g, T, P), randn(g, T, P))
    (Ap,) = cast(dtype, dev, p.double().cpu() * (0.5 + torch.rand(T, P, generator=g, dtype=F64)))
    nb = math.ceil(P / chunk)
    if name == "cg_dots":
        return (r, p, Ap, poisoned(T, nb, 4, dev=dev), chunk)
    partials = torch.empty(T, nb, 4, dtype=F64, device=dev)
    ref.cg_dots(r, p, Ap, partials, chunk)
    status_in = torch.zeros(T, dtype=torch.int32, device=dev)
    status_in[min(3, T - 1)] = ref.CG_BREAKDOWN
    thresh = torch.zeros(T, dtype=F64, device=dev)
    thresh[min(2, T - 1)] = float("inf")
    status_out = poisoned(T, dtype=torch.int32, dev=dev)
    return (x, r, p, Ap, partials, status_in, status_out, torch.arange(T, dtype=torch.int32, device=dev), thresh, chunk)


# P = 1, not a multiple of the block, several blocks per task; chunk 16,384 is the C++ kernels' own.
CASES = [case(f"T{T}-P{P}-chunk{CHUNK}", T, P, CHUNK) for T, P in ((1, 1), (3, 127), (4, 5003), (2, 16_385))]
CASES += [case(f"T{T}-P{P}-chunk16384", T, P, 16384, on=("cpu", "reference")) for T, P in ((4, 5003), (3, 40_000))]


@pytest.mark.parametrize("T,P,chunk,dtype,backend", grid(CASES))
@pytest.mark.parametrize("name", FAMILIES["cg"])
def test_cg_matches_float64_twin(name, T, P, chunk, dtype, backend):
    check_op(name, backend, cg_args(name, T, P, chunk, dtype, device(backend)), dtype)


def _cg_args(T=3, P=5000, dtype=F32, chunk=4096, seed=0, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    x, r, p, Ap = (torch.randn(T, P, generator=g, dtype=dtype).to(dev) for _ in range(4))
    nb = -(-P // chunk)
    partials = poisoned(T, nb, 4, dev=dev)
    status_in = torch.zeros(T, dtype=torch.int32, device=dev)
    status_out = poisoned(T, dtype=torch.int32, dev=dev)
    iters = torch.zeros(T, dtype=torch.int32, device=dev)
    thresh = torch.zeros(T, dtype=F64, device=dev)
    return x, r, p, Ap, partials, status_in, status_out, iters, thresh, chunk


OPCHECKS = [pytest.param(b, c, id=f"{b}-chunk{c}", marks=runs(b)) for b, c in (("cpu", 4096), ("cpu", 16384),
                                                                              ("triton", 4096), ("cuda", 4096)) if b in KERNELS]


@pytest.mark.parametrize("backend,chunk", OPCHECKS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
def test_opcheck_and_values(backend, chunk, dtype):
    dots, update = op_of("cg_dots", backend), op_of("cg_update", backend)
    x, r, p, Ap, partials, s_in, s_out, iters, thresh, _ = _cg_args(dtype=dtype, chunk=chunk, dev=device(backend))
    opcheck("cg_dots", backend, (r, p, Ap, partials, chunk))
    dots(r, p, Ap, partials, chunk)
    want = torch.empty_like(partials)
    ref.cg_dots(r, p, Ap, want, chunk)
    assert torch.allclose(partials, want, rtol=1e-5 if dtype == F32 else 1e-12)
    args = (x.clone(), r.clone(), p.clone(), Ap, partials, s_in, s_out, iters, thresh, chunk)
    opcheck("cg_update", backend, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    ref_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    update(*args)
    ref.cg_update(*ref_args)
    for got, w in zip(args[:3] + args[6:8], ref_args[:3] + ref_args[6:8]):
        assert torch.allclose(got, w, rtol=1e-5, atol=1e-6), (got - w).abs().max()
    assert (args[6] != -7).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_skips_broken_and_converged_tasks(backend):
    dots, update = dispatch.op("cg_dots", backend), dispatch.op("cg_update", backend)
    x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk = _cg_args(T=3, P=100, dtype=F64, dev=device(backend))
    dots(r, p, Ap, partials, chunk)
    s_in[0] = ref.CG_BREAKDOWN
    thresh[1] = float("inf")  # converged
    Ap[2] = -p[2]  # negative curvature -> breakdown now
    dots(r, p, Ap, partials, chunk)
    x0, r0, p0 = x.clone(), r.clone(), p.clone()
    update(x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk)
    assert s_out.tolist() == [2, 1, 2] and iters.tolist() == [0, 0, 0]
    assert torch.equal(x, x0) and torch.equal(r, r0) and torch.equal(p, p0)


BAD = [
    ("r", lambda a: a.__setitem__(1, a[1][:, :-1].contiguous()), ValueError, "p must have shape"),
    ("dtype", lambda a: a.__setitem__(2, a[2].double()), TypeError, "Ap must have dtype"),
    ("contig", lambda a: a.__setitem__(1, a[1].t().contiguous().t()), ValueError, "p must be contiguous"),
    ("partials", lambda a: a.__setitem__(3, a[3][:, :, :3].contiguous()), ValueError, "partials must have shape"),
    ("partials-dtype", lambda a: a.__setitem__(3, a[3].float()), TypeError, "partials must be float64"),
    ("rank", lambda a: a.__setitem__(0, a[0][0]), ValueError, "r must have 2 dimensions"),
    ("half", lambda a: a.__setitem__(0, a[0].half()), TypeError, "r must be float32 or float64"),
]


@pytest.mark.parametrize("name,mutate,exc,msg", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("backend", backends(KERNELS))
def test_cg_dots_validation(name, mutate, exc, msg, backend):
    _, r, p, Ap, partials, *_ = _cg_args(T=2, P=64, chunk=4096, dev=device(backend))
    args = [r, p, Ap, partials, 4096]
    mutate(args)
    with pytest.raises(exc, match=msg):
        op_of("cg_dots", backend)(*args)


@runs("cpu")
@runs("triton")
def test_cg_update_validation():
    x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk = _cg_args(T=2, P=64)
    with pytest.raises(TypeError, match="status_in must have dtype torch.int32"):
        op_of("cg_update", "cpu")(x, r, p, Ap, partials, s_in.long(), s_out, iters, thresh, chunk)
    with pytest.raises(ValueError, match="thresh must have shape \\(2,\\)"):
        op_of("cg_update", "cpu")(x, r, p, Ap, partials, s_in, s_out, iters, thresh[:1], chunk)
    with pytest.raises(ValueError, match="chunk must be 4096"):
        op_of("cg_update", "triton")(x, r, p, Ap, partials, s_in, s_out, iters, thresh, 2048)


def test_extension_links_the_shared_cuda_runtime():
    """One CUDA runtime per process: the extension needs ``libcudart.so.<major>``, the one torch
    loads, and defines none of its functions itself (``cudart_static`` kept its own module
    loading and error state beside torch's, and its kernels loaded lazily on first launch)."""
    import shutil
    import subprocess

    from imaml_kernels import _ext

    if not _ext.HAS_CUDA_EXT:
        pytest.skip("the extension was built without CUDA kernels")
    if not (shutil.which("readelf") and shutil.which("nm")):
        pytest.skip("binutils (readelf, nm) not installed")
    so = _ext._C.__file__
    needed = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
    assert "[libcudart.so." in needed, needed
    defined = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True, check=True).stdout.split()
    assert not [s for s in defined if s.startswith(("cudaLaunchKernel", "cudaGetLastError", "cudaGetDeviceCount"))]
