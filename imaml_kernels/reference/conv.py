"""Pure-PyTorch twin of the convolution's data movement (:mod:`imaml_kernels.ops.conv`): im2col and col2im.
"""



def im2col(x, Ho, Wo, k, s, ph, pw):
    """Pad, then one strided copy (the twin of :func:`imaml_kernels.ops.conv.im2col`)."""
    T, N, H, W, C = x.shape
    Hp, Wp = max(H + 2 * ph, s * (Ho - 1) + k), max(W + 2 * pw, s * (Wo - 1) + k)
    xp = x.new_zeros(T, N, Hp, Wp, C)
    xp[:, :, ph : ph + H, pw : pw + W] = x
    sT, sN, sH, sW, sC = xp.stride()
    v = xp.as_strided((T, N, Ho, Wo, k, k, C), (sT, sN, s * sH, s * sW, sH, sW, sC))
    return v.contiguous()


def col2im(gcols, H, W, s, ph, pw):
    """Scatter-add form of :func:`imaml_kernels.ops.conv.col2im` (9 strided adds for a 3×3 kernel)."""
    T, N, Ho, Wo, k, _, C = gcols.shape
    Hp, Wp = max(H + 2 * ph, s * (Ho - 1) + k), max(W + 2 * pw, s * (Wo - 1) + k)
    gx = gcols.new_zeros(T, N, Hp, Wp, C)
    for i in range(k):
        for j in range(k):
            gx[:, :, i : i + s * (Ho - 1) + 1 : s, j : j + s * (Wo - 1) + 1 : s, :] += gcols[:, :, :, :, i, j, :]
    return gx[:, :, ph : ph + H, pw : pw + W, :]
