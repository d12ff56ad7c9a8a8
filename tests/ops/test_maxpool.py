"""2x2 max-pool (stride 2, floor mode, channels-last): ``maxpool_fwd`` with its uint8 arg-max,
the tangent ``maxpool_gather`` and the adjoint ``maxpool_scatter``, on every backend against the
float64 twin (:mod:`imaml_kernels.reference.maxpool`) and ``F.max_pool2d``; opcheck."""

import pytest
import torch
import torch.nn.functional as F

from imaml_kernels import dispatch
from imaml_kernels import reference as ref

from .common import (BACKENDS, DTYPES, F64, FAMILIES, KERNELS, backends, case, cast, check_op, device, gen, grid,
                     opcheck, randn, runs)

OPS = FAMILIES["maxpool"]
assert OPS == ("maxpool_fwd", "maxpool_gather", "maxpool_scatter")


def pool_args(name, T, N, H, W, C, dtype, dev):
    """Random arguments of ``name``; the arg-max is the twin's on the rounded input."""
    g = gen(f"{name}-{T}-{N}-{H}-{W}-{C}")
    x, rx, gy = cast(dtype, dev, randn(g, T, N, H, W, C), randn(g, T, N, H, W, C), randn(g, T, N, H // 2, W // 2, C))
    _, idx = ref.maxpool_fwd(x.double())
    return {"maxpool_fwd": (x,), "maxpool_gather": (rx, idx), "maxpool_scatter": (gy, idx, H, W)}[name]


# (T, N, H, W, C): odd sizes (floor mode), one window, 37 channels.
SHAPES = [(1, 2, 2, 2, 1), (2, 2, 5, 4, 3), (2, 2, 7, 9, 20), (1, 2, 10, 10, 37), (2, 3, 7, 6, 5),
          (2, 2, 6, 6, 3), (2, 2, 7, 5, 5), (2, 2, 2, 3, 1), (2, 2, 21, 21, 2)]
CASES = [case(f"T{T}-N{N}-H{H}-W{W}-C{C}", T, N, H, W, C) for T, N, H, W, C in SHAPES]


@pytest.mark.parametrize("T,N,H,W,C,dtype,backend", grid(CASES))
@pytest.mark.parametrize("name", OPS)
def test_maxpool_matches_float64_twin(name, T, N, H, W, C, dtype, backend):
    check_op(name, backend, pool_args(name, T, N, H, W, C, dtype, device(backend)), dtype)


@runs("triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", OPS)
def test_maxpool_triton_small_tiles(small_tiles, name, dtype):
    check_op(name, "triton", pool_args(name, 2, 2, 7, 9, 5, dtype, device("triton")), dtype)


@pytest.mark.parametrize("H,W,C", [(6, 6, 3), (7, 5, 5), (2, 3, 1), (21, 21, 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxpool_ops_match_reference(backend, H, W, C):
    op = dispatch.op
    T, N = 2, 2
    (x,) = cast(F64, device(backend), randn(gen(f"ties-{H}-{W}-{C}"), T, N, H, W, C))
    x[0, 0, :2, :2, 0] = 0.0  # a tie: the first maximum in window order wins, as in torch
    y, idx = op("maxpool_fwd", backend)(x)
    y_ref, idx_ref = ref.maxpool_fwd(x)
    assert torch.equal(y, y_ref) and torch.equal(idx, idx_ref) and idx.dtype == torch.uint8
    assert torch.equal(y, F.max_pool2d(x.permute(0, 1, 4, 2, 3).reshape(T * N, C, H, W), 2).view(T, N, C, H // 2, W // 2).permute(0, 1, 3, 4, 2))
    rx = torch.randn_like(x)
    assert torch.equal(op("maxpool_gather", backend)(rx, idx), ref.maxpool_gather(rx, idx))
    gy = torch.randn_like(y)
    gx = op("maxpool_scatter", backend)(gy, idx, H, W)
    assert torch.equal(gx, ref.maxpool_scatter(gy, idx, H, W))
    assert torch.allclose((op("maxpool_gather", backend)(rx, idx) * gy).sum(), (rx * gx).sum(), rtol=1e-12)


@runs("triton")
def test_triton_pixel_guards_at_the_limit():
    """pixels + BLOCK_M < 2**31 (the last block's int32 pixel index would wrap negative and pass
    the mask): 64 float32 channels, blocks of 32 pixels, 2 x 2 images (meta tensors)."""
    from imaml_kernels.triton import maxpool

    from .common import Recorder, assert_grids_fit

    def fwd(N):
        rec = Recorder()
        y, idx = torch.empty(1, N, 1, 1, 64, device="meta"), torch.empty(1, N, 1, 1, 64, dtype=torch.uint8, device="meta")
        maxpool.maxpool_fwd(torch.empty(1, N, 2, 2, 64, device="meta"), y, idx, wrap=rec)
        return rec.grids

    assert_grids_fit(fwd((2**31 - 33) // 4))
    with pytest.raises(ValueError, match="int32"):
        fwd(2**29 - 8)


@pytest.mark.parametrize("backend", backends(KERNELS))
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, backend):
    opcheck(name, backend, pool_args(name, 2, 2, 5, 4, 3, F64, device(backend)))
