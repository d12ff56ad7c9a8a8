// CPU kernel of the proximal step of the fused inner loop (engine.h).

#include "cpu_common.h"

namespace imaml {
namespace {

// ----------------------------------------------------------------------------- prox_step

template <typename T>
IMAML_JOB void prox_step_job(T* __restrict phi, const T* __restrict grad, const T* __restrict theta,
                             T lam, T lr, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T v = phi[i];
    phi[i] = v - lr * (grad[i] + lam * (v - theta[i]));
  }
}

// λ per coordinate (lam a row of P values).
template <typename T>
IMAML_JOB void prox_step_vec_job(T* __restrict phi, const T* __restrict grad, const T* __restrict theta,
                                 const T* __restrict lam, T lr, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T v = phi[i];
    phi[i] = v - lr * (grad[i] + lam[i] * (v - theta[i]));
  }
}

template <typename T>
void prox_step_impl(T* phi, const T* grad, const T* theta, int64_t theta_stride, const T* lam,
                    int64_t lam_task_stride, bool lam_per_coord, double lr, int64_t nt, int64_t P) {
  constexpr int64_t kChunk = 16384;
  const int64_t nb = (P + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (nt * P >= kParallelMin)
  for (int64_t job = 0; job < nt * nb; ++job) {
    const int64_t t = job / nb, lo = (job % nb) * kChunk, n = std::min(P - lo, kChunk);
    if (lam_per_coord) {
      prox_step_vec_job<T>(phi + t * P + lo, grad + t * P + lo, theta + t * theta_stride + lo,
                           lam + t * lam_task_stride + lo, T(lr), n);
    } else {
      prox_step_job<T>(phi + t * P + lo, grad + t * P + lo, theta + t * theta_stride + lo,
                       lam[t * lam_task_stride], T(lr), n);
    }
  }
}


}  // namespace

void prox_step_cpu(DType dtype, void* phi, const void* grad, const void* theta,
                   int64_t theta_task_stride, const void* lam, int64_t lam_task_stride,
                   bool lam_per_coord, double lr, int64_t T, int64_t P) {
  check_sizes("prox_step_cpu", {T, P, theta_task_stride, lam_task_stride});
  IMAML_DISPATCH(dtype, prox_step_impl(mp<scalar_t>(phi), cp<scalar_t>(grad), cp<scalar_t>(theta),
                                       theta_task_stride, cp<scalar_t>(lam), lam_task_stride,
                                       lam_per_coord, lr, T, P));
}


}  // namespace imaml
