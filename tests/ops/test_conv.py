"""The convolution's data movement: ``im2col`` (zero padding fused) and its adjoint ``col2im``
on every backend against the float64 twin (:mod:`imaml_kernels.reference.conv`) and against
autograd's adjoint of a strided im2col; Triton's tile paths; opcheck."""

import itertools

import pytest
import torch

from imaml_kernels import dispatch
from imaml_kernels import reference as ref

from .common import (BACKENDS, DTYPES, F64, FAMILIES, KERNELS, NATIVE, assert_rel, backends, case, cast,
                     check_op, device, gen, grid, opcheck, randn, runs)

assert FAMILIES["conv"] == ("im2col", "col2im")


def _out(H, k, s, p):
    return (H + 2 * p - k) // s + 1


def conv_args(name, T, N, H, W, C, k, s, ph, pw, dtype, dev, extra=0):
    """Random arguments of ``name``: ``x [T, N, H, W, C]`` (im2col) or the patch cotangent
    ``[T, N, Ho, Wo, k, k, C]`` (col2im), ``extra`` windows beyond the natural output size
    (reaching past the bottom/right padding)."""
    Ho, Wo = _out(H, k, s, ph) + extra, _out(W, k, s, pw) + extra
    g = gen(f"{name}-{T}-{N}-{H}-{W}-{C}-{k}-{s}-{ph}-{pw}-{extra}")
    if name == "im2col":
        (x,) = cast(dtype, dev, randn(g, T, N, H, W, C))
        return (x, Ho, Wo, k, s, ph, pw)
    (gcols,) = cast(dtype, dev, randn(g, T, N, Ho, Wo, k, k, C))
    return (gcols, H, W, s, ph, pw)


def _col2im_autograd(gcols, H, W, s, ph, pw):
    """The adjoint of an im2col written with pad + strided slices, by autograd."""
    T, N, Ho, Wo, k, _, C = gcols.shape
    Hp, Wp = max(H + 2 * ph, s * (Ho - 1) + k), max(W + 2 * pw, s * (Wo - 1) + k)
    x = torch.zeros(T, N, H, W, C, dtype=gcols.dtype, device=gcols.device, requires_grad=True)
    xp = torch.nn.functional.pad(x, (0, 0, pw, Wp - W - pw, ph, Hp - H - ph))
    cols = torch.stack([torch.stack([xp[:, :, i:i + s * (Ho - 1) + 1:s, j:j + s * (Wo - 1) + 1:s, :]
                                     for j in range(k)], dim=4) for i in range(k)], dim=4)
    (gx,) = torch.autograd.grad(cols, x, gcols)
    return gx


# N = 2, square, k = 3. im2col: C = 1, 3, 5 patch rows of 9, 27, 45 entries (the whole-row
# kernel); 8, 20: per-tap tiles.
IM2COL_CASES = [
    case(f"T{T}-H{H}-C{C}-s{s}-p{p}", T, H, C, s, p)
    for T, H, C, s, p in itertools.product((1, 2), (5, 8), (1, 3, 5, 8, 20), (1, 2), (0, 1))
]


@pytest.mark.parametrize("T,H,C,s,p,dtype,backend", grid(IM2COL_CASES))
def test_im2col_matches_float64_twin(T, H, C, s, p, dtype, backend):
    check_op("im2col", backend, conv_args("im2col", T, 2, H, H, C, 3, s, p, p, dtype, device(backend)), dtype)


# (T, N, H, W, C, s, pad, extra windows): every backend at small sizes; the compiled kernels
# also at 64 channels and with few images large enough to split output rows among threads.
COL2IM_CASES = [
    case(f"T{T}-N2-H{H}-W{H}-C{C}-s{s}-p{p}", T, 2, H, H, C, s, p, 0)
    for T, H, C, s, p in itertools.product((1, 2), (5, 8), (1, 5, 20), (1, 2), (0, 1))
] + [
    case(f"T{T}-N{N}-H{H}-W{W}-C{C}-s{s}-p{p}{'-Ho+1' if extra else ''}", T, N, H, W, C, s, p, extra, on=NATIVE)
    for (T, N, H, W, C), s, p, extra in itertools.product(
        [(1, 1, 7, 7, 1), (3, 2, 8, 8, 5), (2, 3, 7, 8, 64), (1, 1, 24, 23, 64)], (1, 2), (0, 1), (0, 1))
]


@pytest.mark.parametrize("T,N,H,W,C,s,p,extra,dtype,backend", grid(COL2IM_CASES))
def test_col2im_matches_float64_twin_and_autograd(T, N, H, W, C, s, p, extra, dtype, backend):
    # At most k*k terms per element, summed in another order than the twin's.
    tol = 1e-15 if dtype == F64 else 1e-6
    args = conv_args("col2im", T, N, H, W, C, 3, s, p, p, dtype, device(backend), extra)
    (gx,) = check_op("col2im", backend, args, dtype, tol64=tol)
    assert_rel(gx, _col2im_autograd(*args), tol, "col2im vs autograd")


@pytest.mark.parametrize("k,s,ph,pw", [(1, 2, 0, 0), (5, 2, 2, 1), (3, 1, 0, 2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_col2im_asymmetric_padding(backend, k, s, ph, pw):
    """ph != pw, stride 2, a 1x1 and a 5x5 kernel."""
    check_op("col2im", backend, conv_args("col2im", 2, 2, 9, 6, 3, k, s, ph, pw, F64, device(backend)), F64, tol64=1e-15)


GEOMS = [(7, 7, 3, 1, 1), (14, 14, 3, 2, 1), (8, 5, 3, 2, 0), (5, 8, 2, 1, 0)]  # H, W, k, s, pad


@pytest.mark.parametrize("H,W,k,s,pad", GEOMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_im2col_matches_reference_and_is_the_adjoint_of_col2im(backend, H, W, k, s, pad):
    op = dispatch.op
    T, N, C = 2, 2, 5
    x, Ho, Wo = conv_args("im2col", T, N, H, W, C, k, s, pad, pad, F64, device(backend))[:3]
    cols = op("im2col", backend)(x, Ho, Wo, k, s, pad, pad)
    assert torch.equal(cols, ref.im2col(x, Ho, Wo, k, s, pad, pad))
    g = torch.randn(cols.shape, generator=gen(f"adjoint-{H}-{W}"), dtype=F64).to(cols.device)
    gx = op("col2im", backend)(g, H, W, s, pad, pad)
    assert torch.allclose((cols * g).sum(), (x * gx).sum(), rtol=1e-12)


# --------------------------------------------------------------------------- Triton tiles


@runs("triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("s,p", [(1, 1), (2, 0), (2, 1)], ids=["s1-p1", "s2-p0", "s2-p1"])
def test_col2im_triton_small_tiles_non_square(small_tiles, s, p, dtype):
    check_op("col2im", "triton", conv_args("col2im", 2, 1, 5, 8, 5, 3, s, p, p, dtype, device("triton")), dtype)


@runs("triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("C", (3, 5))  # several channel blocks of the per-tap kernel / whole rows
@pytest.mark.parametrize("s,p", [(1, 1), (2, 0), (2, 1)], ids=["s1-p1", "s2-p0", "s2-p1"])
def test_im2col_triton_small_tiles_non_square(small_tiles, monkeypatch, s, p, C, dtype):
    from imaml_kernels.triton import conv

    monkeypatch.setattr(conv, "CONV_ROWS_MAX", 27 if C == 5 else 64)
    check_op("im2col", "triton", conv_args("im2col", 2, 1, 5, 8, C, 3, s, p, p, dtype, device("triton")), dtype)


@runs("triton")
def test_im2col_triton_rejects_int32_overflow():
    from imaml_kernels.triton import conv

    x = torch.empty(2**16, 2**15, 1, 1, 1, device="meta")
    with pytest.raises(ValueError, match="int32"):
        conv.im2col(x, 1, 1, 1, 1, 0, 0, torch.empty(2**16, 2**15, 1, 1, 1, 1, 1, device="meta"))


@runs("triton")
def test_triton_pixel_guards_at_the_limit():
    """The last pixel block's ``pid * BLOCK + arange(BLOCK)`` must stay in int32 (a wrapped,
    negative index passes ``pix < P``): count + BLOCK < 2**31. 64 float32 channels: im2col's
    blocks of 32 pixels, col2im's of 16 (meta tensors, nothing launched)."""
    from imaml_kernels.triton import conv

    from .common import Recorder, assert_grids_fit

    def im2col(N):
        rec = Recorder()
        conv.im2col(torch.empty(1, N, 1, 1, 64, device="meta"), 1, 1, 3, 1, 1, 1,
                    torch.empty(1, N, 1, 1, 3, 3, 64, device="meta"), wrap=rec)
        return rec.grids

    def col2im(N):
        rec = Recorder()
        conv.col2im(torch.empty(1, N, 1, 1, 1, 1, 64, device="meta"), 1, 1, 1, 0, 0,
                    torch.empty(1, N, 1, 1, 64, device="meta"), wrap=rec)
        return rec.grids

    for fn, block in ((im2col, 32), (col2im, 16)):
        assert_grids_fit(fn(2**31 - block - 1))
        with pytest.raises(ValueError, match="int32"):
            fn(2**31 - block)


# --------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend", backends(KERNELS))
@pytest.mark.parametrize("name", FAMILIES["conv"])
def test_opcheck(name, backend):
    # im2col: 5x5 -> 3x3 windows of 3x3, stride 2, pad 1; col2im: their adjoint, 4 channels.
    C = 3 if name == "im2col" else 4
    opcheck(name, backend, conv_args(name, 2, 2, 5, 5, C, 3, 2, 1, 1, F64, device(backend)))
