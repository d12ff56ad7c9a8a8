// CPU kernels of im2col (zero padding fused) and its adjoint col2im, channels-last (engine.h).

#include "cpu_common.h"

namespace imaml {
namespace {

// ----------------------------------------------------------------------------- col2im
//
// One job per (t, n, block of output rows [h0, h1)): zero its rows, then stream the (ho, wo)
// blocks of gcols[t, n] (each k*k*C contiguous) that can reach those rows, in memory order,
// adding each (i, j) slice into gx[t, n, s*ho + i - ph, s*wo + j - pw, :]. Jobs own disjoint
// output rows: no races, no atomics; gcols is read once, sequentially. Each output element
// sums its terms in descending (i, j) order (the reverse of the scatter-add loop over
// (i, j)): equal to it up to rounding. (Visiting the blocks in descending order would
// reproduce the scatter-add bit for bit, but measured 20-30% slower: backward streams
// prefetch worse.)

template <typename T>
IMAML_JOB void col2im_job(const T* __restrict g, T* __restrict out, int64_t h0, int64_t h1,
                          int64_t W, int64_t C, int64_t Ho, int64_t Wo, int64_t k, int64_t s,
                          int64_t ph, int64_t pw) {
  for (int64_t i = h0 * W * C; i < h1 * W * C; ++i) out[i] = T(0);
  // ho reaches row h = s*ho + i - ph (0 <= i < k) in [h0, h1) iff h0 + ph - k < s*ho <= h1 - 1 + ph
  const int64_t ho_hi = std::min(Ho - 1, (h1 - 1 + ph) / s);
  const int64_t lo_num = h0 + ph - k + 1;  // s*ho >= lo_num
  const int64_t ho_lo = lo_num <= 0 ? 0 : (lo_num + s - 1) / s;
  const int64_t kkc = k * k * C;
  for (int64_t ho = ho_lo; ho <= ho_hi; ++ho) {
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const T* blk = g + (ho * Wo + wo) * kkc;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t h = s * ho + i - ph;
        if (h < h0 || h >= h1) continue;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t w = s * wo + j - pw;
          if (w < 0 || w >= W) continue;
          const T* src = blk + (i * k + j) * C;
          T* dst = out + (h * W + w) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
        }
      }
    }
  }
}

template <typename T>
void col2im_impl(const T* gcols, T* gx, int64_t nt, int64_t N, int64_t H, int64_t W, int64_t C,
                 int64_t Ho, int64_t Wo, int64_t k, int64_t s, int64_t ph, int64_t pw) {
  const bool parallel = nt * N * H * W * C >= kParallelMin;
  const int64_t nthr = parallel ? max_threads() : 1;
  // Row blocks per image: 1, or enough for two jobs per thread when the images are few.
  int64_t nhb = 1;
  if (nt * N < 2 * nthr) nhb = std::min(H, (2 * nthr + nt * N - 1) / (nt * N));
  const int64_t hb = (H + nhb - 1) / nhb;
  const int64_t per_in = Ho * Wo * k * k * C, per_out = H * W * C;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t job = 0; job < nt * N * nhb; ++job) {
    const int64_t img = job / nhb, h0 = std::min(H, (job % nhb) * hb), h1 = std::min(H, h0 + hb);
    if (h0 < h1)
      col2im_job<T>(gcols + img * per_in, gx + img * per_out, h0, h1, W, C, Ho, Wo, k, s, ph, pw);
  }
}

// ----------------------------------------------------------------------------- im2col
//
// The patches of a k x k, stride-s convolution with zero padding (ph, pw), channels-last:
// x [T, N, H, W, C] -> cols [T, N, Ho, Wo, k, k, C]. The padding is fused (out-of-range taps
// are written as zeros), so no padded copy of x is made. One job per (t, n, output row ho);
// each (i, j) tap is one contiguous C-element copy.

template <typename T>
IMAML_JOB void im2col_job(const T* __restrict x, T* __restrict out, int64_t ho, int64_t H,
                          int64_t W, int64_t C, int64_t Wo, int64_t k, int64_t s, int64_t ph,
                          int64_t pw) {
  for (int64_t wo = 0; wo < Wo; ++wo) {
    for (int64_t i = 0; i < k; ++i) {
      const int64_t h = s * ho + i - ph;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t w = s * wo + j - pw;
        T* dst = out + ((wo * k + i) * k + j) * C;
        if (h < 0 || h >= H || w < 0 || w >= W) {
          for (int64_t c = 0; c < C; ++c) dst[c] = T(0);
        } else {
          const T* src = x + (h * W + w) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dst[c] = src[c];
        }
      }
    }
  }
}

template <typename T>
void im2col_impl(const T* x, T* cols, int64_t nt, int64_t N, int64_t H, int64_t W, int64_t C,
                 int64_t Ho, int64_t Wo, int64_t k, int64_t s, int64_t ph, int64_t pw) {
  const int64_t per_in = H * W * C, per_row = Wo * k * k * C;
  const bool parallel = nt * N * Ho * per_row >= kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t job = 0; job < nt * N * Ho; ++job) {
    const int64_t img = job / Ho, ho = job % Ho;
    im2col_job<T>(x + img * per_in, cols + job * per_row, ho, H, W, C, Wo, k, s, ph, pw);
  }
}


}  // namespace

void im2col_cpu(DType dtype, const void* x, void* cols, int64_t T, int64_t N, int64_t H, int64_t W,
                int64_t C, int64_t Ho, int64_t Wo, int64_t k, int64_t s, int64_t ph, int64_t pw) {
  check_sizes("im2col_cpu", {T, N, H, W, C, Ho, Wo, k, ph, pw});
  if (s < 1) throw std::invalid_argument("im2col_cpu: stride must be >= 1");
  if (T * N * Ho * Wo * k * C == 0) return;
  IMAML_DISPATCH(dtype, im2col_impl(cp<scalar_t>(x), mp<scalar_t>(cols), T, N, H, W, C, Ho, Wo, k,
                                    s, ph, pw));
}

void col2im_cpu(DType dtype, const void* gcols, void* gx, int64_t T, int64_t N, int64_t H, int64_t W,
                int64_t C, int64_t Ho, int64_t Wo, int64_t k, int64_t s, int64_t ph, int64_t pw) {
  check_sizes("col2im_cpu", {T, N, H, W, C, Ho, Wo, k, ph, pw});
  if (s < 1) throw std::invalid_argument("col2im_cpu: stride must be >= 1");
  if (T * N * H * W * C == 0) return;
  IMAML_DISPATCH(dtype, col2im_impl(cp<scalar_t>(gcols), mp<scalar_t>(gx), T, N, H, W, C, Ho, Wo, k,
                                    s, ph, pw));
}


}  // namespace imaml
