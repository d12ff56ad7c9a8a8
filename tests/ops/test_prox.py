"""The proximal step ``φ ← φ − lr (∇L̂(φ) + λ (φ − θ))``, in place, on every backend against the
float64 twin (:mod:`imaml_kernels.reference.prox`), θ shared ``[P]`` or per task ``[T, P]``;
the float64 scalars a Triton kernel gets as two fp32 halves; opcheck."""

import struct

import pytest
import torch

from .common import (BACKEND_NAMES, FAMILIES, KERNELS, NATIVE, Recorder, assert_grids_fit, backends, case, cast, check_op, device,
                     gen, grid, opcheck, randn, runs)

assert FAMILIES["prox"] == ("prox_step",)


LAM_SHAPES = {"task": lambda T, P: (T,), "row": lambda T, P: (1, P), "coord": lambda T, P: (T, P)}


def prox_args(T, P, shared, lr, dtype, dev, lam_kind="task"):
    g = gen(f"prox-{T}-{P}-{shared}-{lam_kind}")
    phi, grad, theta = randn(g, T, P), randn(g, T, P), randn(g, *((P,) if shared else (T, P)))
    lam = torch.rand(*LAM_SHAPES[lam_kind](T, P), generator=g, dtype=torch.float64) + 0.1
    return (*cast(dtype, dev, phi, grad, theta, lam), lr)


# P = 5000: 2 blocks per task of the Triton kernel; 16,385 and 40,000: several C++ jobs per task.
# lr is not fp32-exact.
ALL = BACKEND_NAMES
SIZES = [(1, 1, 0.1, ALL), (2, 37, 0.1, ALL), (2, 5000, 0.1, ALL), (3, 1000, 0.37, ALL), (3, 40_000, 0.37, NATIVE),
         (2, 16_385, 0.37, NATIVE)]
CASES = [
    case(f"T{T}-P{P}-{'shared' if shared else 'per-task'}-theta", T, P, shared, lr, on=on)
    for T, P, lr, on in SIZES for shared in (True, False)
]


@pytest.mark.parametrize("T,P,shared,lr,dtype,backend", grid(CASES))
def test_prox_step_matches_float64_twin(T, P, shared, lr, dtype, backend):
    check_op("prox_step", backend, prox_args(T, P, shared, lr, dtype, device(backend)), dtype)


# λ per coordinate: one row shared by the tasks ([1, P], the engine's per-group λ) or [T, P].
COORD_CASES = [
    case(f"T{T}-P{P}-lam-{kind}", T, P, kind, lr, on=on)
    for T, P, lr, on in SIZES for kind in ("row", "coord")
]


@pytest.mark.parametrize("T,P,lam_kind,lr,dtype,backend", grid(COORD_CASES))
def test_prox_step_with_lam_per_coordinate_matches_float64_twin(T, P, lam_kind, lr, dtype, backend):
    check_op("prox_step", backend, prox_args(T, P, True, lr, dtype, device(backend), lam_kind), dtype)


def test_lam_per_coordinate_equals_the_per_task_step_where_the_rows_are_constant():
    """A [T, P] λ whose row t is constant λ_t gives the per-task step exactly (float64)."""
    phi, grad, theta, lam, lr = prox_args(3, 50, False, 0.37, torch.float64, "cpu")
    a, b = phi.clone(), phi.clone()
    ref_lam = lam.unsqueeze(1).expand(3, 50).contiguous()
    from imaml_kernels import dispatch

    k = dispatch.kernels(phi.device, phi.dtype)
    k.prox_step(a, grad, theta, lam, lr)
    k.prox_step(b, grad, theta, ref_lam, lr)
    assert torch.equal(a, b)


def test_lam_of_another_shape_is_refused_in_one_line():
    phi, grad, theta, lam, lr = prox_args(2, 7, True, 0.1, torch.float64, "cpu")
    from imaml_kernels import dispatch

    with pytest.raises(ValueError, match=r"lam must be \[2\] \(per task\) or \[1, 7\]"):
        dispatch.kernels(phi.device, phi.dtype).prox_step(phi, grad, theta, torch.ones(2, 7, 1, dtype=phi.dtype), lr)


@runs("triton")
@pytest.mark.parametrize("v", (1e-5, 0.1, 1e-3, 3.0, 0.0, -0.7, 1.0 / 3.0, 123456.789))
def test_triton_scalar_split(v):
    # Each half survives the fp32 argument a CUDA kernel receives for a Python float; the
    # sum keeps ~48 bits (the interpreter passes floats exactly, so it cannot check this).
    from imaml_kernels.triton import _common

    hi, lo = _common.split_f64(v)
    for h in (hi, lo):
        assert struct.unpack("f", struct.pack("f", h))[0] == h
    assert abs((hi + lo) - v) <= 2.0**-46 * abs(v)


@pytest.mark.parametrize("lam_kind", ["task", "row", "coord"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-theta", "per-task-theta"])
@pytest.mark.parametrize("backend", backends(KERNELS))
def test_opcheck(backend, shared, lam_kind):
    opcheck("prox_step", backend, prox_args(2, 7, shared, 0.1, torch.float64, device(backend), lam_kind))


@runs("triton")
def test_triton_grid_fits_cuda_limits_at_large_P():
    """P = 300M float32 (146,485 blocks of 2048 per task): one grid axis, task-major; on axis 1
    (at most 65,535 blocks) it would not launch above P = 134M."""
    import triton

    from imaml_kernels.triton import prox

    T, P = 2, 300_000_000
    rec = Recorder()
    phi, grad = (torch.empty(T, P, device="meta") for _ in range(2))
    prox.prox_step(phi, grad, torch.empty(P, device="meta"), torch.empty(T, device="meta"), 0.1, wrap=rec)
    assert rec.grids == [(T * triton.cdiv(P, prox.PROX_BLOCK_BYTES // 4),)]
    assert_grids_fit(rec.grids)
