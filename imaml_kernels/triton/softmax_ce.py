"""Triton kernels of the softmax cross-entropy (loss, softmax and gradient in one pass) and
its tangent, on ``[T, N, K]`` logits."""

import torch
import triton
import triton.language as tl

from ._common import check, ident

# Bytes per tile (rows x padded classes): 2048 float32 / 1024 float64 elements; read at
# launch time so tests can shrink it. Warps: one per 512 bytes of the tile, at most
# SOFTMAX_NUM_WARPS (5-way logits make small tiles: one warp, not eight mostly idle).
SOFTMAX_TILE_BYTES = 8192
SOFTMAX_NUM_WARPS = 8
# Softmax rows are held whole in one tile: classes beyond this are not supported.
SOFTMAX_MAX_K = 16384


@triton.jit(do_not_specialize=("N", "GS"))
def _softmax_ce_kernel(
    logits_ptr,  # [T, N, K] logits
    y_ptr,  # [T, N] int64 labels in [0, K)
    loss_ptr,  # [T] out: mean over n of logsumexp - logit[y]
    prob_ptr,  # [T, N, K] out: softmax
    grad_ptr,  # [T, N, K] out: (prob - onehot(y)) / N
    gbias_ptr,  # [T, K] rows of stride GS, out (GBIAS): sum over the task's rows of grad
    N,  # rows per task
    K,  # classes
    GS,  # gbias row stride
    GBIAS: tl.constexpr,  # also write the gradient of a bias added to the logits
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= K: a row is held whole
):
    # One program per task: it owns the loss sum, so loss needs no second pass or atomics.
    t = tl.program_id(0).to(tl.int64)  # int64: T * N * K exceeds 2**31 at large T
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K  # padding classes
    dt = logits_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], dtype=dt)
    gsum = tl.zeros([BLOCK_K], dtype=tl.float64)  # float64, as the C++ kernel
    # Reciprocals, then products: a float64 division is a subroutine call on the GPU, and one
    # per element kept enough values live across those calls to spill (80 registers, 8 to 20
    # bytes at float64 over the grid of `python -m bench compile --grid`); now one per row
    # and one per task.
    inv_n = 1.0 / N.to(dt)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N  # the last row tile is partial
        m = rmask[:, None] & cmask[None, :]
        off = (t * N + rows)[:, None] * K + cols[None, :]
        # Padding loads -inf so it drops out of max and exp; padding rows get max 0 and sum 1
        # so that they stay finite (they are never stored).
        lg = tl.load(logits_ptr + off, mask=m, other=-float("inf"))
        mx = tl.where(rmask, tl.max(lg, axis=1), 0.0)
        z = lg - mx[:, None]
        e = tl.exp(z)
        ssum = tl.where(rmask, tl.sum(e, axis=1), 1.0)
        lse = tl.log(ssum)
        lab = tl.load(y_ptr + t * N + rows, mask=rmask, other=0)
        hot = cols[None, :] == lab[:, None]
        zy = tl.sum(tl.where(hot & m, z, 0.0), axis=1)
        total += tl.where(rmask, lse - zy, 0.0)
        p = e * (1.0 / ssum)[:, None]
        tl.store(prob_ptr + off, p, mask=m)
        g = (p - tl.where(hot, 1.0, 0.0)) * inv_n
        tl.store(grad_ptr + off, g, mask=m)
        if GBIAS:
            gsum += tl.sum(tl.where(m, g.to(dt), 0.0).to(tl.float64), axis=0)
    tl.store(loss_ptr + t, tl.sum(total, axis=0) / N)
    if GBIAS:
        tl.store(gbias_ptr + t * GS + cols, gsum.to(dt), mask=cmask)


@triton.jit(do_not_specialize=("M", "N"))
def _softmax_ce_tangent_kernel(
    prob_ptr,  # [T, N, K] softmax from _softmax_ce_kernel
    rlogits_ptr,  # [T, N, K] logits tangent
    rg_ptr,  # [T, N, K] out: prob (rlogits - <prob, rlogits>) / N
    M,  # T * N rows
    N,  # rows per task (the loss is a mean over them)
    K,  # classes
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= K: a row is held whole
):
    mb = tl.program_id(0).to(tl.int64)  # int64: T * N * K exceeds 2**31 at large T
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    m = (rows < M)[:, None] & (cols < K)[None, :]  # partial last row block; padding classes
    off = rows[:, None] * K + cols[None, :]
    p = tl.load(prob_ptr + off, mask=m, other=0.0)
    rl = tl.load(rlogits_ptr + off, mask=m, other=0.0)
    dot = tl.sum(p * rl, axis=1)
    tl.store(rg_ptr + off, p * (rl - dot[:, None]) / N, mask=m)


def _softmax_blocks(n, K, elsize):
    """-> ``(BLOCK rows, BLOCK_K, num_warps)``."""
    if K > SOFTMAX_MAX_K:
        raise ValueError(f"{K} classes: at most {SOFTMAX_MAX_K} supported (a row is held in one tile)")
    block_k = triton.next_power_of_2(K)
    # At least one warp's 128 elements per tile (rows masked beyond n): every smaller row count
    # shares the one-warp compile instead of one compile per power of two.
    rows = max(triton.next_power_of_2(n), 128 // block_k)
    block_n = max(1, min(SOFTMAX_TILE_BYTES // elsize // block_k, rows))
    # 16 bytes of the tile per thread: 4 float32 or 2 float64 elements (4 float64 elements and
    # their exp/log held one value too many at 2 warps: a 4-byte spill, bench compile --grid).
    return block_n, block_k, max(1, min(SOFTMAX_NUM_WARPS, block_n * block_k * elsize // 512))


def softmax_ce(logits, y, loss, prob, grad, wrap=ident):
    """Mean cross-entropy per task -> writes ``loss [T]``, ``prob``, ``grad [T,N,K]``."""
    _softmax_ce(logits, y, None, loss, prob, grad, wrap)


def softmax_ce_bias(logits, y, gbias, loss, prob, grad, wrap=ident):
    """:func:`softmax_ce` that also writes ``gbias [T, K]`` (rows of any stride): the sum of
    ``grad`` over each task's rows (the gradient of a bias added to the logits)."""
    _softmax_ce(logits, y, gbias, loss, prob, grad, wrap)


def _softmax_ce(logits, y, gbias, loss, prob, grad, wrap):
    T, N, K = logits.shape
    check(logits, (T, N, K), loss=(loss, (T,)), prob=(prob, (T, N, K)), grad=(grad, (T, N, K)))
    if y.dtype != torch.int64 or tuple(y.shape) != (T, N) or not y.is_contiguous():
        raise ValueError(f"y: {y.dtype} {tuple(y.shape)}, expected contiguous int64 {(T, N)}")
    if T == 0 or N * K == 0:
        return
    block_n, block_k, warps = _softmax_blocks(N, K, logits.element_size())
    gs = 0 if gbias is None else (gbias.stride(0) if T > 1 else K)
    if gbias is not None and (tuple(gbias.shape) != (T, K) or (K > 1 and gbias.stride(1) != 1) or gbias.dtype != logits.dtype):
        raise ValueError(f"gbias: {gbias.dtype} {tuple(gbias.shape)}, expected {logits.dtype} {(T, K)} with unit column stride")
    wrap(_softmax_ce_kernel)[(T,)](
        logits, y, loss, prob, grad, grad if gbias is None else gbias, N, K, gs, GBIAS=gbias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )


def softmax_ce_tangent(prob, rlogits, rg, wrap=ident):
    """Tangent of the softmax-CE gradient -> writes ``rg = prob (rlogits - <prob, rlogits>) / N``."""
    T, N, K = prob.shape
    check(prob, (T, N, K), rlogits=(rlogits, (T, N, K)), rg=(rg, (T, N, K)))
    if T * N * K == 0:
        return
    block_m, block_k, warps = _softmax_blocks(T * N, K, prob.element_size())
    wrap(_softmax_ce_tangent_kernel)[(triton.cdiv(T * N, block_m),)](
        prob, rlogits, rg, T * N, N, K, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
    )
