"""Triton kernels of BatchNorm (batch statistics) + ReLU: forward, backward, tangent forward,
tangent backward; private kernels (and their jit helpers), then host launchers.

Formulas: :mod:`imaml_kernels.reference.batchnorm`. Layout: ``[T, R, C]`` row-major and
contiguous (``R = N·H·W`` rows, channels innermost); per-(task, channel) statistics (``rstd``,
``a``) contiguous ``[T, C]``; the parameter-like ``[T, C]`` arrays (``gamma``, ``beta``, their
tangents and gradients) are rows of one row stride ``PS`` (views into a flat ``[T, P]``
parameter buffer are read and written in place).

Work split: a program owns ``BLOCK_C`` channels of one task and a range of ``RPS`` rows (one
row split; ``_tile``, the prologue every kernel shares), walked in ``[BLOCK_R, BLOCK_C]`` tiles
(``_rows``). Every stage is per-channel row sums -> per-channel coefficients -> one
elementwise writing pass: a kernel is its sum job (``_fwd_sum``, ``_bwd_sum``, ``_tfwd_sum``,
``_tbwd_sum``), the coefficients, and its write job (``_fwd_write``, ...), named after the
job functions of the C++ kernels. The sums accumulate per lane over
the tiles and are reduced across the tile once, after the loop. With one split per task
(``PHASE=0``) one launch does all of it. With ``NS > 1`` splits (few tasks, many rows: a
T = 4 MiniImagenet layer has 4 programs otherwise, a T = 32 Omniglot layer 32 on a 132-SM
GPU; see :func:`plan`) a stage is two launches: ``PHASE=1`` writes each split's partials to a
float64 workspace ``[T, NS, K, C]`` (allocated by the launcher on the tensors' device), then
``PHASE=2`` programs (same grid) each re-reduce their task's ``NS`` partials in a fixed order
(every program computes the same bits: deterministic, independent of scheduling, like the CG
partials) and write their rows. The forward's partials are each split's ``(mean, M2)``: within
a split, sums of ``x - k`` shifted by the split's first row ``k`` (one reading pass, no raw sum
of squares to cancel); across splits Chan et al.'s combination ``M2 = Σ M2_s + n_s (mean_s −
mean)²``. The other stages' partials are plain sums.

Accumulation matches the C++ CPU kernels (``csrc/batchnorm_cpu.cpp``): row sums, partials and
the per-channel coefficients are float64 for float32 data too; the coefficients are then
rounded to the data type and the writing pass runs in the data type (as on the CPU). On a
GPU the float64 sums cost conversions and FP64 adds, which the H100's FP64 rate absorbs in
these memory-bound passes.
"""

import torch
import triton
import triton.language as tl

from ._common import check, ident, split_f64
from .conv import gather_cols

# Block sizes, read at launch time (tests shrink them to force several tiles, channel blocks
# and row splits). A tile is BN_TILE_BYTES of data: 2048 float32 / 1024 float64 elements,
# 8 / 4 per thread at 8 warps (one or two 16-byte vectors per input); tbwd, with five float64
# sums per lane, takes half that. The gathering backwards load K*K patch entries per element,
# each at its own address where the channel count is not a multiple of 16 (no vector loads):
# their tiles, per element size, are the largest that compile without spilling at every
# channel block, channel alignment and phase on sm_90a and sm_80 (`python -m bench.compile.sweep`;
# 4096 bytes spilled up to 40 bytes at 140 registers, float32 C = 100, stride 2). Every stage
# then compiles without spilling and within the 128 registers of 8 warps at full occupancy of
# a block's worth, over that sweep and the grid of bench/results/compile.md. Not timed on a
# GPU (none was available).
BN_TILE_BYTES = 8192
BN_TBWD_TILE_BYTES = 4096
BN_GATHER_TILE_BYTES = {4: 1024, 8: 2048}  # element size -> bytes: 256 elements either way
BN_TBWD_GATHER_TILE_BYTES = {4: 2048, 8: 1024}  # 512 float32, 128 float64 (2048 spilled 32 B at float64)
BN_MAX_BLOCK_C = 64  # channels per program: 64 float32 = one 256-byte row segment
BN_NUM_WARPS = 8
# Row splits: a stage whose tasks have at least BN_SPLIT_MIN_R rows is split into enough
# programs to fill the GPU (4 per SM of an H100's 132: at T = 32 the 980-row first Omniglot
# layer runs 544 programs, not 32), in splits of at least BN_MIN_SPLIT_ROWS rows and at most
# BN_MAX_SPLITS of them (each PHASE=2 program re-reads its task's NS partials). Smaller layers
# (Omniglot's 245, 80 and 20 rows at T = 32) stay one launch: a second launch would cost more
# than the few row tiles per program it saves, and launches per meta-step are budgeted.
BN_TARGET_PROGRAMS = 4 * 132
BN_MIN_PROGRAMS = 2 * 132  # below this a launch narrows its channel blocks, then splits its rows
BN_MIN_BLOCK_BYTES = 16  # the narrowest channel block: one 16-byte vector per row
BN_SPLIT_MIN_R = 512
BN_MIN_SPLIT_ROWS = 24
BN_MAX_SPLITS = 128
BN_SPLIT_BLOCK = 32  # partials reduced per step in PHASE=2
# Row counts and the gathering stages' image geometry need no specialisation (C, the row
# stride, carries the alignment): one compile per block configuration instead of one per
# divisibility of R, RPS and NS, or per image size (a 1 x 1 last layer made Wo = 1 a constexpr).
_NO_SPEC = ("R", "PS", "RPS", "NS", "H", "W", "Ho", "Wo", "ph", "pw")


@triton.jit
def _splits(s0, t, k, NS, K: tl.constexpr, C, cols, cmask, BLOCK_S: tl.constexpr):
    """Partials ``k`` of the row splits ``s0 + [0, BLOCK_S)`` of task ``t`` in the workspace
    ``[T, NS, K, C]`` -> ``(splits, mask, offsets)``."""
    j = s0 + tl.arange(0, BLOCK_S)
    m = (j < NS)[:, None] & cmask[None, :]
    return j, m, ((t * NS + j) * K + k)[:, None] * C + cols[None, :]


@triton.jit
def _ws_sum(ws_ptr, t, k, NS, K: tl.constexpr, C, cols, cmask, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ_s ws[t, s, k, cols] over the NS row splits, in a fixed order (float64)."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    for s0 in range(0, NS, BLOCK_S):
        j, m, off = _splits(s0, t, k, NS, K, C, cols, cmask, BLOCK_S)
        acc += tl.sum(tl.load(ws_ptr + off, mask=m, other=0.0), axis=0)
    return acc


@triton.jit
def _inv(n):
    """1 / n in float64 ([1]-shaped, broadcasts): one division per program, products after
    (a float64 division is a subroutine call on the GPU)."""
    return 1.0 / (tl.zeros([1], dtype=tl.float64) + n)


@triton.jit
def _ws_store(ws_ptr, t, s, NS, k, K: tl.constexpr, C, cols, cmask, v):
    tl.store(ws_ptr + ((t * NS + s) * K + k) * C + cols, v, mask=cmask)


# --------------------------------------------------------------------------- the shared tile logic
# Named after the job functions of csrc/batchnorm_cpu.cpp: a stage is its sum job (row sums per
# channel; with row splits PHASE 1 stores them per split and PHASE 2 re-reduces them), the
# finalisation (per-channel coefficients, in the kernel's body) and its write job.


@triton.jit
def _tile(R, C, RPS, BLOCK_C: tl.constexpr):
    """The program's share of a ``[T, R, C]`` stage -> ``(t, s, cols, cmask, r_lo, r_hi, base)``:
    task ``t``, row split ``s`` owning rows ``[r_lo, r_hi)``, channels ``cols`` (``cmask``: the
    last channel block is partial) and the task's first element ``base = t R C``. ``t`` is
    int64 (``T R C`` exceeds 2**31 at large T); ``R C`` and ``R + BLOCK_R`` are below 2**31
    (the launcher checks), so in-task offsets and row indices stay int32."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(2)
    cmask = cols < C
    r_lo = s * RPS
    r_hi = r_lo + tl.minimum(R - r_lo, RPS)  # not min(R, r_lo + RPS): that sum may pass 2**31
    return t, s, cols, cmask, r_lo, r_hi, t * R * C


@triton.jit
def _rows(r0, r_hi, C, cols, cmask, BLOCK_R: tl.constexpr):
    """The ``[BLOCK_R, BLOCK_C]`` tile at row ``r0`` -> ``(rows, mask, in-task offsets)`` (the
    last tile of a split is partial)."""
    rows = r0 + tl.arange(0, BLOCK_R)
    m = (rows < r_hi)[:, None] & cmask[None, :]
    return rows, m, rows[:, None] * C + cols[None, :]


@triton.jit
def _cotangent(g_ptr, off, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw,
               GATHER: tl.constexpr, K: tl.constexpr, S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tile of an output cotangent: loaded (``g_ptr`` at the task's rows) or, ``GATHER``,
    gathered from the patch cotangent ``g_ptr`` of the convolution the BatchNorm feeds (the
    col2im fused into the loads; :func:`~imaml_kernels.triton.conv.gather_cols`)."""
    if GATHER:
        g = gather_cols(g_ptr, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw, K, S, BLOCK_R, BLOCK_C)
    else:
        g = tl.load(g_ptr + off, mask=m, other=0.0)
    return g


# --------------------------------------------------------------------------- forward


@triton.jit
def _fwd_sum(x_ptr, r_lo, r_hi, C, cols, cmask, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The split's per-channel ``(mean, M2)`` (float64): the C++ ``fwd_sum_job`` and
    ``fwd_sq_job`` in one reading pass, by sums of ``d = x - k`` shifted by the split's first
    row ``k`` (a sample, so ``mean - k`` is of the order of the spread: the float64 sums lose
    no digits worth having), accumulated per lane and reduced once."""
    k = tl.load(x_ptr + r_lo * C + cols, mask=cmask, other=0.0).to(tl.float64)
    sd = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    sdd = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows, m, off = _rows(r0, r_hi, C, cols, cmask, BLOCK_R)
        v = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float64)
        d = tl.where(m, v - k[None, :], 0.0)
        sd += d
        sdd += d * d
    inv_n = _inv(r_hi - r_lo)
    s1 = tl.sum(sd, axis=0)
    mean = k + s1 * inv_n
    m2 = tl.sum(sdd, axis=0) - s1 * (s1 * inv_n)
    # Clamp the rounding's negative M2 to 0 but keep NaN: tl.maximum compiles to max.f64, which
    # returns 0 for NaN (the interpreter's np.maximum keeps it), and would make rstd finite
    # here but not in the split combine (_fwd_combine), so results would depend on the plan.
    return mean, tl.where(m2 < 0.0, 0.0, m2)


@triton.jit
def _fwd_combine(ws_ptr, t, R, RPS, NS, C, cols, cmask, inv_r, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The task's ``(mean, M2)`` from its ``NS`` splits' partials (``PHASE 2``), in a fixed
    order: ``mean = Σ n_s mean_s / R``, ``M2 = Σ M2_s + n_s (mean_s - mean)²``."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    for s0 in range(0, NS, BLOCK_S):
        j, m, off = _splits(s0, t, 0, NS, 2, C, cols, cmask, BLOCK_S)
        n_j = tl.maximum(tl.minimum(R - j * RPS, RPS), 0).to(tl.float64)  # the splits' rows
        acc += tl.sum(n_j[:, None] * tl.load(ws_ptr + off, mask=m, other=0.0), axis=0)
    mean = acc * inv_r
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for s0 in range(0, NS, BLOCK_S):
        j, m, off = _splits(s0, t, 0, NS, 2, C, cols, cmask, BLOCK_S)
        n_j = tl.maximum(tl.minimum(R - j * RPS, RPS), 0).to(tl.float64)
        d = tl.load(ws_ptr + off, mask=m, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.load(ws_ptr + off + C, mask=m, other=0.0) + n_j[:, None] * tl.where(m, d * d, 0.0), axis=0)
    return mean, m2


@triton.jit
def _fwd_write(x_ptr, y_ptr, xhat_ptr, r_lo, r_hi, C, cols, cmask, mu, rs, gam, bet,
               RELU: tl.constexpr, BLOCK_R: tl.constexpr):
    """``xhat = (x - mu) rs``, ``y = relu?(gam xhat + bet)`` over the split's rows, in the data
    type (``fwd_write_job``)."""
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows, m, off = _rows(r0, r_hi, C, cols, cmask, BLOCK_R)
        xh = (tl.load(x_ptr + off, mask=m, other=0.0) - mu) * rs
        y = xh * gam + bet
        if RELU:
            y = tl.where(y > 0.0, y, y * 0.0)  # max(y, 0) that keeps NaN, as torch.relu
        tl.store(xhat_ptr + off, xh, mask=m)
        tl.store(y_ptr + off, y, mask=m)


@triton.jit(do_not_specialize=_NO_SPEC)
def _bn_fwd_kernel(
    x_ptr,  # [T, R, C] input
    gamma_ptr,  # [T, C] scale
    beta_ptr,  # [T, C] shift
    y_ptr,  # [T, R, C] out: relu?(gamma xhat + beta)
    xhat_ptr,  # [T, R, C] out: (x - mean) rstd
    rstd_ptr,  # [T, C] out: 1 / sqrt(var + eps)
    ws_ptr,  # [T, NS, 2, C] float64 partials (mean, M2) per split (PHASE 1 writes, 2 reads)
    R,  # rows per task
    C,  # channels
    PS,  # row stride of the parameter-like [T, C] arrays (gamma, beta and their (co)tangents)
    RPS,  # rows per split (R when PHASE = 0)
    NS,  # splits per task (1 when PHASE = 0)
    inv_r: tl.float64,  # 1 / R, from the host (a float64 division is a subroutine call on the GPU)
    eps_hi,  # eps = eps_hi + eps_lo, both fp32-exact (see _common)
    eps_lo,  # see eps_hi
    RELU: tl.constexpr,  # apply max(., 0) to y
    PHASE: tl.constexpr,  # 0: all in one; 1: partials only; 2: combine partials, write
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,  # partials per combining step (PHASE 2)
):
    t, s, cols, cmask, r_lo, r_hi, base = _tile(R, C, RPS, BLOCK_C)
    x_ptr += base
    dt = x_ptr.dtype.element_ty
    if PHASE != 2:
        mean, m2 = _fwd_sum(x_ptr, r_lo, r_hi, C, cols, cmask, BLOCK_R, BLOCK_C)
        if PHASE == 1:
            _ws_store(ws_ptr, t, s, NS, 0, 2, C, cols, cmask, mean)
            _ws_store(ws_ptr, t, s, NS, 1, 2, C, cols, cmask, m2)
    else:
        mean, m2 = _fwd_combine(ws_ptr, t, R, RPS, NS, C, cols, cmask, inv_r, BLOCK_S, BLOCK_C)

    if PHASE != 1:
        eps = (tl.zeros([BLOCK_C], dtype=tl.float64) + eps_hi) + eps_lo  # exact: two fp32 halves
        r64 = 1.0 / tl.sqrt(m2 * inv_r + eps)  # biased variance; no rsqrt (absent in the interpreter)
        tc = t * C + cols  # rstd, a
        tp = t * PS + cols  # parameter-like
        tl.store(rstd_ptr + tc, r64.to(dt), mask=cmask & (s == 0))
        mu = mean.to(dt)[None, :]
        rs = r64.to(dt)[None, :]
        gam = tl.load(gamma_ptr + tp, mask=cmask, other=0.0)[None, :]
        bet = tl.load(beta_ptr + tp, mask=cmask, other=0.0)[None, :]
        _fwd_write(x_ptr, y_ptr + base, xhat_ptr + base, r_lo, r_hi, C, cols, cmask, mu, rs, gam, bet, RELU, BLOCK_R)


# --------------------------------------------------------------------------- backward


@triton.jit
def _bwd_load(gy_ptr, relu_ptr, off, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw, RELU: tl.constexpr,
              GATHER: tl.constexpr, K: tl.constexpr, S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tile of the cotangent ``g``, gated by ``relu > 0`` when ``RELU`` (the C++ ``gate``)."""
    g = _cotangent(gy_ptr, off, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw, GATHER, K, S, BLOCK_R, BLOCK_C)
    if RELU:
        g = tl.where(tl.load(relu_ptr + off, mask=m, other=0.0) > 0.0, g, 0.0)
    return g


@triton.jit
def _bwd_sum(gy_ptr, xhat_ptr, relu_ptr, t, r_lo, r_hi, R, C, cols, cmask, H, W, Ho, Wo, ph, pw,
             RELU: tl.constexpr, GATHER: tl.constexpr, K: tl.constexpr, S: tl.constexpr,
             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(Σ g, Σ g xhat)`` over the split's rows, ``g`` the (gated) cotangent: float64, per lane,
    reduced once (``bwd_sum_job``)."""
    ag = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    agx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows, m, off = _rows(r0, r_hi, C, cols, cmask, BLOCK_R)
        g = _bwd_load(gy_ptr, relu_ptr, off, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw, RELU, GATHER, K, S,
                      BLOCK_R, BLOCK_C).to(tl.float64)
        ag += g
        agx += g * tl.load(xhat_ptr + off, mask=m, other=0.0).to(tl.float64)
    return tl.sum(ag, axis=0), tl.sum(agx, axis=0)


@triton.jit
def _bwd_write(gy_ptr, xhat_ptr, relu_ptr, gx_ptr, t, r_lo, r_hi, R, C, cols, cmask, H, W, Ho, Wo, ph, pw,
               mg, mgx, coef, RELU: tl.constexpr, GATHER: tl.constexpr, K: tl.constexpr, S: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``gx = coef ((g - mg) - xhat mgx)`` over the split's rows, in the data type (``bwd_write_job``)."""
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows, m, off = _rows(r0, r_hi, C, cols, cmask, BLOCK_R)
        g = _bwd_load(gy_ptr, relu_ptr, off, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw, RELU, GATHER, K, S,
                      BLOCK_R, BLOCK_C)
        xh = tl.load(xhat_ptr + off, mask=m, other=0.0)
        tl.store(gx_ptr + off, coef * ((g - mg) - xh * mgx), mask=m)


@triton.jit(do_not_specialize=_NO_SPEC)
def _bn_bwd_kernel(
    gy_ptr,  # [T, R, C] output cotangent; GATHER: the next conv's patch cotangent [T, N, Ho, Wo, K, K, C]
    xhat_ptr,  # [T, R, C] from _bn_fwd_kernel
    rstd_ptr,  # [T, C] from _bn_fwd_kernel
    gamma_ptr,  # [T, C] scale
    relu_ptr,  # [T, R, C] ReLU output gating gy (read only when RELU)
    gx_ptr,  # [T, R, C] out: input cotangent
    ggamma_ptr,  # [T, C] out: sum g xhat
    gbeta_ptr,  # [T, C] out: sum g
    ws_ptr,  # [T, NS, 2, C] float64 partial sums (g, g xhat) per split
    R,  # rows per task
    C,  # channels
    PS,  # row stride of the parameter-like [T, C] arrays (gamma, beta and their (co)tangents)
    RPS,  # rows per split
    NS,  # splits per task
    inv_r: tl.float64,  # 1 / R (see _bn_fwd_kernel)
    H,  # GATHER: the image height and width (R = N H W), the patch grid Ho x Wo and the
    W,  # top / left padding of the convolution whose patch cotangent is gathered
    Ho,
    Wo,
    ph,
    pw,
    RELU: tl.constexpr,  # gate gy by relu > 0
    GATHER: tl.constexpr,  # gy is gathered from a patch cotangent (col2im fused into the loads)
    K: tl.constexpr,  # GATHER: kernel size
    S: tl.constexpr,  # GATHER: stride
    PHASE: tl.constexpr,  # as in _bn_fwd_kernel
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    t, s, cols, cmask, r_lo, r_hi, base = _tile(R, C, RPS, BLOCK_C)
    if not GATHER:
        gy_ptr += base
    xhat_ptr += base
    relu_ptr += base
    dt = gy_ptr.dtype.element_ty
    if PHASE != 2:
        sg, sgx = _bwd_sum(gy_ptr, xhat_ptr, relu_ptr, t, r_lo, r_hi, R, C, cols, cmask, H, W, Ho, Wo, ph, pw,
                           RELU, GATHER, K, S, BLOCK_R, BLOCK_C)
        if PHASE == 1:
            _ws_store(ws_ptr, t, s, NS, 0, 2, C, cols, cmask, sg)
            _ws_store(ws_ptr, t, s, NS, 1, 2, C, cols, cmask, sgx)
    else:
        sg = _ws_sum(ws_ptr, t, 0, NS, 2, C, cols, cmask, BLOCK_S, BLOCK_C)
        sgx = _ws_sum(ws_ptr, t, 1, NS, 2, C, cols, cmask, BLOCK_S, BLOCK_C)

    if PHASE != 1:
        # gx = rstd gamma ((g - mean(g)) - xhat mean(g xhat)), coefficients as on the CPU.
        tc = t * C + cols  # rstd, a
        tp = t * PS + cols  # parameter-like
        first = cmask & (s == 0)
        tl.store(ggamma_ptr + tp, sgx.to(dt), mask=first)
        tl.store(gbeta_ptr + tp, sg.to(dt), mask=first)
        r = tl.load(rstd_ptr + tc, mask=cmask, other=0.0).to(tl.float64)
        gam = tl.load(gamma_ptr + tp, mask=cmask, other=0.0).to(tl.float64)
        mg = (sg * inv_r).to(dt)[None, :]
        mgx = (sgx * inv_r).to(dt)[None, :]
        coef = (r * gam).to(dt)[None, :]
        _bwd_write(gy_ptr, xhat_ptr, relu_ptr, gx_ptr + base, t, r_lo, r_hi, R, C, cols, cmask, H, W, Ho, Wo, ph, pw,
                   mg, mgx, coef, RELU, GATHER, K, S, BLOCK_R, BLOCK_C)


# --------------------------------------------------------------------------- tangent forward


@triton.jit
def _tfwd_sum(rx_ptr, xhat_ptr, r_lo, r_hi, C, cols, cmask, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(Σ rx, Σ xhat rx)`` over the split's rows: float64, per lane, reduced once (``tfwd_sum_job``)."""
    arx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    axr = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows, m, off = _rows(r0, r_hi, C, cols, cmask, BLOCK_R)
        rx = tl.load(rx_ptr + off, mask=m, other=0.0).to(tl.float64)
        arx += rx
        axr += rx * tl.load(xhat_ptr + off, mask=m, other=0.0).to(tl.float64)
    return tl.sum(arx, axis=0), tl.sum(axr, axis=0)


@triton.jit
def _tfwd_write(rx_ptr, xhat_ptr, relu_ptr, ry_ptr, rxhat_ptr, r_lo, r_hi, C, cols, cmask, mrx, a, r, gam, rgam, rbet,
                RELU: tl.constexpr, BLOCK_R: tl.constexpr):
    """``rxhat = r ((rx - mrx) - xhat a)``, ``ry = gate(rgam xhat + gam rxhat + rbet)`` over the
    split's rows, in the data type (``tfwd_write_job``)."""
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows, m, off = _rows(r0, r_hi, C, cols, cmask, BLOCK_R)
        xh = tl.load(xhat_ptr + off, mask=m, other=0.0)
        rxh = r * ((tl.load(rx_ptr + off, mask=m, other=0.0) - mrx) - xh * a)
        ry = rgam * xh + gam * rxh + rbet
        if RELU:
            ry = tl.where(tl.load(relu_ptr + off, mask=m, other=0.0) > 0.0, ry, 0.0)
        tl.store(rxhat_ptr + off, rxh, mask=m)
        tl.store(ry_ptr + off, ry, mask=m)


@triton.jit(do_not_specialize=_NO_SPEC)
def _bn_tfwd_kernel(
    rx_ptr,  # [T, R, C] input tangent
    xhat_ptr,  # [T, R, C] from _bn_fwd_kernel
    rstd_ptr,  # [T, C] from _bn_fwd_kernel
    gamma_ptr,  # [T, C] scale
    rgamma_ptr,  # [T, C] scale tangent
    rbeta_ptr,  # [T, C] shift tangent
    relu_ptr,  # [T, R, C] ReLU output gating ry (read only when RELU)
    ry_ptr,  # [T, R, C] out: output tangent
    rxhat_ptr,  # [T, R, C] out: tangent of xhat
    a_ptr,  # [T, C] out: mean(xhat rx)
    ws_ptr,  # [T, NS, 2, C] float64 partial sums (rx, xhat rx) per split
    R,  # rows per task
    C,  # channels
    PS,  # row stride of the parameter-like [T, C] arrays (gamma, beta and their (co)tangents)
    RPS,  # rows per split
    NS,  # splits per task
    inv_r: tl.float64,  # 1 / R (see _bn_fwd_kernel)
    RELU: tl.constexpr,  # gate ry by relu > 0
    PHASE: tl.constexpr,  # as in _bn_fwd_kernel
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    t, s, cols, cmask, r_lo, r_hi, base = _tile(R, C, RPS, BLOCK_C)
    rx_ptr += base
    xhat_ptr += base
    dt = rx_ptr.dtype.element_ty
    if PHASE != 2:
        srx, sxr = _tfwd_sum(rx_ptr, xhat_ptr, r_lo, r_hi, C, cols, cmask, BLOCK_R, BLOCK_C)
        if PHASE == 1:
            _ws_store(ws_ptr, t, s, NS, 0, 2, C, cols, cmask, srx)
            _ws_store(ws_ptr, t, s, NS, 1, 2, C, cols, cmask, sxr)
    else:
        srx = _ws_sum(ws_ptr, t, 0, NS, 2, C, cols, cmask, BLOCK_S, BLOCK_C)
        sxr = _ws_sum(ws_ptr, t, 1, NS, 2, C, cols, cmask, BLOCK_S, BLOCK_C)

    if PHASE != 1:
        # rxhat = rstd ((rx - mean(rx)) - xhat a), ry = gate(rgamma xhat + gamma rxhat + rbeta).
        tc = t * C + cols  # rstd, a
        tp = t * PS + cols  # parameter-like
        a = (sxr * inv_r).to(dt)
        tl.store(a_ptr + tc, a, mask=cmask & (s == 0))
        mrx = (srx * inv_r).to(dt)[None, :]
        r = tl.load(rstd_ptr + tc, mask=cmask, other=0.0)[None, :]
        gam = tl.load(gamma_ptr + tp, mask=cmask, other=0.0)[None, :]
        rgam = tl.load(rgamma_ptr + tp, mask=cmask, other=0.0)[None, :]
        rbet = tl.load(rbeta_ptr + tp, mask=cmask, other=0.0)[None, :]
        _tfwd_write(rx_ptr, xhat_ptr, relu_ptr + base, ry_ptr + base, rxhat_ptr + base, r_lo, r_hi, C, cols, cmask,
                    mrx, a[None, :], r, gam, rgam, rbet, RELU, BLOCK_R)


# --------------------------------------------------------------------------- tangent backward


@triton.jit
def _tbwd_load(gy_ptr, rgy_ptr, relu_ptr, off, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw, RELU: tl.constexpr,
               GATHER: tl.constexpr, K: tl.constexpr, S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tiles of the cotangent ``g`` and its tangent ``rg`` (the one gathered when ``GATHER``),
    both gated by one load of ``relu > 0`` when ``RELU``."""
    g = tl.load(gy_ptr + off, mask=m, other=0.0)
    rg = _cotangent(rgy_ptr, off, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw, GATHER, K, S, BLOCK_R, BLOCK_C)
    if RELU:
        on = tl.load(relu_ptr + off, mask=m, other=0.0) > 0.0
        g = tl.where(on, g, 0.0)
        rg = tl.where(on, rg, 0.0)
    return g, rg


@triton.jit
def _tbwd_sum(gy_ptr, rgy_ptr, xhat_ptr, rxhat_ptr, relu_ptr, t, r_lo, r_hi, R, C, cols, cmask, H, W, Ho, Wo, ph, pw,
              RELU: tl.constexpr, GATHER: tl.constexpr, K: tl.constexpr, S: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The five per-channel sums every mean of the formula is made of, over the split's rows:
    ``(Σ g, Σ g xhat, Σ rg, Σ rg xhat, Σ g rxhat)`` (``g``, ``rg``: the gated cotangent and its
    tangent), float64, per lane, reduced once (``tbwd_sum_job``)."""
    ag = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)  # sum g
    agx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)  # sum g xhat
    arg = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)  # sum rg
    argx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)  # sum rg xhat
    agrx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float64)  # sum g rxhat
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows, m, off = _rows(r0, r_hi, C, cols, cmask, BLOCK_R)
        g, rg = _tbwd_load(gy_ptr, rgy_ptr, relu_ptr, off, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw, RELU, GATHER,
                           K, S, BLOCK_R, BLOCK_C)
        g = g.to(tl.float64)
        rg = rg.to(tl.float64)
        xh = tl.load(xhat_ptr + off, mask=m, other=0.0).to(tl.float64)
        rxh = tl.load(rxhat_ptr + off, mask=m, other=0.0).to(tl.float64)
        ag += g
        agx += g * xh
        arg += rg
        argx += rg * xh
        agrx += g * rxh
    return tl.sum(ag, axis=0), tl.sum(agx, axis=0), tl.sum(arg, axis=0), tl.sum(argx, axis=0), tl.sum(agrx, axis=0)


@triton.jit
def _tbwd_write(gy_ptr, rgy_ptr, xhat_ptr, rxhat_ptr, relu_ptr, rgx_ptr, t, r_lo, r_hi, R, C, cols, cmask,
                H, W, Ho, Wo, ph, pw, mg, mrg, cg, crg, crh, ch, RELU: tl.constexpr, GATHER: tl.constexpr,
                K: tl.constexpr, S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``rgx = cg (g - mg) + crg (rg - mrg) + crh rxhat + ch xhat`` over the split's rows, in the
    data type (``tbwd_write_job``)."""
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows, m, off = _rows(r0, r_hi, C, cols, cmask, BLOCK_R)
        g, rg = _tbwd_load(gy_ptr, rgy_ptr, relu_ptr, off, t, rows, cols, m, R, C, H, W, Ho, Wo, ph, pw, RELU, GATHER,
                           K, S, BLOCK_R, BLOCK_C)
        xh = tl.load(xhat_ptr + off, mask=m, other=0.0)
        rxh = tl.load(rxhat_ptr + off, mask=m, other=0.0)
        rgx = cg * (g - mg) + crg * (rg - mrg) + crh * rxh + ch * xh
        tl.store(rgx_ptr + off, rgx, mask=m)


@triton.jit(do_not_specialize=_NO_SPEC)
def _bn_tbwd_kernel(
    gy_ptr,  # [T, R, C] output cotangent
    rgy_ptr,  # [T, R, C] tangent of the output cotangent; GATHER: its patch form [T, N, Ho, Wo, K, K, C]
    xhat_ptr,  # [T, R, C] from _bn_fwd_kernel
    rxhat_ptr,  # [T, R, C] from _bn_tfwd_kernel
    rstd_ptr,  # [T, C] from _bn_fwd_kernel
    a_ptr,  # [T, C] from _bn_tfwd_kernel: mean(xhat rx)
    gamma_ptr,  # [T, C] scale
    rgamma_ptr,  # [T, C] scale tangent
    relu_ptr,  # [T, R, C] ReLU output gating gy and rgy (read only when RELU)
    rgx_ptr,  # [T, R, C] out: tangent of the input cotangent
    rggamma_ptr,  # [T, C] out: sum(rg xhat + g rxhat)
    rgbeta_ptr,  # [T, C] out: sum rg
    ws_ptr,  # [T, NS, 5, C] float64 partial sums (g, g xhat, rg, rg xhat, g rxhat) per split
    R,  # rows per task
    C,  # channels
    PS,  # row stride of the parameter-like [T, C] arrays (gamma, beta and their (co)tangents)
    RPS,  # rows per split
    NS,  # splits per task
    inv_r: tl.float64,  # 1 / R (see _bn_fwd_kernel)
    H,  # GATHER: as in _bn_bwd_kernel, for rgy
    W,
    Ho,
    Wo,
    ph,
    pw,
    RELU: tl.constexpr,  # gate gy, rgy by relu > 0
    GATHER: tl.constexpr,  # rgy is gathered from the next conv's patch cotangent tangent
    K: tl.constexpr,
    S: tl.constexpr,
    PHASE: tl.constexpr,  # as in _bn_fwd_kernel
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    t, s, cols, cmask, r_lo, r_hi, base = _tile(R, C, RPS, BLOCK_C)
    gy_ptr += base
    if not GATHER:
        rgy_ptr += base
    xhat_ptr += base
    rxhat_ptr += base
    relu_ptr += base
    dt = gy_ptr.dtype.element_ty
    if PHASE != 2:
        sg, sgx, srg, srgx, sgrx = _tbwd_sum(gy_ptr, rgy_ptr, xhat_ptr, rxhat_ptr, relu_ptr, t, r_lo, r_hi, R, C, cols,
                                             cmask, H, W, Ho, Wo, ph, pw, RELU, GATHER, K, S, BLOCK_R, BLOCK_C)
        if PHASE == 1:
            _ws_store(ws_ptr, t, s, NS, 0, 5, C, cols, cmask, sg)
            _ws_store(ws_ptr, t, s, NS, 1, 5, C, cols, cmask, sgx)
            _ws_store(ws_ptr, t, s, NS, 2, 5, C, cols, cmask, srg)
            _ws_store(ws_ptr, t, s, NS, 3, 5, C, cols, cmask, srgx)
            _ws_store(ws_ptr, t, s, NS, 4, 5, C, cols, cmask, sgrx)
    else:
        sg = _ws_sum(ws_ptr, t, 0, NS, 5, C, cols, cmask, BLOCK_S, BLOCK_C)
        sgx = _ws_sum(ws_ptr, t, 1, NS, 5, C, cols, cmask, BLOCK_S, BLOCK_C)
        srg = _ws_sum(ws_ptr, t, 2, NS, 5, C, cols, cmask, BLOCK_S, BLOCK_C)
        srgx = _ws_sum(ws_ptr, t, 3, NS, 5, C, cols, cmask, BLOCK_S, BLOCK_C)
        sgrx = _ws_sum(ws_ptr, t, 4, NS, 5, C, cols, cmask, BLOCK_S, BLOCK_C)

    if PHASE != 1:
        # rgx = r [(rgam - r a gam)(g - mg) + gam (rg - mrg) - rxhat m2 + xhat (r a m2 - dm2)],
        # m2 = gam mean(g xhat), dm2 = gam mean(rg xhat) + rgam mean(g xhat) + gam mean(g rxhat)
        # (the CPU kernel's coefficients).
        tc = t * C + cols  # rstd, a
        tp = t * PS + cols  # parameter-like
        first = cmask & (s == 0)
        tl.store(rggamma_ptr + tp, (srgx + sgrx).to(dt), mask=first)
        tl.store(rgbeta_ptr + tp, srg.to(dt), mask=first)
        r = tl.load(rstd_ptr + tc, mask=cmask, other=0.0).to(tl.float64)
        a = tl.load(a_ptr + tc, mask=cmask, other=0.0).to(tl.float64)
        gam = tl.load(gamma_ptr + tp, mask=cmask, other=0.0).to(tl.float64)
        rgam = tl.load(rgamma_ptr + tp, mask=cmask, other=0.0).to(tl.float64)
        m2 = gam * sgx * inv_r
        dm2 = (gam * (srgx + sgrx) + rgam * sgx) * inv_r
        mg = (sg * inv_r).to(dt)[None, :]
        mrg = (srg * inv_r).to(dt)[None, :]
        cg = (r * (rgam - r * a * gam)).to(dt)[None, :]
        crg = (r * gam).to(dt)[None, :]
        crh = (-r * m2).to(dt)[None, :]
        ch = (r * (r * a * m2 - dm2)).to(dt)[None, :]
        _tbwd_write(gy_ptr, rgy_ptr, xhat_ptr, rxhat_ptr, relu_ptr, rgx_ptr + base, t, r_lo, r_hi, R, C, cols, cmask,
                    H, W, Ho, Wo, ph, pw, mg, mrg, cg, crg, crh, ch, RELU, GATHER, K, S, BLOCK_R, BLOCK_C)


# --------------------------------------------------------------------------- host launchers


def plan(T, R, C, elsize, tile_bytes=None):
    """Block sizes and row splits of a ``[T, R, C]`` stage ->
    ``(BLOCK_R, BLOCK_C, channel blocks, rows per split, splits)``.

    Programs first come from narrower channel blocks (down to 16-byte row segments), which
    costs no launch: at T = 32 and 64 channels every Omniglot layer runs 512 programs in one
    launch. Only when that still leaves fewer than ``BN_MIN_PROGRAMS`` (2 per SM) are the rows
    split (two launches; e.g. MiniImagenet at T = 4), aiming at ``BN_TARGET_PROGRAMS``."""
    block_c = min(triton.next_power_of_2(max(C, 1)), BN_MAX_BLOCK_C)
    min_c = max(1, BN_MIN_BLOCK_BYTES // elsize)
    while block_c > min_c and T * triton.cdiv(C, block_c) < BN_MIN_PROGRAMS:
        block_c //= 2
    cb = triton.cdiv(C, block_c)
    tile_rows = max(1, (tile_bytes or BN_TILE_BYTES) // elsize // block_c)
    ns = 1
    if R >= BN_SPLIT_MIN_R and T * cb < BN_MIN_PROGRAMS:
        ns = max(1, min(triton.cdiv(BN_TARGET_PROGRAMS, T * cb), R // max(BN_MIN_SPLIT_ROWS, 1), BN_MAX_SPLITS))
    rps = triton.cdiv(R, ns)
    ns = triton.cdiv(R, rps)
    # The whole tile whatever the rows: a short split leaves rows masked (no memory traffic;
    # a program's one pass is as long either way), and every row count shares one compile.
    return tile_rows, block_c, cb, rps, ns


def _bn_setup(x, **tensors):
    """Checks a BatchNorm stage's tensors (kinds: ``full`` ``[T,R,C]``, ``stat`` contiguous
    ``[T,C]``, ``param`` ``[T,C]`` rows of one shared row stride); -> ``(T, R, C, ps)``."""
    T, R, C = x.shape
    full, stat = (T, R, C), (T, C)
    params = {k: v for k, (v, kind) in tensors.items() if kind == "param"}
    check(x, full, x=(x, full), **{k: (v, full if kind == "full" else stat) for k, (v, kind) in tensors.items() if kind != "param"})
    ps = param_stride(x, params)
    return T, R, C, ps


def param_stride(x, params):
    """The one row stride of the ``[T, C]`` parameter-like arrays (views into ``[T, P]``
    buffers allowed: unit channel stride, rows ``ps >= C`` apart); ``C`` for contiguous ones."""
    T, _, C = x.shape
    strides = set()
    for name, t in params.items():
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name}: {t.dtype} on {t.device}, expected {x.dtype} on {x.device}")
        if tuple(t.shape) != (T, C):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {(T, C)}")
        if C > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along the channels")
        if T > 1:
            strides.add(t.stride(0))
    if len(strides) > 1:
        raise ValueError(f"the [T, C] parameter-like arrays must share one row stride, got {sorted(strides)}")
    ps = strides.pop() if strides else C
    if ps < C:
        raise ValueError(f"parameter row stride {ps} is below C = {C}")
    return ps


def _launch(kernel, wrap, x, ps, nsums, tensors, scalars, constexprs, tile_bytes=None):
    """One launch (no split) or the PHASE 1 + PHASE 2 pair of a stage over ``x [T, R, C]``;
    ``ps``: the parameter-like arrays' row stride."""
    T, R, C = x.shape
    block_r, block_c, cb, rps, ns = plan(T, R, C, x.element_size(), tile_bytes)
    # In-task offsets and row indices are int32: R C elements, and the last tile's rows reach
    # R + BLOCK_R - 2 (a wrapped row index would be negative and pass the rows < r_hi mask).
    if R * C >= 2**31 or R + block_r >= 2**31:
        raise ValueError(f"R = {R} rows x C = {C} channels per task is beyond the kernels' int32 in-task offsets")
    # BLOCK_S is fixed (masked): one compile serves every split count.
    meta = dict(constexprs, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_S=BN_SPLIT_BLOCK, num_warps=BN_NUM_WARPS)
    if ns == 1:
        # The workspace is never touched: any pointer will do, and nothing is allocated.
        wrap(kernel)[(T, cb, 1)](*tensors, x, R, C, ps, R, 1, 1.0 / R, *scalars, PHASE=0, **meta)
        return
    ws = torch.empty((T, ns, nsums, C), dtype=torch.float64, device=x.device)
    for phase in (1, 2):
        wrap(kernel)[(T, cb, ns)](*tensors, ws, R, C, ps, rps, ns, 1.0 / R, *scalars, PHASE=phase, **meta)


def bn_fwd(x, gamma, beta, eps: float, relu: bool, y, xhat, rstd, wrap=ident):
    """BatchNorm forward with batch statistics -> writes ``y``, ``xhat [T,R,C]``, ``rstd [T,C]``."""
    T, R, C, ps = _bn_setup(
        x, gamma=(gamma, "param"), beta=(beta, "param"), y=(y, "full"), xhat=(xhat, "full"), rstd=(rstd, "stat")
    )
    if T * R * C == 0:
        return
    _launch(_bn_fwd_kernel, wrap, x, ps, 2, (x, gamma, beta, y, xhat, rstd), split_f64(eps), dict(RELU=bool(relu)))


def bn_bwd(gy, xhat, rstd, gamma, relu_y, ggamma, gbeta, gx, wrap=ident):
    """Backward of :func:`bn_fwd` -> writes ``ggamma``, ``gbeta [T,C]`` and ``gx [T,R,C]``."""
    extra = {} if relu_y is None else {"relu_y": (relu_y, "full")}
    T, R, C, ps = _bn_setup(
        gy, xhat=(xhat, "full"), rstd=(rstd, "stat"), gamma=(gamma, "param"), gx=(gx, "full"),
        ggamma=(ggamma, "param"), gbeta=(gbeta, "param"), **extra,
    )
    if T * R * C == 0:
        return
    # Without a ReLU the gate pointer is never read; any tensor of the right dtype will do.
    _launch(_bn_bwd_kernel, wrap, gy, ps, 2, (gy, xhat, rstd, gamma, gy if relu_y is None else relu_y, gx, ggamma, gbeta),
            (1, 1, 1, 1, 0, 0), dict(RELU=relu_y is not None, GATHER=False, K=1, S=1))


def col2im_bn_bwd(gcols, H, W, s, ph, pw, xhat, rstd, gamma, relu_y, ggamma, gbeta, gx, wrap=ident):
    """:func:`bn_bwd` with its output cotangent gathered from the patch cotangent ``gcols [T, N,
    Ho, Wo, k, k, C]`` of the convolution it feeds (stride ``s``, top/left padding ``ph``/``pw``,
    on ``H x W`` images): the col2im fused into the loads, one launch (or pair) fewer, no
    ``[T, R, C]`` cotangent in memory. The same arithmetic in the same order as col2im then
    bn_bwd: bit for bit in the interpreter; compiled for a GPU, within rounding (the gather
    itself is plain adds, but the compiler contracts multiply-adds into FMAs kernel by kernel,
    and may do so differently in the fused kernel)."""
    extra = {} if relu_y is None else {"relu_y": (relu_y, "full")}
    T, R, C, ps = _bn_setup(
        xhat, rstd=(rstd, "stat"), gamma=(gamma, "param"), gx=(gx, "full"), ggamma=(ggamma, "param"),
        gbeta=(gbeta, "param"), **extra,
    )
    Tg, N, Ho, Wo, k, k2, Cg = gcols.shape
    if (Tg, Cg, k) != (T, C, k2) or N * H * W != R or gcols.dtype != xhat.dtype or not gcols.is_contiguous():
        raise ValueError(f"gcols {tuple(gcols.shape)} does not fit [T={T}, N, Ho, Wo, k, k, C={C}] with N*H*W = R = {R}")
    if T * R * C == 0:
        return
    _launch(_bn_bwd_kernel, wrap, xhat, ps, 2, (gcols, xhat, rstd, gamma, xhat if relu_y is None else relu_y, gx, ggamma, gbeta),
            (H, W, Ho, Wo, ph, pw), dict(RELU=relu_y is not None, GATHER=True, K=int(k), S=int(s)),
            BN_GATHER_TILE_BYTES[xhat.element_size()])


def bn_tfwd(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y, ry, rxhat, a, wrap=ident):
    """Tangent of :func:`bn_fwd` -> writes ``ry``, ``rxhat [T,R,C]``, ``a [T,C]``."""
    extra = {} if relu_y is None else {"relu_y": (relu_y, "full")}
    T, R, C, ps = _bn_setup(
        rx, xhat=(xhat, "full"), rstd=(rstd, "stat"), gamma=(gamma, "param"), rgamma=(rgamma, "param"),
        rbeta=(rbeta, "param"), ry=(ry, "full"), rxhat=(rxhat, "full"), a=(a, "stat"), **extra,
    )
    if T * R * C == 0:
        return
    _launch(_bn_tfwd_kernel, wrap, rx, ps, 2,
            (rx, xhat, rstd, gamma, rgamma, rbeta, rx if relu_y is None else relu_y, ry, rxhat, a),
            (), dict(RELU=relu_y is not None))


def bn_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rggamma, rgbeta, rgx, wrap=ident):
    """Tangent of :func:`bn_bwd` -> writes ``rggamma``, ``rgbeta [T,C]`` and ``rgx [T,R,C]``."""
    extra = {} if relu_y is None else {"relu_y": (relu_y, "full")}
    T, R, C, ps = _bn_setup(
        gy, rgy=(rgy, "full"), xhat=(xhat, "full"), rxhat=(rxhat, "full"), rstd=(rstd, "stat"),
        a=(a, "stat"), gamma=(gamma, "param"), rgamma=(rgamma, "param"), rgx=(rgx, "full"),
        rggamma=(rggamma, "param"), rgbeta=(rgbeta, "param"), **extra,
    )
    if T * R * C == 0:
        return
    _launch(_bn_tbwd_kernel, wrap, gy, ps, 5,
            (gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, gy if relu_y is None else relu_y, rgx, rggamma, rgbeta),
            (1, 1, 1, 1, 0, 0), dict(RELU=relu_y is not None, GATHER=False, K=1, S=1), BN_TBWD_TILE_BYTES)


def col2im_bn_tbwd(gy, rgcols, H, W, s, ph, pw, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rggamma, rgbeta, rgx,
                   wrap=ident):
    """:func:`bn_tbwd` with the cotangent's tangent gathered from the patch form ``rgcols`` of
    the convolution this BatchNorm feeds (see :func:`col2im_bn_bwd`): the arithmetic of col2im
    then bn_tbwd, bit for bit in the interpreter, within rounding on a GPU (FMA contraction)."""
    extra = {} if relu_y is None else {"relu_y": (relu_y, "full")}
    T, R, C, ps = _bn_setup(
        gy, xhat=(xhat, "full"), rxhat=(rxhat, "full"), rstd=(rstd, "stat"), a=(a, "stat"), gamma=(gamma, "param"),
        rgamma=(rgamma, "param"), rgx=(rgx, "full"), rggamma=(rggamma, "param"), rgbeta=(rgbeta, "param"), **extra,
    )
    Tg, N, Ho, Wo, k, k2, Cg = rgcols.shape
    if (Tg, Cg, k) != (T, C, k2) or N * H * W != R or rgcols.dtype != gy.dtype or not rgcols.is_contiguous():
        raise ValueError(f"rgcols {tuple(rgcols.shape)} does not fit [T={T}, N, Ho, Wo, k, k, C={C}] with N*H*W = R = {R}")
    if T * R * C == 0:
        return
    _launch(_bn_tbwd_kernel, wrap, gy, ps, 5,
            (gy, rgcols, xhat, rxhat, rstd, a, gamma, rgamma, gy if relu_y is None else relu_y, rgx, rggamma, rgbeta),
            (H, W, Ho, Wo, ph, pw), dict(RELU=relu_y is not None, GATHER=True, K=int(k), S=int(s)),
            BN_TBWD_GATHER_TILE_BYTES[gy.element_size()])
