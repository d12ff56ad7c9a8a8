"""Triton kernels of the 2×2 max-pool (forward with uint8 argmax, tangent gather, adjoint
scatter) on channels-last ``[T, N, H, W, C]``, and their launchers."""

import torch
import triton
import triton.language as tl

from ._common import check, ident

# Tile bytes per program (pixels x channels): 2048 float32 / 1024 float64 elements, 8 / 4 per
# thread at 8 warps (the forward holds its 4 window loads at once). Read at launch time so
# tests can shrink them. Pixel coordinates are int32 (the launchers check the pixel count is
# below 2**31), element offsets int64.
POOL_TILE_BYTES = 8192
POOL_MAX_BLOCK_C = 64
POOL_NUM_WARPS = 8
_NO_SPEC = ("M", "H", "W", "Ho", "Wo")  # C carries the alignment; no compile per image size


@triton.jit(do_not_specialize=_NO_SPEC)
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
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 output pixels
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rows < M)[:, None] & (chans < C)[None, :]  # partial pixel and channel blocks
    wo = rows % Wo
    ho = (rows // Wo) % Ho
    img = rows // (Wo * Ho)
    base = ((img * H + 2 * ho) * W + 2 * wo).to(tl.int64) * C  # top-left input pixel
    best = tl.load(x_ptr + base[:, None] + chans[None, :], mask=m, other=0.0)
    k = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.int32)
    for q in tl.static_range(1, 4):
        off = base + ((q // 2) * W + (q % 2)) * C
        v = tl.load(x_ptr + off[:, None] + chans[None, :], mask=m, other=0.0)
        take = (v > best) | ((v != v) & (best == best))  # strict: the first maximum wins ties
        best = tl.where(take, v, best)
        k = tl.where(take, q, k)
    out = (rows.to(tl.int64) * C)[:, None] + chans[None, :]
    tl.store(y_ptr + out, best, mask=m)
    tl.store(idx_ptr + out, k.to(tl.uint8), mask=m)


@triton.jit(do_not_specialize=_NO_SPEC)
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
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 output pixels
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (rows < M)[:, None] & (chans < C)[None, :]
    wo = rows % Wo
    ho = (rows // Wo) % Ho
    img = rows // (Wo * Ho)
    out = (rows.to(tl.int64) * C)[:, None] + chans[None, :]
    k = tl.load(idx_ptr + out, mask=m, other=0).to(tl.int32)
    base = ((img * H + 2 * ho) * W + 2 * wo).to(tl.int64) * C  # top-left input pixel
    src = base[:, None] + ((k // 2) * W + k % 2) * C + chans[None, :]
    tl.store(y_ptr + out, tl.load(x_ptr + src, mask=m, other=0.0), mask=m)


@triton.jit(do_not_specialize=_NO_SPEC)
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
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 input pixels
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rm = rows < M
    cm = chans < C
    w = rows % W
    h = (rows // W) % H
    img = rows // (W * H)
    inside = rm & (h // 2 < Ho) & (w // 2 < Wo)  # odd last row/column: dropped by the pool
    win = ((img * Ho + h // 2) * Wo + w // 2).to(tl.int64) * C
    m = inside[:, None] & cm[None, :]
    k = tl.load(idx_ptr + win[:, None] + chans[None, :], mask=m, other=255).to(tl.int32)
    g = tl.load(gy_ptr + win[:, None] + chans[None, :], mask=m, other=0.0)
    mine = (k == ((h % 2) * 2 + (w % 2))[:, None]) & m
    out = (rows.to(tl.int64) * C)[:, None] + chans[None, :]
    tl.store(gx_ptr + out, tl.where(mine, g, 0.0), mask=rm[:, None] & cm[None, :])


def _pool_grid(M, C, elsize, pixels):
    """``(grid, BLOCK_M, BLOCK_C)`` over ``M`` pixels; ``pixels`` (the larger of the input and
    output counts) plus a block must fit in int32: the last block's ``pid * BLOCK_M +
    arange(BLOCK_M)`` would otherwise wrap negative and pass the ``rows < M`` mask."""
    block_c = min(triton.next_power_of_2(max(C, 1)), POOL_MAX_BLOCK_C)
    block_m = max(1, POOL_TILE_BYTES // elsize // block_c)  # the whole tile whatever M: one compile for all
    if pixels + block_m >= 2**31:
        raise ValueError(f"{pixels} pixels (+ a block of {block_m}) are beyond the kernels' int32 pixel indices")
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
    grid, bm, bc = _pool_grid(M, C, x.element_size(), T * N * H * W)
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
    grid, bm, bc = _pool_grid(M, C, x.element_size(), T * N * H * W)
    wrap(_maxpool_gather_kernel)[grid](x, idx, y, M, H, W, H // 2, W // 2, C, BLOCK_M=bm, BLOCK_C=bc, num_warps=POOL_NUM_WARPS)


def maxpool_scatter(gy, idx, H, W, gx, wrap=ident):
    """The max-pool's adjoint: writes ``gx [T,N,H,W,C]`` = ``gy`` at ``idx``, 0 elsewhere."""
    T, N, _, _, C = gy.shape
    out = (T, N, H // 2, W // 2, C)
    check(gy, gy.shape, gy=(gy, out), gx=(gx, (T, N, H, W, C)))
    _check_idx(idx, out)
    M = T * N * H * W
    if M * C == 0:
        return
    grid, bm, bc = _pool_grid(M, C, gx.element_size(), M)
    wrap(_maxpool_scatter_kernel)[grid](gy, idx, gx, M, H, W, H // 2, W // 2, C, BLOCK_M=bm, BLOCK_C=bc, num_warps=POOL_NUM_WARPS)
