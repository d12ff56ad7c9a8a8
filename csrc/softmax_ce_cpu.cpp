// CPU kernels of the softmax cross-entropy and its tangent (engine.h).

#include "cpu_common.h"

namespace imaml {
namespace {

// ----------------------------------------------------------------------------- softmax CE

template <typename T>
void softmax_ce_impl(const T* __restrict logits, const int64_t* __restrict y, T* __restrict loss,
                     T* __restrict prob, T* __restrict grad, int64_t nt, int64_t N, int64_t K) {
  for (int64_t i = 0; i < nt * N; ++i)
    if (y[i] < 0 || y[i] >= K)
      throw std::out_of_range("softmax_ce_cpu: label " + std::to_string(y[i]) + " at row " +
                              std::to_string(i) + " is outside [0, " + std::to_string(K) + ")");
  std::vector<double> row_loss(nt * N);
  const double inv_n = 1.0 / double(N);
#pragma omp parallel if (nt * N * K >= kParallelMin)
  {
    std::vector<double> e(K);  // exp(l - max) of the current row
#pragma omp for schedule(static)
    for (int64_t row = 0; row < nt * N; ++row) {
      const T* l = logits + row * K;
      double mx = -INFINITY;
      for (int64_t k = 0; k < K; ++k) mx = std::max(mx, double(l[k]));
      double se = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        e[k] = std::exp(double(l[k]) - mx);
        se += e[k];
      }
      const int64_t yk = y[row];
      row_loss[row] = std::log(se) - (double(l[yk]) - mx);  // logsumexp - l[y]
      const double inv_se = 1.0 / se;
      for (int64_t k = 0; k < K; ++k) {
        const double p = e[k] * inv_se;
        if (prob) prob[row * K + k] = T(p);
        if (grad) grad[row * K + k] = T((k == yk ? p - 1.0 : p) * inv_n);
      }
    }
  }
  for (int64_t t = 0; t < nt; ++t) {
    double s = 0.0;
    for (int64_t n = 0; n < N; ++n) s += row_loss[t * N + n];
    loss[t] = T(s * inv_n);
  }
}

template <typename T>
void softmax_ce_tangent_impl(const T* __restrict prob, const T* __restrict rl, T* __restrict rg,
                             int64_t nt, int64_t N, int64_t K) {
  const double inv_n = 1.0 / double(N);
#pragma omp parallel for schedule(static) if (nt * N * K >= kParallelMin)
  for (int64_t row = 0; row < nt * N; ++row) {
    const T* p = prob + row * K;
    const T* r = rl + row * K;
    double s = 0.0;
    for (int64_t k = 0; k < K; ++k) s += double(p[k]) * double(r[k]);
    for (int64_t k = 0; k < K; ++k) rg[row * K + k] = T(double(p[k]) * (double(r[k]) - s) * inv_n);
  }
}


}  // namespace

void softmax_ce_cpu(DType dtype, const void* logits, const int64_t* y, void* loss, void* prob,
                    void* grad, int64_t T, int64_t N, int64_t K, void* gbias, int64_t gs) {
  check_sizes("softmax_ce_cpu", {T, N, K});
  if (N == 0 || K == 0) throw std::invalid_argument("softmax_ce_cpu: N and K must be positive");
  if (gbias && T > 1 && gs < K) throw std::invalid_argument("softmax_ce_cpu: gbias row stride below K");
  IMAML_DISPATCH(dtype, {
    softmax_ce_impl(cp<scalar_t>(logits), y, mp<scalar_t>(loss), mp<scalar_t>(prob),
                    mp<scalar_t>(grad), T, N, K);
    // The gradient of a bias added to the logits: the sum over the task's rows (float64).
    if (gbias) {
      const scalar_t* g = cp<scalar_t>(grad);
      scalar_t* gb = mp<scalar_t>(gbias);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t k = 0; k < K; ++k) {
          double acc = 0.0;
          for (int64_t n = 0; n < N; ++n) acc += double(g[(t * N + n) * K + k]);
          gb[t * gs + k] = scalar_t(acc);
        }
    }
  });
}

void softmax_ce_tangent_cpu(DType dtype, const void* prob, const void* rlogits, void* rg, int64_t T,
                            int64_t N, int64_t K) {
  check_sizes("softmax_ce_tangent_cpu", {T, N, K});
  if (N == 0) return;
  IMAML_DISPATCH(dtype, softmax_ce_tangent_impl(cp<scalar_t>(prob), cp<scalar_t>(rlogits),
                                                mp<scalar_t>(rg), T, N, K));
}

#undef IMAML_DISPATCH


}  // namespace imaml
