"""BatchNorm (+ ReLU): ``bn_fwd``, ``bn_bwd``, ``bn_tfwd``, ``bn_tbwd`` and the gathering
backwards ``col2im_bn_bwd``, ``col2im_bn_tbwd``, on every backend against the float64 twin
(:mod:`imaml_kernels.reference.batchnorm`); the Triton plan (tiles, channel blocks, row
splits); parameter-like ``[T, C]`` arrays read and written as views; opcheck."""

import itertools
from types import SimpleNamespace

import pytest
import torch

from imaml_kernels import _ext, dispatch
from imaml_kernels import reference as ref

from helpers import rel_err as rel

from .common import (BACKEND_NAMES, BACKENDS, DTYPES, EPS, F64, FAMILIES, KERNELS, NATIVE, assert_rel, backends, case, cast,
                     check_op, device, gen, grid, opcheck, poisoned, randn, runs)

BN_OPS = ("bn_fwd", "bn_bwd", "bn_tfwd", "bn_tbwd")
COL_OPS = ("col2im_bn_bwd", "col2im_bn_tbwd")
assert FAMILIES["batchnorm"] == BN_OPS + COL_OPS


def _act(relu):
    return "relu" if relu else "id"


# Every backend: one and several row tiles and channel blocks (R = 37, C = 5, 20).
SMALL = [(T, R, C) for T, R, C in itertools.product((1, 2), (1, 7, 37), (1, 5, 20))]
# Compiled kernels only: channel blocks of 64 and 16 (C = 80), the C++ kernels' thread split
# (one job per task and channel block, or with few tasks rows split among the threads).
LARGE = [s for s in itertools.product((1, 3), (1, 7, 100), (1, 5, 64)) if s not in SMALL]
LARGE += [(2, 1000, 80), (1, 1001, 64), (3, 333, 64), (1, 300, 130)]
BN_CASES = [case(f"T{T}-R{R}-C{C}-{_act(relu)}", T, R, C, relu) for T, R, C in SMALL for relu in (False, True)]
BN_CASES += [case(f"T{T}-R{R}-C{C}-{_act(relu)}", T, R, C, relu, on=NATIVE) for T, R, C in LARGE for relu in (False, True)]


def bn_state(key, T, R, C, relu, dtype, dev):
    """Consistent inputs: x, γ, β, their tangents and two cotangents drawn in float64 and
    rounded to ``dtype``; the statistics (y, x̂, rstd, then r_x̂, a) are the twin's forward and
    tangent forward on the rounded inputs, rounded too."""
    g = gen(key)
    x = randn(g, T, R, C, scale=2.0, shift=0.5)
    gamma, beta = randn(g, T, C, scale=0.5, shift=1.0), randn(g, T, C, scale=0.5)
    rx, gy, rgy = randn(g, T, R, C), randn(g, T, R, C), randn(g, T, R, C)
    rgamma, rbeta = randn(g, T, C), randn(g, T, C)
    x, gamma, beta, rx, gy, rgy, rgamma, rbeta = cast(dtype, dev, x, gamma, beta, rx, gy, rgy, rgamma, rbeta)
    y, xhat, rstd = ref.bn_fwd(x.double(), gamma.double(), beta.double(), EPS, relu)
    _, rxhat, a = ref.bn_tfwd(rx.double(), xhat, rstd, gamma.double(), rgamma.double(), rbeta.double(), y if relu else None)
    y, xhat, rstd, rxhat, a = cast(dtype, dev, y, xhat, rstd, rxhat, a)
    return SimpleNamespace(x=x, gamma=gamma, beta=beta, rx=rx, gy=gy, rgy=rgy, rgamma=rgamma, rbeta=rbeta, relu=relu,
                           relu_y=y if relu else None, xhat=xhat, rstd=rstd, rxhat=rxhat, a=a)


def bn_args(name, s):
    """The arguments of ``name`` (one of :data:`BN_OPS`) from :func:`bn_state`; the written
    ``[T, C]`` gradients poisoned."""
    grads = [poisoned(*s.gamma.shape, dtype=s.gamma.dtype, dev=s.gamma.device) for _ in range(2)]
    return {
        "bn_fwd": lambda: (s.x, s.gamma, s.beta, EPS, s.relu),
        "bn_bwd": lambda: (s.gy, s.xhat, s.rstd, s.gamma, s.relu_y, *grads),
        "bn_tfwd": lambda: (s.rx, s.xhat, s.rstd, s.gamma, s.rgamma, s.rbeta, s.relu_y),
        "bn_tbwd": lambda: (s.gy, s.rgy, s.xhat, s.rxhat, s.rstd, s.a, s.gamma, s.rgamma, s.relu_y, *grads),
    }[name]()


def bn_check(name, T, R, C, relu, dtype, backend):
    s = bn_state(f"{name}-T{T}-R{R}-C{C}-{relu}", T, R, C, relu, dtype, device(backend))
    check_op(name, backend, bn_args(name, s), dtype)


@pytest.mark.parametrize("T,R,C,relu,dtype,backend", grid(BN_CASES))
@pytest.mark.parametrize("name", BN_OPS)
def test_bn_matches_float64_twin(name, T, R, C, relu, dtype, backend):
    bn_check(name, T, R, C, relu, dtype, backend)


# --------------------------------------------------------------------------- the gathering backwards

# (T, N, H, W, C, stride, relu): R = N H W rows whose cotangent is the 3x3, pad 1 patch
# cotangent of the next convolution; R = 37 is prime (1 x 37 x 1 images); R = 300 splits rows
# among the programs of a GPU (too slow for the interpreter).
COL_CASES = [
    case(f"T{T}-N{N}-H{H}-W{W}-C{C}-s{s}-{_act(relu)}", T, N, H, W, C, s, relu, on=on)
    for T, N, H, W, C, s, relu, on in ((2, 1, 37, 1, 20, 2, False, BACKEND_NAMES), (2, 3, 10, 10, 20, 2, True, NATIVE),
                                       (1, 2, 7, 5, 6, 2, True, BACKEND_NAMES), (3, 1, 5, 5, 5, 1, False, BACKEND_NAMES),
                                       (2, 3, 7, 5, 6, 1, True, BACKEND_NAMES))
]


def col_args(name, T, N, H, W, C, s, relu, dtype, dev):
    """The arguments of ``name`` (one of :data:`COL_OPS`): a random patch cotangent
    ``[T, N, Ho, Wo, 3, 3, C]`` of a 3x3, pad 1 convolution over the BatchNorm's rows."""
    st = bn_state(f"{name}-{T}-{N}-{H}-{W}-{C}-{s}-{relu}", T, N * H * W, C, relu, dtype, dev)
    Ho, Wo = (H + 2 - 3) // s + 1, (W + 2 - 3) // s + 1
    (gcols,) = cast(dtype, dev, randn(gen(f"gcols-{name}-{T}-{N}-{H}-{W}-{C}"), T, N, Ho, Wo, 3, 3, C))
    grads = [poisoned(T, C, dtype=dtype, dev=dev) for _ in range(2)]
    if name == "col2im_bn_bwd":
        return (gcols, H, W, s, 1, 1, st.xhat, st.rstd, st.gamma, st.relu_y, *grads)
    return (st.gy, gcols, H, W, s, 1, 1, st.xhat, st.rxhat, st.rstd, st.a, st.gamma, st.rgamma, st.relu_y, *grads)


@pytest.mark.parametrize("T,N,H,W,C,s,relu,dtype,backend", grid(COL_CASES))
@pytest.mark.parametrize("name", COL_OPS)
def test_col2im_bn_matches_float64_twin(name, T, N, H, W, C, s, relu, dtype, backend):
    check_op(name, backend, col_args(name, T, N, H, W, C, s, relu, dtype, device(backend)), dtype)


def _grads(T, C, dtype, dev="cpu", like=None):
    """Two ``[T, C]`` gradient buffers for a BatchNorm backward (it writes γ's and β's), rows
    of ``like``'s row stride (the parameter-like arrays of one call share one)."""
    stride = C if like is None else like.stride(0)
    return torch.empty(T, stride, dtype=dtype, device=dev)[:, :C], torch.empty(T, stride, dtype=dtype, device=dev)[:, :C]


@pytest.mark.parametrize("relu", [False, True], ids=["id", "relu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_col2im_bn_bwd_equals_col2im_then_bn_bwd(backend, relu, monkeypatch):
    """The fused backward (Triton: col2im in the loads; C++: the two kernels) equals col2im then
    bn_bwd, with rows split over programs (Triton) and with γ/β gradients written into views."""
    if _ext.triton_importable():
        from imaml_kernels.triton import batchnorm as tbn

        monkeypatch.setattr(tbn, "BN_SPLIT_MIN_R", 64)  # split the 3 x 7 x 5 = 105 rows at test size
        monkeypatch.setattr(tbn, "BN_MIN_SPLIT_ROWS", 16)
    op, dev = dispatch.op, device(backend)
    g0 = gen("col2im-bn")
    T, N, H, W, C, s, pad = 2, 3, 7, 5, 6, 2, 1
    Ho, Wo = (H + 2 * pad - 3) // s + 1, (W + 2 * pad - 3) // s + 1
    x, gcols, flat = cast(F64, dev, randn(g0, T, N * H * W, C), randn(g0, T, N, Ho, Wo, 3, 3, C), randn(g0, T, 3 * C + 4))
    g, b = flat[:, :C], flat[:, C + 2:2 * C + 2]
    y, xhat, rstd = op("bn_fwd", "reference")(x, g, b, EPS, relu)
    relu_y = y if relu else None
    gy = ref.col2im(gcols, H, W, s, pad, pad).reshape(T, -1, C)
    wgg, wgb = _grads(T, C, F64, dev)
    want = (op("bn_bwd", "reference")(gy, xhat, rstd, g, relu_y, wgg, wgb), wgg, wgb)
    grad = torch.zeros(T, 3 * C + 4, dtype=F64, device=dev)
    gx = op("col2im_bn_bwd", backend)(gcols, H, W, s, pad, pad, xhat, rstd, g, relu_y, grad[:, :C], grad[:, C + 2:2 * C + 2])
    assert rel(gx, want[0]) < 1e-12 and rel(grad[:, :C], want[1]) < 1e-12 and rel(grad[:, C + 2:2 * C + 2], want[2]) < 1e-12
    assert (grad[:, C:C + 2] == 0).all() and (grad[:, 2 * C + 2:] == 0).all()
    # The tangent backward, gathering the cotangent's tangent the same way.
    gy2, rx, tangent = cast(F64, dev, randn(g0, T, N * H * W, C), randn(g0, T, N * H * W, C), randn(g0, T, 3 * C + 4))
    rg, rb = tangent[:, :C], tangent[:, C + 2:2 * C + 2]  # rows of the same stride as flat
    _, rxhat, a = op("bn_tfwd", "reference")(rx, xhat, rstd, g, rg, rb, relu_y)
    want_p = _grads(T, C, F64, dev)
    want = (op("bn_tbwd", "reference")(gy2, gy, xhat, rxhat, rstd, a, g, rg, relu_y, *want_p), *want_p)
    got_p = _grads(T, C, F64, dev, like=g)
    got = (op("col2im_bn_tbwd", backend)(gy2, gcols, H, W, s, pad, pad, xhat, rxhat, rstd, a, g, rg, relu_y, *got_p), *got_p)
    for o, w in zip(got, want):
        assert rel(o, w) < 1e-12


# --------------------------------------------------------------------------- independent checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_tbwd_is_the_tangent_of_bn_bwd(backend):
    """Independent of the twin's algebra: bn_tbwd == d/dε bn_bwd along (ẋ, γ̇, ġy), a float64
    central difference through the backend's own bn_fwd and bn_bwd."""
    op, dev = (lambda name: dispatch.op(name, backend)), device(backend)
    T, R, C = 2, 50, 5
    g = gen("tangent")
    x, rx, gy, rgy = cast(F64, dev, *(randn(g, T, R, C) for _ in range(4)))
    gam, rgam, beta = cast(F64, dev, randn(g, T, C, shift=1.0), randn(g, T, C), randn(g, T, C))

    def bwd(e):
        _, xh, rs = op("bn_fwd")(x + e * rx, gam + e * rgam, beta, EPS, False)
        gg, gb = poisoned(T, C, dev=dev), poisoned(T, C, dev=dev)
        return op("bn_bwd")(gy + e * rgy, xh, rs, gam + e * rgam, None, gg, gb), gg, gb

    _, xh, rs = op("bn_fwd")(x, gam, beta, EPS, False)
    _, rxh, a = op("bn_tfwd")(rx, xh, rs, gam, rgam, torch.zeros_like(gam), None)
    rgg, rgb = poisoned(T, C, dev=dev), poisoned(T, C, dev=dev)
    out = (op("bn_tbwd")(gy, rgy, xh, rxh, rs, a, gam, rgam, None, rgg, rgb), rgg, rgb)
    h = 1e-5
    for i, (o, p, m) in enumerate(zip(out, bwd(h), bwd(-h))):
        assert_rel(o, (p - m) / (2 * h), 1e-7, f"bn_tbwd output {i} vs central difference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_fwd_constant_channel(backend):
    """var = 0: rstd = 1/sqrt(eps) exactly as the twin has it (eps reaches a CUDA kernel as
    fp32 hi + lo, so float64 keeps ~48 bits of it)."""
    x = torch.full((1, 9, 3), 2.5, dtype=F64)
    x[..., 1] += torch.linspace(-1, 1, 9, dtype=F64)
    args = cast(F64, device(backend), x, torch.ones(1, 3, dtype=F64), torch.zeros(1, 3, dtype=F64))
    check_op("bn_fwd", backend, (*args, EPS, False), F64)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_reads_and_writes_parameter_views_in_place(backend, dtype):
    """γ, β and their (co)tangents as views into flat [T, P] buffers: values equal the
    contiguous case, the gradients land in their views and nothing around them changes."""
    op, dev = dispatch.op, device(backend)
    g0 = gen(f"views-{dtype}")
    T, R, C, P = 3, 37, 5, 23
    x, gy, rx, rgy = cast(dtype, dev, *(randn(g0, T, R, C) for _ in range(4)))
    params, tangent = cast(dtype, dev, randn(g0, T, P), randn(g0, T, P))
    g, b = params[:, 3:3 + C], params[:, 11:11 + C]
    rg, rb = tangent[:, 3:3 + C], tangent[:, 11:11 + C]
    y, xhat, rstd = op("bn_fwd", backend)(x, g, b, 1e-5, True)
    want = op("bn_fwd", "reference")(x, g.contiguous(), b.contiguous(), 1e-5, True)
    for o, w in zip((y, xhat, rstd), want):
        assert torch.allclose(o, w, rtol=1e-5, atol=1e-6)
    grad = torch.full((T, P), 7.0, dtype=dtype, device=dev)
    gx = op("bn_bwd", backend)(gy, xhat, rstd, g, y, grad[:, 3:3 + C], grad[:, 11:11 + C])
    wgg, wgb = _grads(T, C, dtype, dev)
    wgx = op("bn_bwd", "reference")(gy, xhat, rstd, g.contiguous(), y, wgg, wgb)
    assert torch.allclose(gx, wgx, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad[:, 3:3 + C], wgg, rtol=1e-5, atol=1e-5) and torch.allclose(grad[:, 11:11 + C], wgb, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(P, dtype=torch.bool)
    untouched[3:3 + C] = untouched[11:11 + C] = False
    assert (grad[:, untouched] == 7.0).all()
    ry, rxhat, a = op("bn_tfwd", backend)(rx, xhat, rstd, g, rg, rb, y)
    hv = torch.full((T, P), -3.0, dtype=dtype, device=dev)
    rgx = op("bn_tbwd", backend)(gy, rgy, xhat, rxhat, rstd, a, g, rg, y, hv[:, 3:3 + C], hv[:, 11:11 + C])
    wp = _grads(T, C, dtype, dev)
    w = (op("bn_tbwd", "reference")(gy, rgy, xhat, rxhat, rstd, a, g.contiguous(), rg.contiguous(), y, *wp), *wp)
    assert torch.allclose(rgx, w[0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(hv[:, 3:3 + C], w[1], rtol=1e-5, atol=1e-4) and torch.allclose(hv[:, 11:11 + C], w[2], rtol=1e-5, atol=1e-4)
    assert (hv[:, untouched] == -3.0).all()
    if backend != "reference":  # the ops validate; the twin is plain PyTorch
        with pytest.raises(ValueError, match="share one row stride"):
            op("bn_bwd", backend)(gy, xhat, rstd, g, y, torch.empty(T, C, dtype=dtype, device=dev), grad[:, 11:11 + C])


# --------------------------------------------------------------------------- the Triton plan


def _row_splits(monkeypatch, min_rows):
    """Row splits at test sizes: as many as ``min_rows`` rows per split allow, partials
    combined 2 at a time (several combining steps, a partial last one)."""
    from imaml_kernels.triton import batchnorm

    monkeypatch.setattr(batchnorm, "BN_TARGET_PROGRAMS", 10**6)
    monkeypatch.setattr(batchnorm, "BN_MIN_PROGRAMS", 10**6)
    monkeypatch.setattr(batchnorm, "BN_SPLIT_MIN_R", 0)
    monkeypatch.setattr(batchnorm, "BN_MIN_SPLIT_ROWS", min_rows)
    monkeypatch.setattr(batchnorm, "BN_SPLIT_BLOCK", 2)
    return batchnorm


@runs("triton")
@pytest.mark.parametrize("relu", [False, True], ids=["id", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", BN_OPS)
def test_bn_triton_small_tiles(small_tiles, name, dtype, relu):
    bn_check(name, 2, 37, 5, relu, dtype, "triton")


# R = 37: 7 splits of 6 rows / 3 of 13 (+ a partial one); with 5 rows only the ReLU case (the interpreter is slow).
SPLITS = [(5, True, 7), (12, False, 3), (12, True, 3)]


@runs("triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("min_rows,relu,splits", SPLITS, ids=[f"rows{m}-{_act(r)}" for m, r, _ in SPLITS])
@pytest.mark.parametrize("name", BN_OPS)
def test_bn_triton_row_splits(small_tiles, monkeypatch, name, min_rows, relu, splits, dtype):
    tbn = _row_splits(monkeypatch, min_rows)
    assert tbn.plan(2, 37, 5, 4)[4] == splits
    bn_check(name, 2, 37, 5, relu, dtype, "triton")


@runs("triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", BN_OPS)
def test_bn_triton_row_splits_default_tiles(monkeypatch, name, dtype):
    # Default tiles and channel blocks: 4 splits of 41 rows (the last of 38).
    tbn = _row_splits(monkeypatch, 40)
    assert tbn.plan(1, 161, 20, 8)[3:] == (41, 4)
    bn_check(name, 1, 161, 20, True, dtype, "triton")


@runs("triton")
def test_bn_plan_paper_shapes():
    """At least 2 programs per SM of an H100 where rows allow: from narrower channel blocks
    first (every Omniglot layer at T = 32: one launch), then from row splits; small layers
    stay one launch."""
    from imaml_kernels.triton import batchnorm

    for R in (980, 245, 80, 20):  # Omniglot 5w1s at T = 32: 512 programs, no split
        assert batchnorm.plan(32, R, 64, 4)[1:] [1:] == (16, R, 1) and batchnorm.plan(32, R, 64, 4)[1] == 4
    for T, R, C in ((32, 980, 64), (16, 3920, 64), (16, 980, 64), (4, 35280, 32), (4, 529200, 32), (4, 2205, 32)):
        for elsize in (4, 8):
            _, _, cb, rps, ns = batchnorm.plan(T, R, C, elsize)
            assert T * cb * ns >= 2 * 132 and rps * ns >= R > rps * (ns - 1), (T, R, C)
            assert ns <= batchnorm.BN_MAX_SPLITS and rps >= batchnorm.BN_MIN_SPLIT_ROWS
    for T, R, C in ((32, 245, 64), (32, 20, 64), (16, 320, 64), (4, 500, 32)):
        assert batchnorm.plan(T, R, C, 4)[4] == 1, (T, R, C)


# --------------------------------------------------------------------------- NaN, index guards


PLANS = [pytest.param(b, False, id=b, marks=runs(b)) for b in BACKEND_NAMES]
PLANS += [pytest.param("triton", True, id="triton-row-splits", marks=runs("triton"))]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend,split", PLANS)
def test_bn_fwd_propagates_nan(monkeypatch, backend, split, dtype):
    """A NaN in one channel of one task: its rstd, xhat and y (ReLU keeps NaN) are NaN, in one
    launch and with row splits alike, and nothing else is. On a GPU a NaN-dropping clamp of M2
    (``tl.maximum``: ``max.f64``) made rstd finite in one launch but not in the split combine."""
    if split:
        assert _row_splits(monkeypatch, 12).plan(2, 37, 5, 8)[4] == 3
    s = bn_state(f"nan-{split}", 2, 37, 5, True, dtype, device(backend))
    x = s.x.clone()
    x[1, 20, 3] = float("nan")
    y, xhat, rstd = dispatch.op("bn_fwd", backend)(x, s.gamma, s.beta, EPS, True)
    nan = torch.zeros_like(rstd, dtype=torch.bool)
    nan[1, 3] = True
    assert torch.equal(torch.isnan(rstd), nan), rstd
    for out in (xhat, y):
        assert torch.equal(torch.isnan(out), nan[:, None, :].expand_as(out)), out
    want = ref.bn_fwd(x.double(), s.gamma.double(), s.beta.double(), EPS, True)
    for got, w in zip((y, xhat, rstd), want):
        assert rel(got[~torch.isnan(got)].double(), w[~torch.isnan(w)]) < (1e-12 if dtype == F64 else 1e-5)


@runs("triton")
def test_bn_launcher_guards_int32_rows_at_the_limit():
    """R + BLOCK_R < 2**31 (the last tile's row indices) and R C < 2**31: at R = 2**31 - 2048
    with one channel (BLOCK_R 2048 float32) refused, one row fewer launched (meta tensors)."""
    from imaml_kernels.triton import batchnorm

    from .common import Recorder, assert_grids_fit

    def fwd(R):
        x = torch.empty(1, R, 1, device="meta")
        p, rstd = torch.empty(1, 1, device="meta"), torch.empty(1, 1, device="meta")
        rec = Recorder()
        batchnorm.bn_fwd(x, p, p.clone(), EPS, True, torch.empty_like(x), torch.empty_like(x), rstd, wrap=rec)
        return rec.grids

    assert batchnorm.plan(1, 2**31 - 2049, 1, 4)[0] == 2048
    assert_grids_fit(fwd(2**31 - 2049))
    with pytest.raises(ValueError, match="int32"):
        fwd(2**31 - 2048)


# --------------------------------------------------------------------------- opcheck and the binding


def opcheck_cases(name, dev):
    """Valid float64 calls of ``name`` for opcheck: ReLU and none, and γ/β (and their
    gradients) as views into flat ``[T, P]`` buffers (row stride P, read and written in place)."""
    T, R, C = 2, 6, 3
    g0 = gen(f"opcheck-{name}")
    x, rx, gy, rgy = cast(F64, dev, *(randn(g0, T, R, C) for _ in range(4)))
    g, b, rg, rb = cast(F64, dev, *(randn(g0, T, C) for _ in range(4)))
    flat, out = cast(F64, dev, randn(g0, T, 17), randn(g0, T, 17))
    y, xhat, rstd = ref.bn_fwd(x, g, b, EPS, True)
    _, rxhat, a = ref.bn_tfwd(rx, xhat, rstd, g, rg, rb, y)
    e = lambda: torch.empty_like(g)  # noqa: E731
    N, H, W = 2, 3, 1  # R = N H W; the next convolution: 3x3, stride 2, pad 1 -> 2 x 1 patches
    gcols = randn(g0, T, N, 2, 1, 3, 3, C).to(dev)
    return {
        "bn_fwd": [(x, g, b, EPS, True), (x, flat[:, 1:1 + C], flat[:, 9:9 + C], EPS, True)],
        "bn_bwd": [(gy, xhat, rstd, g, y, e(), e()), (gy, xhat, rstd, g, None, e(), e()),
                   (gy, xhat, rstd, flat[:, 1:1 + C], y, out[:, 2:2 + C], out[:, 7:7 + C])],
        "bn_tfwd": [(rx, xhat, rstd, g, rg, rb, y)],
        "bn_tbwd": [(gy, rgy, xhat, rxhat, rstd, a, g, rg, y, e(), e())],
        "col2im_bn_bwd": [(gcols, H, W, 2, 1, 1, xhat, rstd, g, y, e(), e()), (gcols, H, W, 2, 1, 1, xhat, rstd, g, None, e(), e())],
        "col2im_bn_tbwd": [(gy, gcols, H, W, 2, 1, 1, xhat, rxhat, rstd, a, g, rg, relu_y, e(), e()) for relu_y in (y, None)],
    }[name]


@pytest.mark.parametrize("backend", backends(KERNELS))
@pytest.mark.parametrize("name", BN_OPS + COL_OPS)
def test_opcheck(name, backend):
    for args in opcheck_cases(name, device(backend)):
        opcheck(name, backend, args)


@runs("cpu")
def test_cpu_binding_rejects_an_unknown_dtype_code():
    x = torch.zeros(1, 1, 1)
    with pytest.raises(ValueError):
        _ext._C.bn_fwd_cpu(2, x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(),
                           1, 1, 1, EPS, False)
