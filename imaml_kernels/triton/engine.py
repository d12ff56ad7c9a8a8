"""Triton kernels of the engine's fused elementwise stages: private kernels, then host launchers.

Every stage matches its pure-PyTorch twin in :mod:`imaml_kernels.fused_reference` (read that
for the formulas). Layout: ``x``-like tensors are ``[T, R, C]`` row-major and contiguous
(``R = N·H·W`` rows, channels innermost); per-(task, channel) tensors are ``[T, C]``.

BatchNorm kernels run on a grid ``(T, cdiv(C, BLOCK_C))``: one program owns ``BLOCK_C``
channels of one task, loops over ``R`` in ``[BLOCK_R, BLOCK_C]`` tiles accumulating
per-channel sums, then makes a writing pass. Sums accumulate in the data type (float32 or
float64; the launchers accept nothing else).

Launchers take ``wrap``, applied to each kernel before launching (``torch.library.wrap_triton``
inside a ``triton_op``; identity by default). All outputs are preallocated by the caller.

Float scalars (``eps``, ``lr``): a Python float reaches a compiled CUDA kernel as an fp32
argument, which would cost float64 stages ~1e-8 relative error (``rstd`` of a constant
channel is ``1/sqrt(eps)``). The launchers pass each as ``hi + lo``, two fp32-exact floats,
recombined in the kernel in the data type (~48 significant bits). The interpreter keeps Python
floats exact, so it cannot show the difference; ``test_scalar_split`` checks the split.
"""

import struct

import torch
import triton
import triton.language as tl

# Elements per BatchNorm / col2im / softmax tile. 4096 with 8 warps = 16 elements per
# thread, as in cg.py; not yet swept on a GPU (none was available). Read at launch time, so
# tests can shrink them to force several R tiles and channel blocks.
BN_TILE = 4096
BN_MAX_BLOCK_C = 64  # channels per BatchNorm program: 64 float32 = one 256-byte row segment
BN_NUM_WARPS = 8
# Elements per prox_step program (one task's parameters are split into such blocks).
PROX_BLOCK = 4096
PROX_NUM_WARPS = 8
# Softmax rows are held whole in one tile: classes beyond this are not supported.
SOFTMAX_MAX_K = 16384

_FLOATS = (torch.float32, torch.float64)


def _id(k):
    return k


# --------------------------------------------------------------------------- BatchNorm


@triton.jit
def _bn_fwd_kernel(
    x_ptr,  # [T, R, C] input
    gamma_ptr,  # [T, C] scale
    beta_ptr,  # [T, C] shift
    y_ptr,  # [T, R, C] out: relu?(gamma xhat + beta)
    xhat_ptr,  # [T, R, C] out: (x - mean) rstd
    rstd_ptr,  # [T, C] out: 1 / sqrt(var + eps)
    R,  # rows per task
    C,  # channels
    eps_hi,  # eps = eps_hi + eps_lo, both fp32-exact (module docstring)
    eps_lo,  # see eps_hi
    RELU: tl.constexpr,  # apply max(., 0) to y
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # int64 before offset arithmetic: T * R * C exceeds 2**31 at large T (R * C alone is
    # asserted below 2**31 by the launcher, so the in-task offsets stay int32-safe).
    t = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1).to(tl.int64)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C  # the last channel block is partial
    base = t * R * C
    dt = x_ptr.dtype.element_ty

    # Pass 1: mean.
    s = tl.zeros([BLOCK_C], dtype=dt)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & cmask[None, :]  # the last row tile is partial
        off = base + rows[:, None] * C + cols[None, :]
        s += tl.sum(tl.load(x_ptr + off, mask=m, other=0.0), axis=0)
    mean = s / R

    # Pass 2: biased variance from centred squares (masked lanes would add mean**2).
    q = tl.zeros([BLOCK_C], dtype=dt)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & cmask[None, :]
        off = base + rows[:, None] * C + cols[None, :]
        d = tl.where(m, tl.load(x_ptr + off, mask=m, other=0.0) - mean[None, :], 0.0)
        q += tl.sum(d * d, axis=0)
    eps = (tl.zeros([BLOCK_C], dtype=dt) + eps_hi) + eps_lo
    rstd = 1.0 / tl.sqrt(q / R + eps)  # no rsqrt from libdevice (absent in the interpreter)
    tl.store(rstd_ptr + t * C + cols, rstd, mask=cmask)

    # Pass 3: write xhat and y.
    gam = tl.load(gamma_ptr + t * C + cols, mask=cmask, other=0.0)
    bet = tl.load(beta_ptr + t * C + cols, mask=cmask, other=0.0)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & cmask[None, :]
        off = base + rows[:, None] * C + cols[None, :]
        xh = (tl.load(x_ptr + off, mask=m, other=0.0) - mean[None, :]) * rstd[None, :]
        y = xh * gam[None, :] + bet[None, :]
        if RELU:
            y = tl.where(y > 0.0, y, y * 0.0)  # max(y, 0) that keeps NaN, as torch.relu
        tl.store(xhat_ptr + off, xh, mask=m)
        tl.store(y_ptr + off, y, mask=m)


@triton.jit
def _bn_bwd_kernel(
    gy_ptr,  # [T, R, C] output cotangent
    xhat_ptr,  # [T, R, C] from _bn_fwd_kernel
    rstd_ptr,  # [T, C] from _bn_fwd_kernel
    gamma_ptr,  # [T, C] scale
    relu_ptr,  # [T, R, C] ReLU output gating gy (read only when RELU)
    gx_ptr,  # [T, R, C] out: input cotangent
    ggamma_ptr,  # [T, C] out: sum g xhat
    gbeta_ptr,  # [T, C] out: sum g
    R,  # rows per task
    C,  # channels
    RELU: tl.constexpr,  # gate gy by relu > 0
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # int64: see _bn_fwd_kernel
    cb = tl.program_id(1).to(tl.int64)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C  # the last channel block is partial
    base = t * R * C
    dt = gy_ptr.dtype.element_ty

    # Pass 1: sum g and sum g xhat.
    sg = tl.zeros([BLOCK_C], dtype=dt)
    sgx = tl.zeros([BLOCK_C], dtype=dt)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & cmask[None, :]  # the last row tile is partial
        off = base + rows[:, None] * C + cols[None, :]
        g = tl.load(gy_ptr + off, mask=m, other=0.0)
        if RELU:
            g = tl.where(tl.load(relu_ptr + off, mask=m, other=0.0) > 0.0, g, 0.0)
        xh = tl.load(xhat_ptr + off, mask=m, other=0.0)
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(g * xh, axis=0)
    tl.store(ggamma_ptr + t * C + cols, sgx, mask=cmask)
    tl.store(gbeta_ptr + t * C + cols, sg, mask=cmask)

    gam = tl.load(gamma_ptr + t * C + cols, mask=cmask, other=0.0)
    r = tl.load(rstd_ptr + t * C + cols, mask=cmask, other=0.0)
    m1 = gam * sg / R  # mean(gamma g)
    m2 = gam * sgx / R  # mean(gamma g xhat)

    # Pass 2: gx = r (gamma g - m1 - xhat m2).
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & cmask[None, :]
        off = base + rows[:, None] * C + cols[None, :]
        g = tl.load(gy_ptr + off, mask=m, other=0.0)
        if RELU:
            g = tl.where(tl.load(relu_ptr + off, mask=m, other=0.0) > 0.0, g, 0.0)
        xh = tl.load(xhat_ptr + off, mask=m, other=0.0)
        gx = r[None, :] * (g * gam[None, :] - m1[None, :] - xh * m2[None, :])
        tl.store(gx_ptr + off, gx, mask=m)


@triton.jit
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
    R,  # rows per task
    C,  # channels
    RELU: tl.constexpr,  # gate ry by relu > 0
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # int64: see _bn_fwd_kernel
    cb = tl.program_id(1).to(tl.int64)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C  # the last channel block is partial
    base = t * R * C
    dt = rx_ptr.dtype.element_ty

    # Pass 1: sum rx and sum xhat rx.
    srx = tl.zeros([BLOCK_C], dtype=dt)
    sxr = tl.zeros([BLOCK_C], dtype=dt)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & cmask[None, :]  # the last row tile is partial
        off = base + rows[:, None] * C + cols[None, :]
        rx = tl.load(rx_ptr + off, mask=m, other=0.0)
        xh = tl.load(xhat_ptr + off, mask=m, other=0.0)
        srx += tl.sum(rx, axis=0)
        sxr += tl.sum(xh * rx, axis=0)
    a = sxr / R
    mrx = srx / R
    tl.store(a_ptr + t * C + cols, a, mask=cmask)

    r = tl.load(rstd_ptr + t * C + cols, mask=cmask, other=0.0)
    gam = tl.load(gamma_ptr + t * C + cols, mask=cmask, other=0.0)
    rgam = tl.load(rgamma_ptr + t * C + cols, mask=cmask, other=0.0)
    rbet = tl.load(rbeta_ptr + t * C + cols, mask=cmask, other=0.0)

    # Pass 2: rxhat = r (rx - mean(rx) - xhat a), ry = m (rgamma xhat + gamma rxhat + rbeta).
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & cmask[None, :]
        off = base + rows[:, None] * C + cols[None, :]
        rx = tl.load(rx_ptr + off, mask=m, other=0.0)
        xh = tl.load(xhat_ptr + off, mask=m, other=0.0)
        rxh = r[None, :] * (rx - mrx[None, :] - xh * a[None, :])
        ry = rgam[None, :] * xh + gam[None, :] * rxh + rbet[None, :]
        if RELU:
            ry = tl.where(tl.load(relu_ptr + off, mask=m, other=0.0) > 0.0, ry, 0.0)
        tl.store(rxhat_ptr + off, rxh, mask=m)
        tl.store(ry_ptr + off, ry, mask=m)


@triton.jit
def _bn_tbwd_kernel(
    gy_ptr,  # [T, R, C] output cotangent
    rgy_ptr,  # [T, R, C] tangent of the output cotangent
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
    R,  # rows per task
    C,  # channels
    RELU: tl.constexpr,  # gate gy, rgy by relu > 0
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # int64: see _bn_fwd_kernel
    cb = tl.program_id(1).to(tl.int64)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C  # the last channel block is partial
    base = t * R * C
    dt = gy_ptr.dtype.element_ty

    # Pass 1: the five per-channel sums every mean in the formula is made of.
    sg = tl.zeros([BLOCK_C], dtype=dt)  # sum g
    sgx = tl.zeros([BLOCK_C], dtype=dt)  # sum g xhat
    srg = tl.zeros([BLOCK_C], dtype=dt)  # sum rg
    srgx = tl.zeros([BLOCK_C], dtype=dt)  # sum rg xhat
    sgrx = tl.zeros([BLOCK_C], dtype=dt)  # sum g rxhat
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & cmask[None, :]  # the last row tile is partial
        off = base + rows[:, None] * C + cols[None, :]
        g = tl.load(gy_ptr + off, mask=m, other=0.0)
        rg = tl.load(rgy_ptr + off, mask=m, other=0.0)
        if RELU:
            on = tl.load(relu_ptr + off, mask=m, other=0.0) > 0.0
            g = tl.where(on, g, 0.0)
            rg = tl.where(on, rg, 0.0)
        xh = tl.load(xhat_ptr + off, mask=m, other=0.0)
        rxh = tl.load(rxhat_ptr + off, mask=m, other=0.0)
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(g * xh, axis=0)
        srg += tl.sum(rg, axis=0)
        srgx += tl.sum(rg * xh, axis=0)
        sgrx += tl.sum(g * rxh, axis=0)
    tl.store(rggamma_ptr + t * C + cols, srgx + sgrx, mask=cmask)
    tl.store(rgbeta_ptr + t * C + cols, srg, mask=cmask)

    r = tl.load(rstd_ptr + t * C + cols, mask=cmask, other=0.0)
    a = tl.load(a_ptr + t * C + cols, mask=cmask, other=0.0)
    gam = tl.load(gamma_ptr + t * C + cols, mask=cmask, other=0.0)
    rgam = tl.load(rgamma_ptr + t * C + cols, mask=cmask, other=0.0)
    m1 = gam * sg / R  # mean(gxh), gxh = gamma g
    m2 = gam * sgx / R  # mean(gxh xhat)
    mr = (gam * srg + rgam * sg) / R  # mean(rgxh), rgxh = gamma rg + rgamma g
    dm2 = (gam * srgx + rgam * sgx) / R + gam * sgrx / R  # mean(rgxh xhat) + mean(gxh rxhat)

    # Pass 2: rgx = -r a gx + r (rgxh - mean(rgxh) - rxhat m2 - xhat dm2).
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & cmask[None, :]
        off = base + rows[:, None] * C + cols[None, :]
        g = tl.load(gy_ptr + off, mask=m, other=0.0)
        rg = tl.load(rgy_ptr + off, mask=m, other=0.0)
        if RELU:
            on = tl.load(relu_ptr + off, mask=m, other=0.0) > 0.0
            g = tl.where(on, g, 0.0)
            rg = tl.where(on, rg, 0.0)
        xh = tl.load(xhat_ptr + off, mask=m, other=0.0)
        rxh = tl.load(rxhat_ptr + off, mask=m, other=0.0)
        gx = r[None, :] * (g * gam[None, :] - m1[None, :] - xh * m2[None, :])
        rgxh = rg * gam[None, :] + g * rgam[None, :]
        rgx = -r[None, :] * a[None, :] * gx + r[None, :] * (
            rgxh - mr[None, :] - rxh * m2[None, :] - xh * dm2[None, :]
        )
        tl.store(rgx_ptr + off, rgx, mask=m)


# --------------------------------------------------------------------------- prox step


@triton.jit
def _prox_step_kernel(
    phi_ptr,  # [T, P] task parameters, updated in place
    grad_ptr,  # [T, P] loss gradient at phi
    theta_ptr,  # [T, P] or [P] (theta_stride 0) proximal centre
    lam_ptr,  # [T] proximal weight
    P,  # parameters per task
    theta_stride,  # P, or 0 when theta is shared by all tasks
    lr_hi,  # lr = lr_hi + lr_lo, both fp32-exact (module docstring)
    lr_lo,  # see lr_hi
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # int64: T * P exceeds 2**31 at large T
    b = tl.program_id(1).to(tl.int64)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P  # the last block of a task is partial
    dt = phi_ptr.dtype.element_ty
    phi = tl.load(phi_ptr + t * P + offs, mask=mask, other=0.0)
    g = tl.load(grad_ptr + t * P + offs, mask=mask, other=0.0)
    th = tl.load(theta_ptr + t * theta_stride + offs, mask=mask, other=0.0)
    lam = tl.load(lam_ptr + t)
    lr = (tl.zeros([1], dtype=dt) + lr_hi) + lr_lo
    tl.store(phi_ptr + t * P + offs, phi - lr * (g + lam * (phi - th)), mask=mask)


# --------------------------------------------------------------------------- col2im


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


# --------------------------------------------------------------------------- softmax cross-entropy


@triton.jit
def _softmax_ce_kernel(
    logits_ptr,  # [T, N, K] logits
    y_ptr,  # [T, N] int64 labels in [0, K)
    loss_ptr,  # [T] out: mean over n of logsumexp - logit[y]
    prob_ptr,  # [T, N, K] out: softmax
    grad_ptr,  # [T, N, K] out: (prob - onehot(y)) / N
    N,  # rows per task
    K,  # classes
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # >= K: a row is held whole
):
    # One program per task: it owns the loss sum, so loss needs no second pass or atomics.
    t = tl.program_id(0).to(tl.int64)  # int64: T * N * K exceeds 2**31 at large T
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K  # padding classes
    dt = logits_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], dtype=dt)
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
        p = e / ssum[:, None]
        tl.store(prob_ptr + off, p, mask=m)
        tl.store(grad_ptr + off, (p - tl.where(hot, 1.0, 0.0)) / N, mask=m)
    tl.store(loss_ptr + t, tl.sum(total, axis=0) / N)


@triton.jit
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


# --------------------------------------------------------------------------- host launchers


def _split_f64(v: float):
    """``v`` as ``(hi, lo)``: two floats exactly representable in float32 with ``hi + lo``
    within ~2**-48 relative of ``v`` (a CUDA kernel receives Python floats as fp32)."""
    hi = struct.unpack("f", struct.pack("f", float(v)))[0]
    lo = struct.unpack("f", struct.pack("f", float(v) - hi))[0]
    return hi, lo


def _check(ref, shape, **tensors):
    if ref.dtype not in _FLOATS:
        raise TypeError(f"float32 or float64 expected, got {ref.dtype}")
    for name, (t, want) in tensors.items():
        if t.dtype != ref.dtype or t.device != ref.device:
            raise TypeError(f"{name}: {t.dtype} on {t.device}, expected {ref.dtype} on {ref.device}")
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(want)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _bn_setup(x, **tensors):
    """Checks a BatchNorm stage's tensors; -> ``(T, R, C, grid, BLOCK_R, BLOCK_C)``."""
    T, R, C = x.shape
    if R * C >= 2**31:
        raise ValueError(f"R * C = {R * C} per task is beyond the kernels' int32 in-task offsets")
    full, stat = (T, R, C), (T, C)
    _check(x, full, x=(x, full), **{k: (v, full if kind == "full" else stat) for k, (v, kind) in tensors.items()})
    block_c = min(triton.next_power_of_2(max(C, 1)), BN_MAX_BLOCK_C)
    block_r = max(1, min(BN_TILE // block_c, triton.next_power_of_2(max(R, 1))))
    return T, R, C, (T, triton.cdiv(C, block_c)), block_r, block_c


def bn_fwd(x, gamma, beta, y, xhat, rstd, eps: float, relu: bool, wrap=_id):
    """BatchNorm forward with batch statistics -> writes ``y``, ``xhat [T,R,C]``, ``rstd [T,C]``."""
    T, R, C, grid, block_r, block_c = _bn_setup(
        x, gamma=(gamma, "stat"), beta=(beta, "stat"), y=(y, "full"), xhat=(xhat, "full"), rstd=(rstd, "stat")
    )
    if T * R * C == 0:
        return
    eps_hi, eps_lo = _split_f64(eps)
    wrap(_bn_fwd_kernel)[grid](
        x, gamma, beta, y, xhat, rstd, R, C, eps_hi, eps_lo,
        RELU=bool(relu), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=BN_NUM_WARPS,
    )


def bn_bwd(gy, xhat, rstd, gamma, relu_y, gx, ggamma, gbeta, wrap=_id):
    """Backward of :func:`bn_fwd` -> writes ``gx [T,R,C]``, ``ggamma``, ``gbeta [T,C]``."""
    extra = {} if relu_y is None else {"relu_y": (relu_y, "full")}
    T, R, C, grid, block_r, block_c = _bn_setup(
        gy, xhat=(xhat, "full"), rstd=(rstd, "stat"), gamma=(gamma, "stat"), gx=(gx, "full"),
        ggamma=(ggamma, "stat"), gbeta=(gbeta, "stat"), **extra,
    )
    if T * R * C == 0:
        return
    # Without a ReLU the gate pointer is never read; any tensor of the right dtype will do.
    wrap(_bn_bwd_kernel)[grid](
        gy, xhat, rstd, gamma, gy if relu_y is None else relu_y, gx, ggamma, gbeta, R, C,
        RELU=relu_y is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=BN_NUM_WARPS,
    )


def bn_tfwd(rx, xhat, rstd, gamma, rgamma, rbeta, relu_y, ry, rxhat, a, wrap=_id):
    """Tangent of :func:`bn_fwd` -> writes ``ry``, ``rxhat [T,R,C]``, ``a [T,C]``."""
    extra = {} if relu_y is None else {"relu_y": (relu_y, "full")}
    T, R, C, grid, block_r, block_c = _bn_setup(
        rx, xhat=(xhat, "full"), rstd=(rstd, "stat"), gamma=(gamma, "stat"), rgamma=(rgamma, "stat"),
        rbeta=(rbeta, "stat"), ry=(ry, "full"), rxhat=(rxhat, "full"), a=(a, "stat"), **extra,
    )
    if T * R * C == 0:
        return
    wrap(_bn_tfwd_kernel)[grid](
        rx, xhat, rstd, gamma, rgamma, rbeta, rx if relu_y is None else relu_y, ry, rxhat, a, R, C,
        RELU=relu_y is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=BN_NUM_WARPS,
    )


def bn_tbwd(gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, relu_y, rgx, rggamma, rgbeta, wrap=_id):
    """Tangent of :func:`bn_bwd` -> writes ``rgx [T,R,C]``, ``rggamma``, ``rgbeta [T,C]``."""
    extra = {} if relu_y is None else {"relu_y": (relu_y, "full")}
    T, R, C, grid, block_r, block_c = _bn_setup(
        gy, rgy=(rgy, "full"), xhat=(xhat, "full"), rxhat=(rxhat, "full"), rstd=(rstd, "stat"),
        a=(a, "stat"), gamma=(gamma, "stat"), rgamma=(rgamma, "stat"), rgx=(rgx, "full"),
        rggamma=(rggamma, "stat"), rgbeta=(rgbeta, "stat"), **extra,
    )
    if T * R * C == 0:
        return
    wrap(_bn_tbwd_kernel)[grid](
        gy, rgy, xhat, rxhat, rstd, a, gamma, rgamma, gy if relu_y is None else relu_y,
        rgx, rggamma, rgbeta, R, C,
        RELU=relu_y is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=BN_NUM_WARPS,
    )


def prox_step(phi, grad, theta, lam, lr: float, wrap=_id):
    """In place: ``phi -= lr (grad + lam[t] (phi - theta))``; ``theta`` is ``[T,P]`` or shared ``[P]``."""
    T, P = phi.shape
    _check(phi, (T, P), grad=(grad, (T, P)), theta=(theta, tuple(theta.shape)), lam=(lam, (T,)))
    if tuple(theta.shape) not in ((T, P), (P,)):
        raise ValueError(f"theta: shape {tuple(theta.shape)}, expected {(T, P)} or {(P,)}")
    if T * P == 0:
        return
    block = min(PROX_BLOCK, triton.next_power_of_2(P))
    lr_hi, lr_lo = _split_f64(lr)
    wrap(_prox_step_kernel)[(T, triton.cdiv(P, block))](
        phi, grad, theta, lam, P, P if theta.dim() == 2 else 0, lr_hi, lr_lo,
        BLOCK=block, num_warps=PROX_NUM_WARPS,
    )


def _pool_grid(M, C):
    block_c = min(triton.next_power_of_2(max(C, 1)), BN_MAX_BLOCK_C)
    block_m = max(1, min(BN_TILE // block_c, triton.next_power_of_2(max(M, 1))))
    return (triton.cdiv(M, block_m), triton.cdiv(C, block_c)), block_m, block_c


def _check_idx(idx, shape):
    if idx.dtype != torch.uint8 or tuple(idx.shape) != tuple(shape) or not idx.is_contiguous():
        raise ValueError(f"idx: {idx.dtype} {tuple(idx.shape)}, expected contiguous uint8 {tuple(shape)}")


def maxpool_fwd(x, y, idx, wrap=_id):
    """2×2 max-pool, stride 2, floor mode: ``x [T,N,H,W,C]`` -> writes ``y`` and ``idx``
    (``[T,N,H//2,W//2,C]``, uint8 ``2·di + dj``)."""
    T, N, H, W, C = x.shape
    out = (T, N, H // 2, W // 2, C)
    _check(x, x.shape, y=(y, out))
    _check_idx(idx, out)
    M = T * N * (H // 2) * (W // 2)
    if M * C == 0:
        return
    grid, bm, bc = _pool_grid(M, C)
    wrap(_maxpool_fwd_kernel)[grid](x, y, idx, M, H, W, H // 2, W // 2, C, BLOCK_M=bm, BLOCK_C=bc, num_warps=BN_NUM_WARPS)


def maxpool_gather(x, idx, y, wrap=_id):
    """The max-pool's tangent: writes ``y [T,N,H//2,W//2,C]`` = ``x`` at ``idx``."""
    T, N, H, W, C = x.shape
    out = (T, N, H // 2, W // 2, C)
    _check(x, x.shape, y=(y, out))
    _check_idx(idx, out)
    M = T * N * (H // 2) * (W // 2)
    if M * C == 0:
        return
    grid, bm, bc = _pool_grid(M, C)
    wrap(_maxpool_gather_kernel)[grid](x, idx, y, M, H, W, H // 2, W // 2, C, BLOCK_M=bm, BLOCK_C=bc, num_warps=BN_NUM_WARPS)


def maxpool_scatter(gy, idx, gx, wrap=_id):
    """The max-pool's adjoint: writes ``gx [T,N,H,W,C]`` = ``gy`` at ``idx``, 0 elsewhere."""
    T, N, H, W, C = gx.shape
    out = (T, N, H // 2, W // 2, C)
    _check(gx, gx.shape, gy=(gy, out))
    _check_idx(idx, out)
    M = T * N * H * W
    if M * C == 0:
        return
    grid, bm, bc = _pool_grid(M, C)
    wrap(_maxpool_scatter_kernel)[grid](gy, idx, gx, M, H, W, H // 2, W // 2, C, BLOCK_M=bm, BLOCK_C=bc, num_warps=BN_NUM_WARPS)


def im2col(x, cols, k, s, ph, pw, wrap=_id):
    """Conv patches with fused zero padding: ``x [T,N,H,W,C]`` -> overwrites
    ``cols [T,N,Ho,Wo,k,k,C]``."""
    T, N, H, W, C = x.shape
    Ho, Wo = cols.shape[2], cols.shape[3]
    _check(x, (T, N, H, W, C), cols=(cols, (T, N, Ho, Wo, k, k, C)))
    M = T * N * Ho * Wo * k * k
    if M * C == 0:
        return
    block_c = min(triton.next_power_of_2(C), BN_MAX_BLOCK_C)
    block_m = max(1, min(BN_TILE // block_c, triton.next_power_of_2(M)))
    wrap(_im2col_kernel)[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
        x, cols, M, H, W, Ho, Wo, C, ph, pw,
        K=int(k), S=int(s), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=BN_NUM_WARPS,
    )


def col2im(gcols, gx, k, s, ph, pw, wrap=_id):
    """Adjoint of im2col: ``gcols [T,N,Ho,Wo,k,k,C]`` -> overwrites ``gx [T,N,H,W,C]``."""
    T, N, H, W, C = gx.shape
    Ho, Wo = gcols.shape[2], gcols.shape[3]
    _check(gx, (T, N, H, W, C), gcols=(gcols, (T, N, Ho, Wo, k, k, C)))
    if T * N * H * W * C == 0:
        return
    M = T * N * H * W
    block_c = min(triton.next_power_of_2(C), BN_MAX_BLOCK_C)
    block_m = max(1, min(BN_TILE // block_c, triton.next_power_of_2(M)))
    wrap(_col2im_kernel)[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
        gcols, gx, M, H, W, Ho, Wo, C, ph, pw,
        K=int(k), S=int(s), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=BN_NUM_WARPS,
    )


def _softmax_blocks(n, K):
    if K > SOFTMAX_MAX_K:
        raise ValueError(f"{K} classes: at most {SOFTMAX_MAX_K} supported (a row is held in one tile)")
    block_k = triton.next_power_of_2(K)
    return max(1, min(BN_TILE // block_k, triton.next_power_of_2(n))), block_k


def softmax_ce(logits, y, loss, prob, grad, wrap=_id):
    """Mean cross-entropy per task -> writes ``loss [T]``, ``prob``, ``grad [T,N,K]``."""
    T, N, K = logits.shape
    _check(logits, (T, N, K), loss=(loss, (T,)), prob=(prob, (T, N, K)), grad=(grad, (T, N, K)))
    if y.dtype != torch.int64 or tuple(y.shape) != (T, N) or not y.is_contiguous():
        raise ValueError(f"y: {y.dtype} {tuple(y.shape)}, expected contiguous int64 {(T, N)}")
    if T == 0 or N * K == 0:
        return
    block_n, block_k = _softmax_blocks(N, K)
    wrap(_softmax_ce_kernel)[(T,)](
        logits, y, loss, prob, grad, N, K, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=BN_NUM_WARPS,
    )


def softmax_ce_tangent(prob, rlogits, rg, wrap=_id):
    """Tangent of the softmax-CE gradient -> writes ``rg = prob (rlogits - <prob, rlogits>) / N``."""
    T, N, K = prob.shape
    _check(prob, (T, N, K), rlogits=(rlogits, (T, N, K)), rg=(rg, (T, N, K)))
    if T * N * K == 0:
        return
    block_m, block_k = _softmax_blocks(T * N, K)
    wrap(_softmax_ce_tangent_kernel)[(triton.cdiv(T * N, block_m),)](
        prob, rlogits, rg, T * N, N, K, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=BN_NUM_WARPS,
    )
