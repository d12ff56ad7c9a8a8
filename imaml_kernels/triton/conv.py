"""Triton kernels of the convolution's data movement: ``im2col`` (zero padding fused) and its
adjoint ``col2im`` (a gather, no atomics), on channels-last ``[T, N, H, W, C]``."""

import triton
import triton.language as tl

from ._common import check, ident, split_f64  # noqa: F401

# Elements per program (patch rows x channels); read at launch time so tests can shrink them.
CONV_TILE = 4096
CONV_MAX_BLOCK_C = 64
CONV_NUM_WARPS = 8

@triton.jit
def _im2col_kernel(
    x_ptr,  # [T, N, H, W, C] input (unpadded, channels-last)
    cols_ptr,  # [T, N, Ho, Wo, K, K, C] out: the patches (overwritten)
    M,  # T * N * Ho * Wo * K * K patch rows of C channels
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    C,  # channels
    ph,  # top padding
    pw,  # left padding
    K: tl.constexpr,  # kernel size
    S: tl.constexpr,  # stride
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # The padding is fused: taps outside the image load 0 (masked), so no padded copy of x.
    mb = tl.program_id(0).to(tl.int64)  # int64: the patch offsets exceed 2**31 at paper sizes
    cb = tl.program_id(1).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M  # the last row block is partial
    cmask = chans < C  # the last channel block is partial
    j = rows % K
    i = (rows // K) % K
    wo = (rows // (K * K)) % Wo
    ho = (rows // (K * K * Wo)) % Ho
    img = rows // (K * K * Wo * Ho)  # t * N + n
    h = S * ho + i - ph
    w = S * wo + j - pw
    inside = rmask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    src = ((img * H + h) * W + w) * C
    v = tl.load(x_ptr + src[:, None] + chans[None, :], mask=inside[:, None] & cmask[None, :], other=0.0)
    tl.store(cols_ptr + rows[:, None] * C + chans[None, :], v, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _col2im_kernel(
    gcols_ptr,  # [T, N, Ho, Wo, K, K, C] cotangent of the im2col patches
    gx_ptr,  # [T, N, H, W, C] out: unpadded input cotangent (overwritten)
    M,  # T * N * H * W output pixels
    H,  # input height
    W,  # input width
    Ho,  # output height
    Wo,  # output width
    C,  # channels
    ph,  # top padding
    pw,  # left padding
    K: tl.constexpr,  # kernel size (unrolled K x K gather)
    S: tl.constexpr,  # stride (constexpr: the divisibility tests fold for S = 1)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Gather, not scatter: every output element sums its <= K*K patch entries in (i, j)
    # order, so the result is deterministic and needs no atomics or zero-fill.
    mb = tl.program_id(0).to(tl.int64)  # int64: T N H W C and the gcols offsets exceed 2**31
    cb = tl.program_id(1).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M  # the last pixel block is partial
    cmask = cols < C  # the last channel block is partial
    w = rows % W
    h = (rows // W) % H
    img = rows // (H * W)  # t * N + n
    hp = h + ph
    wp = w + pw
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=gx_ptr.dtype.element_ty)
    for i in tl.static_range(K):
        dh = hp - i
        ho = dh // S
        # Patch row i of output row ho covers padded row hp iff hp = S ho + i, 0 <= ho < Ho
        # (dh >= 0 first: // and % truncate towards zero for negatives).
        okh = (dh >= 0) & (dh % S == 0) & (ho < Ho)
        for j in tl.static_range(K):
            dw = wp - j
            wo = dw // S
            ok = rmask & okh & (dw >= 0) & (dw % S == 0) & (wo < Wo)
            src = (((img * Ho + ho) * Wo + wo) * (K * K) + (i * K + j)) * C
            acc += tl.load(gcols_ptr + src[:, None] + cols[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
    tl.store(gx_ptr + rows[:, None] * C + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


def im2col(x, cols, k, s, ph, pw, wrap=ident):
    """Conv patches with fused zero padding: ``x [T,N,H,W,C]`` -> overwrites
    ``cols [T,N,Ho,Wo,k,k,C]``."""
    T, N, H, W, C = x.shape
    Ho, Wo = cols.shape[2], cols.shape[3]
    check(x, (T, N, H, W, C), cols=(cols, (T, N, Ho, Wo, k, k, C)))
    M = T * N * Ho * Wo * k * k
    if M * C == 0:
        return
    block_c = min(triton.next_power_of_2(C), CONV_MAX_BLOCK_C)
    block_m = max(1, min(CONV_TILE // block_c, triton.next_power_of_2(M)))
    wrap(_im2col_kernel)[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
        x, cols, M, H, W, Ho, Wo, C, ph, pw,
        K=int(k), S=int(s), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=CONV_NUM_WARPS,
    )


def col2im(gcols, gx, k, s, ph, pw, wrap=ident):
    """Adjoint of im2col: ``gcols [T,N,Ho,Wo,k,k,C]`` -> overwrites ``gx [T,N,H,W,C]``."""
    T, N, H, W, C = gx.shape
    Ho, Wo = gcols.shape[2], gcols.shape[3]
    check(gx, (T, N, H, W, C), gcols=(gcols, (T, N, Ho, Wo, k, k, C)))
    if T * N * H * W * C == 0:
        return
    M = T * N * H * W
    block_c = min(triton.next_power_of_2(C), CONV_MAX_BLOCK_C)
    block_m = max(1, min(CONV_TILE // block_c, triton.next_power_of_2(M)))
    wrap(_col2im_kernel)[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
        gcols, gx, M, H, W, Ho, Wo, C, ph, pw,
        K=int(k), S=int(s), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=CONV_NUM_WARPS,
    )
