"""Triton kernels of the 2×2 max-pool (forward with uint8 argmax, tangent gather, adjoint
scatter) on channels-last ``[T, N, H, W, C]``, and their launchers."""

import torch
import triton
import triton.language as tl

from ._common import check, ident, split_f64  # noqa: F401

# Elements per program (pixels x channels); read at launch time so tests can shrink them.
POOL_TILE = 4096
POOL_MAX_BLOCK_C = 64
POOL_NUM_WARPS = 8

@triton.jit
def _maxpool_fwd_kernel(
    x_ptr,  # [T, N, H, W, C] input (channels-last)
    y_ptr,  # [T, N, Ho, Wo, C] out: window maxima
    idx_ptr,  # [T, N, Ho, Wo, C] out: uint8 2*di + dj of the first maximum (NaN wins)
    M,  # T * N * Ho * Wo output pixels
    H,  # input height
    W,  # input width
    Ho,  # H // 2 (floor mode: an odd last row is dropped)
    Wo,  # W // 2
    C,  # channels
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    mb = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rows < M)[:, None] & (chans < C)[None, :]  # partial pixel and channel blocks
    wo = rows % Wo
    ho = (rows // Wo) % Ho
    img = rows // (Wo * Ho)
    base = ((img * H + 2 * ho) * W + 2 * wo) * C
    best = tl.load(x_ptr + base[:, None] + chans[None, :], mask=m, other=0.0)
    k = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.int32)
    for q in tl.static_range(1, 4):
        off = base + ((q // 2) * W + (q % 2)) * C
        v = tl.load(x_ptr + off[:, None] + chans[None, :], mask=m, other=0.0)
        take = (v > best) | ((v != v) & (best == best))  # strict: the first maximum wins ties
        best = tl.where(take, v, best)
        k = tl.where(take, q, k)
    out = rows[:, None] * C + chans[None, :]
    tl.store(y_ptr + out, best, mask=m)
    tl.store(idx_ptr + out, k.to(tl.uint8), mask=m)


@triton.jit
def _maxpool_gather_kernel(
    x_ptr,  # [T, N, H, W, C] tangent input
    idx_ptr,  # [T, N, Ho, Wo, C] uint8 argmax of the forward
    y_ptr,  # [T, N, Ho, Wo, C] out: x at idx
    M,  # T * N * Ho * Wo
    H,
    W,
    Ho,
    Wo,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    mb = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rows < M)[:, None] & (chans < C)[None, :]
    wo = rows % Wo
    ho = (rows // Wo) % Ho
    img = rows // (Wo * Ho)
    out = rows[:, None] * C + chans[None, :]
    k = tl.load(idx_ptr + out, mask=m, other=0).to(tl.int64)
    src = (((img * H + 2 * ho)[:, None] + k // 2) * W + (2 * wo)[:, None] + k % 2) * C + chans[None, :]
    tl.store(y_ptr + out, tl.load(x_ptr + src, mask=m, other=0.0), mask=m)


@triton.jit
def _maxpool_scatter_kernel(
    gy_ptr,  # [T, N, Ho, Wo, C] cotangent of the maxima
    idx_ptr,  # [T, N, Ho, Wo, C] uint8 argmax of the forward
    gx_ptr,  # [T, N, H, W, C] out: gy at idx, 0 elsewhere (fully written)
    M,  # T * N * H * W input pixels
    H,
    W,
    Ho,
    Wo,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # A gather over input pixels: each reads its window's argmax, so no zero-fill pass.
    mb = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < M
    cm = chans < C
    w = rows % W
    h = (rows // W) % H
    img = rows // (W * H)
    inside = rm & (h // 2 < Ho) & (w // 2 < Wo)  # odd last row/column: dropped by the pool
    win = ((img * Ho + h // 2) * Wo + w // 2) * C
    m = inside[:, None] & cm[None, :]
    k = tl.load(idx_ptr + win[:, None] + chans[None, :], mask=m, other=255).to(tl.int32)
    g = tl.load(gy_ptr + win[:, None] + chans[None, :], mask=m, other=0.0)
    mine = (k == ((h % 2) * 2 + (w % 2)).to(tl.int32)[:, None]) & m
    tl.store(gx_ptr + rows[:, None] * C + chans[None, :], tl.where(mine, g, 0.0), mask=rm[:, None] & cm[None, :])


def _pool_grid(M, C):
    block_c = min(triton.next_power_of_2(max(C, 1)), POOL_MAX_BLOCK_C)
    block_m = max(1, min(POOL_TILE // block_c, triton.next_power_of_2(max(M, 1))))
    return (triton.cdiv(M, block_m), triton.cdiv(C, block_c)), block_m, block_c


def _check_idx(idx, shape):
    if idx.dtype != torch.uint8 or tuple(idx.shape) != tuple(shape) or not idx.is_contiguous():
        raise ValueError(f"idx: {idx.dtype} {tuple(idx.shape)}, expected contiguous uint8 {tuple(shape)}")


def maxpool_fwd(x, y, idx, wrap=ident):
    """2×2 max-pool, stride 2, floor mode: ``x [T,N,H,W,C]`` -> writes ``y`` and ``idx``
    (``[T,N,H//2,W//2,C]``, uint8 ``2·di + dj``)."""
    T, N, H, W, C = x.shape
    out = (T, N, H // 2, W // 2, C)
    check(x, x.shape, y=(y, out))
    _check_idx(idx, out)
    M = T * N * (H // 2) * (W // 2)
    if M * C == 0:
        return
    grid, bm, bc = _pool_grid(M, C)
    wrap(_maxpool_fwd_kernel)[grid](x, y, idx, M, H, W, H // 2, W // 2, C, BLOCK_M=bm, BLOCK_C=bc, num_warps=POOL_NUM_WARPS)


def maxpool_gather(x, idx, y, wrap=ident):
    """The max-pool's tangent: writes ``y [T,N,H//2,W//2,C]`` = ``x`` at ``idx``."""
    T, N, H, W, C = x.shape
    out = (T, N, H // 2, W // 2, C)
    check(x, x.shape, y=(y, out))
    _check_idx(idx, out)
    M = T * N * (H // 2) * (W // 2)
    if M * C == 0:
        return
    grid, bm, bc = _pool_grid(M, C)
    wrap(_maxpool_gather_kernel)[grid](x, idx, y, M, H, W, H // 2, W // 2, C, BLOCK_M=bm, BLOCK_C=bc, num_warps=POOL_NUM_WARPS)


def maxpool_scatter(gy, idx, gx, wrap=ident):
    """The max-pool's adjoint: writes ``gx [T,N,H,W,C]`` = ``gy`` at ``idx``, 0 elsewhere."""
    T, N, H, W, C = gx.shape
    out = (T, N, H // 2, W // 2, C)
    check(gx, gx.shape, gy=(gy, out))
    _check_idx(idx, out)
    M = T * N * H * W
    if M * C == 0:
        return
    grid, bm, bc = _pool_grid(M, C)
    wrap(_maxpool_scatter_kernel)[grid](gy, idx, gx, M, H, W, H // 2, W // 2, C, BLOCK_M=bm, BLOCK_C=bc, num_warps=POOL_NUM_WARPS)
