"""Triton kernels of the convolution's data movement: ``im2col`` (zero padding fused) and its
adjoint ``col2im`` (a gather, no atomics), on channels-last ``[T, N, H, W, C]``.

Both walk pixels in ``[BLOCK_P, BLOCK_C]`` tiles (channels innermost, contiguous) with the
``K × K`` taps unrolled, so the pixel's coordinates are divided out once per pixel, not per
patch entry, in int32 (the launchers check that pixel and patch-row counts stay below
2**31); only element offsets are int64 (``T·N·H·W·C`` and the patch buffers pass 2**31 at
large ``T``). When a whole patch row is short (``K·K·C <= CONV_ROWS_MAX``: the first layer,
C = 1 or 3), ``im2col`` copies patch rows instead: a ``[BLOCK_P, next_pow2(K·K·C)]`` tile, one
contiguous row per pixel, rather than a 1- or 3-channel tile per tap.
"""

import triton
import triton.language as tl

from ._common import check, ident

# Tile bytes per program: 2048 float32 / 1024 float64 elements, 8 / 4 per thread at 8
# warps. col2im issues its K*K loads together (they are independent): half the tile, with
# int32 pixel arithmetic, takes it from 255 registers and 300+ bytes of spills (the old
# 4096-element tile, int64 indices) to under 40. Read at launch time so tests can shrink them.
# Not swept on a GPU (none was available).
CONV_TILE_BYTES = 8192
COL2IM_TILE_BYTES = 4096
CONV_MAX_BLOCK_C = 64
CONV_NUM_WARPS = 8
CONV_ROWS_MAX = 64  # im2col copies whole patch rows when K*K*C is at most this
# Pixel counts and image sizes need no specialisation (C carries the alignment; padding 1 and
# sizes that happen to be 1 would each be another compile).
_NO_SPEC = ("P", "H", "W", "Ho", "Wo", "ph", "pw")


@triton.jit
def gather_cols(gcols_ptr, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw,
                 K: tl.constexpr, S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The input cotangent of a K x K, stride-S convolution at rows ``(n, h, w)`` of task ``t``
    (``R = N H W`` rows per task): the sum of its <= K*K entries of the patch cotangent ``gcols
    [T, N, Ho, Wo, K, K, C]`` in (i, j) order, in the data type. ``_col2im_kernel`` (``t = 0``,
    rows over all tasks) and the BatchNorm backward's fused loads share it, so they gather the
    same values bit for bit, compiled too (loads and round-to-nearest adds in a fixed order:
    nothing for FMA contraction or an approximate instruction to change). Gather, not scatter:
    deterministic, no atomics, no zero-fill."""
    w = rows % W
    h = (rows // W) % H
    img = t * (R // (H * W)) + rows // (H * W)  # int64: t * N + n
    hp = h + ph
    wp = w + pw
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=gcols_ptr.dtype.element_ty)
    for i in tl.static_range(K):
        dh = hp - i
        ho = dh // S
        okh = (dh >= 0) & (dh % S == 0) & (ho < Ho)  # dh >= 0 first: // truncates towards 0
        rb = (img * Ho + ho) * Wo
        for j in tl.static_range(K):
            dw = wp - j
            wo = dw // S
            ok = okh & (dw >= 0) & (dw % S == 0) & (wo < Wo)
            # a patch-row index (int32 where the launcher bounds it), then int64 element offsets
            src = ((rb + wo) * (K * K) + (i * K + j)).to(tl.int64) * C
            acc += tl.load(gcols_ptr + src[:, None] + cols[None, :], mask=m & ok[:, None], other=0.0)
    return acc



@triton.jit(do_not_specialize=_NO_SPEC)
def _im2col_kernel(
    x_ptr,  # [T, N, H, W, C] input (unpadded, channels-last)
    cols_ptr,  # [T, N, Ho, Wo, K, K, C] out: the patches (overwritten)
    P,  # T * N * Ho * Wo output pixels
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    C,  # channels
    ph,  # top padding
    pw,  # left padding
    K: tl.constexpr,  # kernel size (unrolled K x K taps)
    S: tl.constexpr,  # stride
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # The padding is fused: taps outside the image load 0 (masked), so no padded copy of x.
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # int32: P + BLOCK_P < 2**31 (launcher)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = pix < P  # the last pixel block is partial
    cm = chans < C  # the last channel block is partial
    wo = pix % Wo
    ho = (pix // Wo) % Ho
    img = pix // (Wo * Ho)  # t * N + n
    h0 = S * ho - ph
    w0 = S * wo - pw
    dst = cols_ptr + (pix.to(tl.int64) * (K * K * C))[:, None] + chans[None, :]
    out_m = pm[:, None] & cm[None, :]
    for i in tl.static_range(K):
        h = h0 + i
        okh = pm & (h >= 0) & (h < H)
        rowbase = (img * H + h) * W  # an input pixel index: int32 (T N H W < 2**31)
        for j in tl.static_range(K):
            w = w0 + j
            ok = okh & (w >= 0) & (w < W)
            src = (rowbase + w).to(tl.int64) * C
            v = tl.load(x_ptr + src[:, None] + chans[None, :], mask=ok[:, None] & cm[None, :], other=0.0)
            tl.store(dst + (i * K + j) * C, v, mask=out_m)


@triton.jit(do_not_specialize=_NO_SPEC)
def _im2col_rows_kernel(
    x_ptr,  # [T, N, H, W, C] input (unpadded, channels-last)
    cols_ptr,  # [T, N, Ho, Wo, K, K, C] out: the patches (overwritten)
    P,  # T * N * Ho * Wo output pixels
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    ph,  # top padding
    pw,  # left padding
    C: tl.constexpr,  # channels (constexpr: the patch-row decomposition divides by it)
    K: tl.constexpr,  # kernel size
    S: tl.constexpr,  # stride
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # >= K * K * C: a patch row is held whole
):
    # One patch row (i, j, c) per pixel: contiguous K*K*C elements of cols.
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # int32: P + BLOCK_P < 2**31 (launcher)
    q = tl.arange(0, BLOCK_Q)
    pm = pix < P
    qm = q < K * K * C  # padding lanes of the row
    wo = pix % Wo
    ho = (pix // Wo) % Ho
    img = pix // (Wo * Ho)
    i = q // (K * C)
    j = (q // C) % K
    c = q % C
    h = (S * ho - ph)[:, None] + i[None, :]
    w = (S * wo - pw)[:, None] + j[None, :]
    ok = (pm[:, None] & qm[None, :]) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    src = ((img[:, None] * H + h) * W + w).to(tl.int64) * C + c[None, :]
    v = tl.load(x_ptr + src, mask=ok, other=0.0)
    dst = (pix.to(tl.int64) * (K * K * C))[:, None] + q[None, :]
    tl.store(cols_ptr + dst, v, mask=pm[:, None] & qm[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _col2im_kernel(
    gcols_ptr,  # [T, N, Ho, Wo, K, K, C] cotangent of the im2col patches
    gx_ptr,  # [T, N, H, W, C] out: unpadded input cotangent (overwritten)
    P,  # T * N * H * W input pixels
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    C,  # channels
    ph,  # top padding
    pw,  # left padding
    K: tl.constexpr,  # kernel size (unrolled K x K gather)
    S: tl.constexpr,  # stride (constexpr: the divisibility tests fold for S = 1)
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # int32: P + BLOCK_P < 2**31 (launcher)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = pix < P  # the last pixel block is partial
    cm = chans < C  # the last channel block is partial
    acc = gather_cols(gcols_ptr, 0, pix, chans, pm[:, None] & cm[None, :], H * W, C, H, W, Ho, Wo, ph, pw, K, S,
                      BLOCK_P, BLOCK_C)
    out = (pix.to(tl.int64) * C)[:, None] + chans[None, :]
    tl.store(gx_ptr + out, acc, mask=pm[:, None] & cm[None, :])


# --------------------------------------------------------------------------- host launchers


def _blocks(C, elsize, tile_bytes):
    """``(BLOCK_P, BLOCK_C)``: the whole tile whatever the pixel count (a few pixels leave rows
    masked), so every pixel count shares one compile."""
    block_c = min(triton.next_power_of_2(max(C, 1)), CONV_MAX_BLOCK_C)
    return max(1, tile_bytes // elsize // block_c), block_c


def _check_int32(block, **counts):
    """Each count, and the pixel index ``pid * block + arange(block)`` of the last block (up to
    ``count + block - 2``), fits in int32: a wrapped index would be negative and pass the
    ``pix < P`` mask."""
    for name, n in counts.items():
        if n + block >= 2**31:
            raise ValueError(f"{name} = {n} (+ a block of {block}) is beyond the kernels' int32 pixel indices")


def im2col(x, Ho, Wo, k, s, ph, pw, cols, wrap=ident):
    """Conv patches with fused zero padding: ``x [T,N,H,W,C]`` -> overwrites
    ``cols [T,N,Ho,Wo,k,k,C]``."""
    T, N, H, W, C = x.shape
    check(x, (T, N, H, W, C), cols=(cols, (T, N, Ho, Wo, k, k, C)))
    P = T * N * Ho * Wo
    if P * C == 0:
        return
    k, s = int(k), int(s)
    if k * k * C <= CONV_ROWS_MAX:
        block_q = triton.next_power_of_2(k * k * C)
        block_p = max(1, CONV_TILE_BYTES // x.element_size() // block_q)
        _check_int32(block_p, pixels=T * N * max(H * W, Ho * Wo))
        wrap(_im2col_rows_kernel)[(triton.cdiv(P, block_p),)](
            x, cols, P, H, W, Ho, Wo, ph, pw,
            C=C, K=k, S=s, BLOCK_P=block_p, BLOCK_Q=block_q, num_warps=CONV_NUM_WARPS,
        )
        return
    block_p, block_c = _blocks(C, x.element_size(), CONV_TILE_BYTES)
    _check_int32(block_p, pixels=T * N * max(H * W, Ho * Wo))
    wrap(_im2col_kernel)[(triton.cdiv(P, block_p), triton.cdiv(C, block_c))](
        x, cols, P, H, W, Ho, Wo, C, ph, pw,
        K=k, S=s, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=CONV_NUM_WARPS,
    )


def col2im(gcols, H, W, s, ph, pw, gx, wrap=ident):
    """Adjoint of im2col: ``gcols [T,N,Ho,Wo,k,k,C]`` -> overwrites ``gx [T,N,H,W,C]``."""
    T, N, Ho, Wo, k = gcols.shape[:5]
    C = gcols.shape[6]
    check(gcols, gcols.shape, gcols=(gcols, (T, N, Ho, Wo, k, k, C)), gx=(gx, (T, N, H, W, C)))
    P = T * N * H * W
    if P * C == 0:
        return
    block_p, block_c = _blocks(C, gx.element_size(), COL2IM_TILE_BYTES)
    _check_int32(block_p, pixels=P, patch_rows=T * N * Ho * Wo * k * k)
    wrap(_col2im_kernel)[(triton.cdiv(P, block_p), triton.cdiv(C, block_c))](
        gcols, gx, P, H, W, Ho, Wo, C, ph, pw,
        K=int(k), S=int(s), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=CONV_NUM_WARPS,
    )
