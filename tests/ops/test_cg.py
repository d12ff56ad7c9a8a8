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

from .common import (BACKENDS, F32, F64, FAMILIES, KERNELS, Recorder, assert_grids_fit, backends, case, cast, check_op,
                     device, gen, grid, op_of, opcheck, poisoned, randn, runs)

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


# --------------------------------------------------------------------------- P = 0, NaN, aliasing, grid


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_parameter_vector(backend):
    """P = 0: one block of zero partials per task (the CUDA kernels once launched 0 blocks, an
    invalid configuration), every task converged at once, nothing written; cg_solve likewise."""
    import imaml_kernels as ik
    from imaml_kernels.ops.cg import cg_partials

    dev, T = device(backend), 3
    x, r, p, Ap = (torch.empty(T, 0, device=dev) for _ in range(4))
    partials, chunk = cg_partials(r, backend)
    assert partials.shape == (T, 1, 4)
    partials.fill_(float("nan"))
    dispatch.op("cg_dots", backend)(r, p, Ap, partials, chunk)
    assert torch.equal(partials, torch.zeros_like(partials))
    s_in, s_out = torch.zeros(T, dtype=torch.int32, device=dev), poisoned(T, dtype=torch.int32, dev=dev)
    iters = torch.zeros(T, dtype=torch.int32, device=dev)
    dispatch.op("cg_update", backend)(x, r, p, Ap, partials, s_in, s_out, iters, torch.zeros(T, dtype=F64, device=dev), chunk)
    assert s_out.tolist() == [ref.CG_CONVERGED] * T and iters.tolist() == [0] * T
    sol, info = ik.cg_solve(lambda v: 2 * v, torch.empty(T, 0, device=dev), iters=3, backend=backend)
    assert sol.shape == (T, 0) and info.converged.all() and not info.breakdown.any()
    assert info.iterations.tolist() == [0] * T


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_breaks_a_task_down(backend):
    """Task 0: finite partials whose rr_new = rr - 2 a rAp + a^2 ApAp is inf - inf (a = 1e300);
    task 1: a NaN in Ap; task 2 a normal step. The NaN must reach beta (a breakdown, nothing
    written) on every backend: a NaN-dropping clamp (max.f64 on a GPU, ``x > 0 ? x : 0`` in C++)
    turned it into 0 and stepped by 1e300."""
    dev = device(backend)
    x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk = _cg_args(T=3, P=100, dtype=F64, dev=dev)
    Ap = p * 1.5
    Ap[1, 17] = float("nan")
    dispatch.op("cg_dots", backend)(r, p, Ap, partials, chunk)
    partials[0, 0] = torch.tensor([1.0, 1e-300, 1e10, 1.0], dtype=F64)
    assert torch.isnan(partials[1]).any()
    x0, r0, p0 = x.clone(), r.clone(), p.clone()
    dispatch.op("cg_update", backend)(x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk)
    assert s_out.tolist() == [ref.CG_BREAKDOWN, ref.CG_BREAKDOWN, 0] and iters.tolist() == [0, 0, 1]
    assert torch.equal(x[:2], x0[:2]) and torch.equal(r[:2], r0[:2]) and torch.equal(p[:2], p0[:2])
    assert not torch.equal(x[2], x0[2])


def _aliased(case, T=2, P=64, dev="cpu"):
    """cg_update arguments (chunk 4096) where ``case`` shares memory between two of them."""
    args = list(_cg_args(T=T, P=P, dtype=F64, dev=dev))
    buf = torch.randn(T * P + 5, dtype=F64, device=dev)
    if case == "status":
        args[6] = args[5]  # status_out is status_in
    elif case == "Ap-view-of-p":
        args[3] = args[2].view(T, P)  # a matvec returning a view passes an `is` check
    elif case == "x-overlaps-r":
        args[0], args[1] = buf[:T * P].view(T, P), buf[5:].view(T, P)
    elif case == "partials-in-r":
        args[1] = torch.randn(T, P, dtype=F64, device=dev)
        args[4] = args[1].view(-1)[: T * 4].view(T, 1, 4)
    return args


ALIASES = ["status", "Ap-view-of-p", "x-overlaps-r", "partials-in-r"]


@pytest.mark.parametrize("case", ALIASES)
@pytest.mark.parametrize("backend", backends(KERNELS))
def test_update_refuses_aliasing(backend, case):
    args = _aliased(case, dev=device(backend))
    with pytest.raises(ValueError, match="overlap in memory"):
        dispatch.op("cg_update", backend)(*args)


@pytest.mark.parametrize("backend", backends(KERNELS))
def test_dots_refuses_partials_over_its_inputs_and_views_pass(backend):
    dev, T, P = device(backend), 2, 64
    r = torch.randn(T, P, dtype=F64, device=dev)
    with pytest.raises(ValueError, match="partials and r overlap"):
        dispatch.op("cg_dots", backend)(r, r, r, r.view(-1)[: T * 4].view(T, 1, 4), 4096)
    # Disjoint rows of one buffer share a storage but no memory: accepted.
    buf = torch.randn(4, T, P, dtype=F64, device=dev)
    x, r, p, Ap = buf.unbind(0)
    _, _, _, _, partials, s_in, s_out, iters, thresh, chunk = _cg_args(T=T, P=P, dtype=F64, dev=dev)
    dispatch.op("cg_dots", backend)(r, p, Ap, partials, chunk)
    dispatch.op("cg_update", backend)(x, r, p, Ap, partials, s_in, s_out, iters, thresh, chunk)


def test_aliasing_is_refused_on_meta_tensors():
    """The check is the fakes' too (storage identity, not data pointers)."""
    from imaml_kernels.ops.cg import check_cg_update

    for alias in ALIASES:
        with pytest.raises(ValueError, match="overlap in memory"):
            check_cg_update(*_aliased(alias, dev="meta"))
    check_cg_update(*_cg_args(T=2, P=64, dtype=F64, dev="meta"))


@runs("triton")
def test_triton_grid_fits_cuda_limits_at_large_P():
    """P = 300M (73,243 blocks of 4096 per task): one grid axis, task-major; on axis 1 (at most
    65,535) it would not launch above P = 268M."""
    from imaml_kernels.triton import cg

    T, P = 2, 300_000_000
    nb = -(-P // CHUNK)
    vecs = [torch.empty(T, P, device="meta") for _ in range(4)]
    partials = torch.empty(T, nb, 4, dtype=F64, device="meta")
    task = [torch.empty(T, dtype=torch.int32, device="meta") for _ in range(3)]
    rec = Recorder()
    cg.cg_dots(*vecs[1:], partials, CHUNK, wrap=rec)
    cg.cg_update(*vecs, partials, *task, torch.empty(T, dtype=F64, device="meta"), CHUNK, wrap=rec)
    assert rec.grids == [(T * nb,)] * 2
    assert_grids_fit(rec.grids)


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
