// CPU kernels (OpenMP) of the engine's fused elementwise stages; the pure-PyTorch twins
// and the formulas are in imaml_kernels/reference/.
//
// Layout: every array is contiguous, row-major. BatchNorm data is [T, R, C] (T tasks,
// R = N*H*W rows, channels innermost); per-(task, channel) arrays are [T, C]. `relu_y`
// may be nullptr (no ReLU after the stage); otherwise its mask `relu_y > 0` gates the
// (co)tangents. All floating arrays of one call share `dtype`; reductions accumulate in
// float64 whatever the dtype, elementwise passes run in `dtype`. No kernel keeps state;
// results are deterministic for a given thread count (fixed work split and reduction order).
// Outputs must not overlap inputs (except prox_step's phi, updated in place).
#pragma once

#include <cstdint>

#include "cg.h"  // DType

namespace imaml {

// The per-(task, channel) parameters and their (co)tangents -- gamma, beta, rgamma, rbeta,
// ggamma, gbeta, rggamma, rgbeta -- are [T, C] rows of row stride `ps` (>= C): views into
// flat [T, P] parameter buffers are read and written in place (ps = P), no copies. The
// statistics rstd and a are contiguous [T, C].

// y = relu?(gamma * xhat + beta), xhat = (x - mean) * rstd, rstd = 1/sqrt(var + eps)
// (batch statistics over R, biased variance, two-pass).
void bn_fwd_cpu(DType dtype, const void* x, const void* gamma, const void* beta, void* y, void* xhat,
                void* rstd, int64_t T, int64_t R, int64_t C, double eps, bool relu, int64_t ps);

// g = mask * gy; ggamma = sum_R g xhat; gbeta = sum_R g;
// gx = rstd * gamma * (g - mean(g) - xhat * mean(g xhat)).
void bn_bwd_cpu(DType dtype, const void* gy, const void* xhat, const void* rstd, const void* gamma,
                const void* relu_y, void* gx, void* ggamma, void* gbeta, int64_t T, int64_t R,
                int64_t C, int64_t ps);

// a = mean(xhat rx); rxhat = rstd (rx - mean(rx) - xhat a);
// ry = mask * (rgamma xhat + gamma rxhat + rbeta).
void bn_tfwd_cpu(DType dtype, const void* rx, const void* xhat, const void* rstd, const void* gamma,
                 const void* rgamma, const void* rbeta, const void* relu_y, void* ry, void* rxhat,
                 void* a, int64_t T, int64_t R, int64_t C, int64_t ps);

// The tangent of bn_bwd (see reference/batchnorm.py bn_tbwd): one reduction pass, one writing pass.
void bn_tbwd_cpu(DType dtype, const void* gy, const void* rgy, const void* xhat, const void* rxhat,
                 const void* rstd, const void* a, const void* gamma, const void* rgamma,
                 const void* relu_y, void* rgx, void* rggamma, void* rgbeta, int64_t T, int64_t R,
                 int64_t C, int64_t ps);

// In place: phi[t, i] -= lr * (grad[t, i] + lam_ti * (phi[t, i] - theta[t * theta_task_stride + i]));
// phi, grad [T, P]; theta [P] (stride 0) or [T, P] (stride P). lam_ti: lam[t * lam_task_stride]
// (λ per task: lam [T], stride 1), or with lam_per_coord lam[t * lam_task_stride + i] (λ per
// coordinate: a shared row [P], stride 0, or [T, P], stride P).
void prox_step_cpu(DType dtype, void* phi, const void* grad, const void* theta,
                   int64_t theta_task_stride, const void* lam, int64_t lam_task_stride,
                   bool lam_per_coord, double lr, int64_t T, int64_t P);

// Adjoint of im2col (gx fully written, not accumulated): gcols [T, N, Ho, Wo, k, k, C] ->
// 2x2 max-pool, stride 2, floor mode, channels-last. fwd: x [T,N,H,W,C] -> y [T,N,H/2,W/2,C]
// and idx [T,N,H/2,W/2,C] uint8 (2*di + dj of the first maximum; NaN wins). gather: y = x at idx
// (the tangent). scatter: gx [T,N,H,W,C] = gy at idx, 0 elsewhere (the adjoint).
void maxpool_fwd_cpu(DType dtype, const void* x, void* y, uint8_t* idx, int64_t T, int64_t N,
                     int64_t H, int64_t W, int64_t C);
void maxpool_gather_cpu(DType dtype, const void* x, const uint8_t* idx, void* y, int64_t T,
                        int64_t N, int64_t H, int64_t W, int64_t C);
void maxpool_scatter_cpu(DType dtype, const void* gy, const uint8_t* idx, void* gx, int64_t T,
                         int64_t N, int64_t H, int64_t W, int64_t C);

// The patches of a k x k, stride-s convolution, zero padding (ph, pw) fused:
// x [T, N, H, W, C] -> cols [T, N, Ho, Wo, k, k, C], cols[t,n,ho,wo,i,j,c] =
// x[t, n, s*ho + i - ph, s*wo + j - pw, c] or 0 outside the image. The adjoint of col2im.
void im2col_cpu(DType dtype, const void* x, void* cols, int64_t T, int64_t N, int64_t H, int64_t W,
                int64_t C, int64_t Ho, int64_t Wo, int64_t k, int64_t s, int64_t ph, int64_t pw);

// gx [T, N, H, W, C] (unpadded); gx[t,n,h,w,c] = sum of gcols[t,n,ho,wo,i,j,c] over
// h + ph = s*ho + i, w + pw = s*wo + j, 0 <= ho < Ho, 0 <= wo < Wo (windows may reach past
// the padded input on the bottom/right: those terms are dropped). No atomics: each thread
// owns whole output rows.
void col2im_cpu(DType dtype, const void* gcols, void* gx, int64_t T, int64_t N, int64_t H, int64_t W,
                int64_t C, int64_t Ho, int64_t Wo, int64_t k, int64_t s, int64_t ph, int64_t pw);

// logits [T, N, K], y [T, N] int64 in [0, K) (else std::out_of_range, nothing written):
// loss [T] = mean_n (logsumexp - logit[y]); prob = softmax; grad = (prob - onehot(y)) / N.
// prob or grad may be nullptr (not written).
// gbias (optional, row stride gs): sum over each task's rows of grad -- the gradient of a bias
// added to the logits.
void softmax_ce_cpu(DType dtype, const void* logits, const int64_t* y, void* loss, void* prob,
                    void* grad, int64_t T, int64_t N, int64_t K, void* gbias,
                    int64_t gs);

// rg = prob * (rlogits - sum_k prob * rlogits) / N.
void softmax_ce_tangent_cpu(DType dtype, const void* prob, const void* rlogits, void* rg, int64_t T,
                            int64_t N, int64_t K);

}  // namespace imaml
