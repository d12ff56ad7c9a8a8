// CPU kernels of the 2x2 max-pool: forward with argmax, tangent gather, adjoint scatter (engine.h).

#include "cpu_common.h"

namespace imaml {
namespace {

// ----------------------------------------------------------------------------- max-pool 2x2
//
// 2x2 max-pool, stride 2, floor mode, channels-last: x [T, N, H, W, C] -> y [T, N, H/2, W/2, C]
// and idx (uint8, 2*di + dj of the first maximum in row-major window order; NaN wins, as in
// torch). The tangent gathers with idx; the adjoint scatters with it (unselected and dropped
// odd rows/columns get 0). One job per (t, n, output row).

template <typename T>
IMAML_JOB void maxpool_fwd_job(const T* __restrict x, T* __restrict y, uint8_t* __restrict idx,
                               int64_t W, int64_t C, int64_t Wo) {
  for (int64_t wo = 0; wo < Wo; ++wo) {
    const T* a = x + (2 * wo) * C;  // (0, 0); (0, 1) is a + C; row 1 is a + W*C
    const T* b = a + C;
    const T* d = a + W * C;
    const T* e = d + C;
    T* yo = y + wo * C;
    uint8_t* io = idx + wo * C;
    for (int64_t c = 0; c < C; ++c) {
      T best = a[c];
      uint8_t k = 0;
      if (b[c] > best || (b[c] != b[c] && best == best)) { best = b[c]; k = 1; }
      if (d[c] > best || (d[c] != d[c] && best == best)) { best = d[c]; k = 2; }
      if (e[c] > best || (e[c] != e[c] && best == best)) { best = e[c]; k = 3; }
      yo[c] = best;
      io[c] = k;
    }
  }
}

template <typename T>
void maxpool_fwd_impl(const T* x, T* y, uint8_t* idx, int64_t nt, int64_t N, int64_t H, int64_t W,
                      int64_t C) {
  const int64_t Ho = H / 2, Wo = W / 2;
  const bool parallel = nt * N * Ho * Wo * C >= kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t job = 0; job < nt * N * Ho; ++job) {
    const int64_t img = job / Ho, ho = job % Ho;
    maxpool_fwd_job<T>(x + (img * H + 2 * ho) * W * C, y + job * Wo * C, idx + job * Wo * C, W, C, Wo);
  }
}

template <typename T>
void maxpool_gather_impl(const T* x, const uint8_t* idx, T* y, int64_t nt, int64_t N, int64_t H,
                         int64_t W, int64_t C) {
  const int64_t Ho = H / 2, Wo = W / 2;
  const bool parallel = nt * N * Ho * Wo * C >= kParallelMin;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t job = 0; job < nt * N * Ho; ++job) {
    const int64_t img = job / Ho, ho = job % Ho;
    const T* row = x + (img * H + 2 * ho) * W * C;
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const uint8_t* io = idx + (job * Wo + wo) * C;
      T* yo = y + (job * Wo + wo) * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = io[c];
        yo[c] = row[((k >> 1) * W + 2 * wo + (k & 1)) * C + c];
      }
    }
  }
}

template <typename T>
void maxpool_scatter_impl(const T* gy, const uint8_t* idx, T* gx, int64_t nt, int64_t N, int64_t H,
                          int64_t W, int64_t C) {
  const int64_t Ho = H / 2, Wo = W / 2;
  const bool parallel = nt * N * H * W * C >= kParallelMin;
  // One job per (t, n, input row): it owns the row, so no races; rows past 2*Ho are zero.
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t job = 0; job < nt * N * H; ++job) {
    const int64_t img = job / H, h = job % H, ho = h / 2, di = h & 1;
    T* out = gx + job * W * C;
    for (int64_t i = 0; i < W * C; ++i) out[i] = T(0);
    if (ho >= Ho) continue;
    for (int64_t wo = 0; wo < Wo; ++wo) {
      const uint8_t* io = idx + ((img * Ho + ho) * Wo + wo) * C;
      const T* g = gy + ((img * Ho + ho) * Wo + wo) * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = io[c];
        if ((k >> 1) == di) out[(2 * wo + (k & 1)) * C + c] = g[c];
      }
    }
  }
}


}  // namespace

void maxpool_fwd_cpu(DType dtype, const void* x, void* y, uint8_t* idx, int64_t T, int64_t N,
                     int64_t H, int64_t W, int64_t C) {
  check_sizes("maxpool_fwd_cpu", {T, N, H, W, C});
  if (T * N * (H / 2) * (W / 2) * C == 0) return;
  IMAML_DISPATCH(dtype, maxpool_fwd_impl(cp<scalar_t>(x), mp<scalar_t>(y), idx, T, N, H, W, C));
}

void maxpool_gather_cpu(DType dtype, const void* x, const uint8_t* idx, void* y, int64_t T,
                        int64_t N, int64_t H, int64_t W, int64_t C) {
  check_sizes("maxpool_gather_cpu", {T, N, H, W, C});
  if (T * N * (H / 2) * (W / 2) * C == 0) return;
  IMAML_DISPATCH(dtype, maxpool_gather_impl(cp<scalar_t>(x), idx, mp<scalar_t>(y), T, N, H, W, C));
}

void maxpool_scatter_cpu(DType dtype, const void* gy, const uint8_t* idx, void* gx, int64_t T,
                         int64_t N, int64_t H, int64_t W, int64_t C) {
  check_sizes("maxpool_scatter_cpu", {T, N, H, W, C});
  if (T * N * H * W * C == 0) return;
  IMAML_DISPATCH(dtype, maxpool_scatter_impl(cp<scalar_t>(gy), idx, mp<scalar_t>(gx), T, N, H, W, C));
}


}  // namespace imaml
