// CPU kernels of the fused CG iteration. Parallel over (task, block) pairs with
// OpenMP; inner loops are simple enough for the compiler to vectorise.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "cg.h"
#include "cg_common.h"

namespace imaml {
namespace {

// Blocks per task, as the partials [T, NB, 4] have them: at least one, so that P = 0 writes
// (and reads back) a zero row, as the CUDA and Triton kernels do.
int64_t num_blocks(int64_t n, int64_t chunk) { return std::max<int64_t>(1, (n + chunk - 1) / chunk); }

template <typename T>
void dots_impl(const T* r, const T* p, const T* Ap, double* partials, int64_t ntasks, int64_t n,
               int64_t chunk) {
  const int64_t nb = num_blocks(n, chunk);
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < ntasks * nb; ++job) {
    const int64_t t = job / nb, b = job % nb;
    const int64_t lo = b * chunk, hi = std::min(n, lo + chunk);
    const T* rt = r + t * n;
    const T* pt = p + t * n;
    const T* at = Ap + t * n;
    // float64 accumulators even for float32 data: P is ~1e5..1e6 per task.
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = lo; i < hi; ++i) {
      const double ri = rt[i], pi = pt[i], ai = at[i];
      s0 += ri * ri;
      s1 += pi * ai;
      s2 += ri * ai;
      s3 += ai * ai;
    }
    double* out = partials + job * kCgDots;
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
  }
}

template <typename T>
void update_impl(T* x, T* r, T* p, const T* Ap, const double* partials, const int32_t* status_in,
                 int32_t* status_out, int32_t* iters, const double* thresh, int64_t ntasks,
                 int64_t n, int64_t chunk) {
  const int64_t nb = num_blocks(n, chunk);
  std::vector<CgStep> steps(ntasks);
  for (int64_t t = 0; t < ntasks; ++t) {
    double s[kCgDots] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t b = 0; b < nb; ++b)  // fixed order: deterministic
      for (int k = 0; k < kCgDots; ++k) s[k] += partials[(t * nb + b) * kCgDots + k];
    steps[t] = cg_step(s[0], s[1], s[2], s[3], thresh[t], status_in[t]);
    status_out[t] = steps[t].status;
    iters[t] += steps[t].update ? 1 : 0;
  }
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < ntasks * nb; ++job) {
    const int64_t t = job / nb, b = job % nb;
    if (!steps[t].update) continue;
    const int64_t lo = b * chunk, hi = std::min(n, lo + chunk);
    const T alpha = static_cast<T>(steps[t].alpha), beta = static_cast<T>(steps[t].beta);
    T* xt = x + t * n;
    T* rt = r + t * n;
    T* pt = p + t * n;
    const T* at = Ap + t * n;
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) {
      const T pi = pt[i];
      const T ri = rt[i] - alpha * at[i];
      xt[i] = xt[i] + alpha * pi;
      rt[i] = ri;
      pt[i] = ri + beta * pi;
    }
  }
}

}  // namespace

void cg_dots_cpu(DType dtype, const void* r, const void* p, const void* Ap, double* partials,
                 int64_t ntasks, int64_t n, int64_t chunk) {
  if (dtype == DType::kFloat32)
    dots_impl(static_cast<const float*>(r), static_cast<const float*>(p),
              static_cast<const float*>(Ap), partials, ntasks, n, chunk);
  else
    dots_impl(static_cast<const double*>(r), static_cast<const double*>(p),
              static_cast<const double*>(Ap), partials, ntasks, n, chunk);
}

void cg_update_cpu(DType dtype, void* x, void* r, void* p, const void* Ap, const double* partials,
                   const int32_t* status_in, int32_t* status_out, int32_t* iters, const double* thresh,
                   int64_t ntasks, int64_t n, int64_t chunk) {
  if (dtype == DType::kFloat32)
    update_impl(static_cast<float*>(x), static_cast<float*>(r), static_cast<float*>(p),
                static_cast<const float*>(Ap), partials, status_in, status_out, iters, thresh,
                ntasks, n, chunk);
  else
    update_impl(static_cast<double*>(x), static_cast<double*>(r), static_cast<double*>(p),
                static_cast<const double*>(Ap), partials, status_in, status_out, iters, thresh,
                ntasks, n, chunk);
}

}  // namespace imaml
