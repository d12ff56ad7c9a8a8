// CPU kernels of the engine's fused elementwise stages (see engine.h and
// imaml_kernels/fused_reference.py for the formulas).
//
// BatchNorm kernels: one OpenMP job per (task, block of <= 64 channels). A job walks the R
// rows of its block with the channel loop innermost (contiguous, vectorised), keeping
// float64 per-channel sums in local arrays, then makes one writing pass. With fewer than two
// such units per thread the rows are split among the threads instead (see run_bn). Splitting
// the channels finer was measured slower: strided partial rows waste cache lines and sets.
//
// Each job is a separate (not inlined) function with __restrict pointer arguments: inside
// an OpenMP-outlined loop body the compiler loses the no-alias facts of the enclosing
// function and falls back to scalar code. On x86-64 with GCC the job functions are also
// cloned for x86-64-v3 (AVX2 + FMA), picked at load time by the CPU (the baseline build
// targets plain x86-64), so one binary runs anywhere.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 11
#define IMAML_JOB __attribute__((noinline, target_clones("arch=x86-64-v3", "default")))
#else
#define IMAML_JOB __attribute__((noinline))
#endif

namespace imaml {
namespace {

constexpr int64_t kMaxCB = 64;  // channels per job at most (size of the local sum arrays)

// Below this many elements a kernel runs on the calling thread: waking the team would cost
// more than the work (and much more on an oversubscribed machine).
constexpr int64_t kParallelMin = int64_t(1) << 15;

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// The ReLU gate v * (m > 0), as in the reference (a product, as there, not a select). The
// quiet comparison (no FE_INVALID on NaN) lets GCC if-convert and vectorise the loop
// without -fno-trapping-math; its value is that of m > 0 for every m.
template <bool Masked, typename T>
inline T gate(T v, const T* __restrict m, int64_t j) {
  if constexpr (Masked) {
    return v * T(__builtin_isgreater(m[j], T(0)));
  } else {
    return v;
  }
}

// ----------------------------------------------------------------------------- BatchNorm driver
//
// A unit is (task t, channel block [c0, c0 + n)), n <= kMaxCB. Each BatchNorm kernel is
// K1 row sums per channel -> per-unit state (finalise), optionally K2 more row sums that
// need that state (bn_fwd's centred second moment) -> state, then one writing pass.
// With enough units, one job per unit does everything (its rows are still warm in cache
// for the writing pass). With fewer than two units per thread, the rows of each unit are
// split into chunks: partial sums per chunk, combined in chunk order (deterministic for a
// given thread count), then the writing pass over the chunks.

constexpr int64_t kMinChunkRows = 32;

struct Plan {
  int64_t C, cb, nb, units, nchunk, chunk;
  bool parallel;
  int64_t t(int64_t u) const { return u / nb; }
  int64_t c0(int64_t u) const { return (u % nb) * cb; }
  int64_t n(int64_t u) const { return std::min(cb, C - c0(u)); }
};

Plan make_plan(int64_t nt, int64_t R, int64_t C) {
  Plan p;
  p.C = C;
  p.cb = std::max<int64_t>(1, std::min(C, kMaxCB));
  p.nb = (C + p.cb - 1) / p.cb;
  p.units = nt * p.nb;
  p.parallel = nt * R * C >= kParallelMin;
  const int64_t nthr = p.parallel ? max_threads() : 1;
  p.nchunk = 1;
  if (nthr > 1 && p.units < 2 * nthr) {
    // units * nchunk: a multiple of the thread count (equal shares), chunks not too short
    p.nchunk = nthr / std::gcd(p.units, nthr);
    p.nchunk = std::max<int64_t>(1, std::min(p.nchunk, R / kMinChunkRows));
  }
  p.chunk = (R + p.nchunk - 1) / p.nchunk;
  return p;
}

struct NoStage {
  template <typename... A>
  void operator()(A&&...) const {}
};

// red1(u, r0, r1, double* s) writes K1 x kMaxCB sums (s[k * kMaxCB + j]) over rows [r0, r1);
// fin1(u, const double* s, State&); red2(u, r0, r1, const State&, double* s) and
// fin2(u, const double* s, State&) likewise (K2 = 0: none); write(u, r0, r1, const State&).
template <int K1, int K2, typename State, typename Red1, typename Fin1, typename Red2,
          typename Fin2, typename Write>
void run_bn(const Plan& p, int64_t R, Red1 red1, Fin1 fin1, Red2 red2, Fin2 fin2, Write write) {
  constexpr int KM = K1 > K2 ? K1 : K2;
  if (p.nchunk == 1) {
#pragma omp parallel for schedule(static) if (p.parallel)
    for (int64_t u = 0; u < p.units; ++u) {
      State st;
      double s[KM * kMaxCB];
      red1(u, int64_t(0), R, s);
      fin1(u, static_cast<const double*>(s), st);
      if constexpr (K2 > 0) {
        red2(u, int64_t(0), R, static_cast<const State&>(st), s);
        fin2(u, static_cast<const double*>(s), st);
      }
      write(u, int64_t(0), R, static_cast<const State&>(st));
    }
    return;
  }
  const int64_t njobs = p.units * p.nchunk, stride = KM * kMaxCB;
  std::vector<State> states(p.units);
  std::vector<double> part(njobs * stride);
  auto combine = [&](int64_t u, double* s, int K) {
    for (int64_t i = 0; i < K * kMaxCB; ++i) s[i] = 0.0;
    for (int64_t c = 0; c < p.nchunk; ++c) {
      const double* q = part.data() + (u * p.nchunk + c) * stride;
      for (int64_t i = 0; i < K * kMaxCB; ++i) s[i] += q[i];
    }
  };
  auto rows = [&](int64_t job, int64_t& r0, int64_t& r1) {
    r0 = std::min(R, (job % p.nchunk) * p.chunk);
    r1 = std::min(R, r0 + p.chunk);
  };
#pragma omp parallel if (p.parallel)
  {
    int64_t r0, r1;
#pragma omp for schedule(static)
    for (int64_t job = 0; job < njobs; ++job) {
      rows(job, r0, r1);
      red1(job / p.nchunk, r0, r1, part.data() + job * stride);
    }
#pragma omp for schedule(static)
    for (int64_t u = 0; u < p.units; ++u) {
      double s[KM * kMaxCB];
      combine(u, s, K1);
      fin1(u, static_cast<const double*>(s), states[u]);
    }
    if constexpr (K2 > 0) {
#pragma omp for schedule(static)
      for (int64_t job = 0; job < njobs; ++job) {
        rows(job, r0, r1);
        red2(job / p.nchunk, r0, r1, static_cast<const State&>(states[job / p.nchunk]),
             part.data() + job * stride);
      }
#pragma omp for schedule(static)
      for (int64_t u = 0; u < p.units; ++u) {
        double s[KM * kMaxCB];
        combine(u, s, K2);
        fin2(u, static_cast<const double*>(s), states[u]);
      }
    }
#pragma omp for schedule(static)
    for (int64_t job = 0; job < njobs; ++job) {
      rows(job, r0, r1);
      write(job / p.nchunk, r0, r1, static_cast<const State&>(states[job / p.nchunk]));
    }
  }
}

// Job functions: the [T,R,C] pointers point at (task t, first row, channel c0) (rows are C
// apart), nrows rows, n channels (n <= kMaxCB); sums go to s[k * kMaxCB + j].

// ----------------------------------------------------------------------------- bn_fwd

template <typename T>
IMAML_JOB void fwd_sum_job(const T* __restrict x, int64_t nrows, int64_t C, int64_t n,
                           double* __restrict s) {
  double a[kMaxCB];
  for (int64_t j = 0; j < n; ++j) a[j] = 0.0;
  for (int64_t r = 0; r < nrows; ++r) {
    const T* xr = x + r * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) a[j] += double(xr[j]);
  }
  for (int64_t j = 0; j < n; ++j) s[j] = a[j];
}

template <typename T>
IMAML_JOB void fwd_sq_job(const T* __restrict x, int64_t nrows, int64_t C, int64_t n,
                          const double* __restrict mu, double* __restrict s) {
  double a[kMaxCB], m[kMaxCB];
  for (int64_t j = 0; j < n; ++j) {
    a[j] = 0.0;
    m[j] = mu[j];
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const T* xr = x + r * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const double d = double(xr[j]) - m[j];
      a[j] += d * d;
    }
  }
  for (int64_t j = 0; j < n; ++j) s[j] = a[j];
}

template <typename T, bool Relu>
IMAML_JOB void fwd_write_job(const T* __restrict x, T* __restrict y, T* __restrict xhat,
                             int64_t nrows, int64_t C, int64_t n, const T* __restrict mu,
                             const T* __restrict rs, const T* __restrict gamma,
                             const T* __restrict beta) {
  T m[kMaxCB], r_[kMaxCB], g[kMaxCB], b[kMaxCB];
  for (int64_t j = 0; j < n; ++j) {
    m[j] = mu[j];
    r_[j] = rs[j];
    g[j] = gamma[j];
    b[j] = beta[j];
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    T* hr = xhat + r * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T h = (xr[j] - m[j]) * r_[j];
      hr[j] = h;
      const T v = g[j] * h + b[j];
      yr[j] = Relu ? v * T(__builtin_isgreater(v, T(0))) : v;  // NaN stays NaN, as in torch.relu
    }
  }
}

template <typename T>
struct FwdState {
  double mu[kMaxCB];
  T mu_t[kMaxCB], r_t[kMaxCB];
};

template <typename T, bool Relu>
void bn_fwd_impl(const T* x, const T* gamma, const T* beta, T* y, T* xhat, T* rstd, int64_t nt,
                 int64_t R, int64_t C, double eps) {
  const Plan p = make_plan(nt, R, C);
  const double inv_r = R > 0 ? 1.0 / double(R) : 0.0;
  auto at = [&](int64_t u, int64_t r0) { return p.t(u) * R * C + r0 * C + p.c0(u); };
  auto tc = [&](int64_t u) { return p.t(u) * C + p.c0(u); };
  run_bn<1, 1, FwdState<T>>(
      p, R,
      [&](int64_t u, int64_t r0, int64_t r1, double* s) {
        fwd_sum_job<T>(x + at(u, r0), r1 - r0, C, p.n(u), s);
      },
      [&](int64_t u, const double* s, FwdState<T>& st) {
        for (int64_t j = 0; j < p.n(u); ++j) st.mu[j] = s[j] * inv_r;
      },
      [&](int64_t u, int64_t r0, int64_t r1, const FwdState<T>& st, double* s) {
        fwd_sq_job<T>(x + at(u, r0), r1 - r0, C, p.n(u), st.mu, s);
      },
      [&](int64_t u, const double* s, FwdState<T>& st) {
        for (int64_t j = 0; j < p.n(u); ++j) {
          const double r = 1.0 / std::sqrt(s[j] * inv_r + eps);  // biased variance
          rstd[tc(u) + j] = T(r);
          st.r_t[j] = T(r);
          st.mu_t[j] = T(st.mu[j]);
        }
      },
      [&](int64_t u, int64_t r0, int64_t r1, const FwdState<T>& st) {
        fwd_write_job<T, Relu>(x + at(u, r0), y + at(u, r0), xhat + at(u, r0), r1 - r0, C, p.n(u),
                               st.mu_t, st.r_t, gamma + tc(u), beta + tc(u));
      });
}

// ----------------------------------------------------------------------------- bn_bwd

template <typename T, bool Masked>
IMAML_JOB void bwd_sum_job(const T* __restrict gy, const T* __restrict xhat,
                           const T* __restrict relu_y, int64_t nrows, int64_t C, int64_t n,
                           double* __restrict s) {
  double sg[kMaxCB], sgx[kMaxCB];
  for (int64_t j = 0; j < n; ++j) sg[j] = sgx[j] = 0.0;
  for (int64_t r = 0; r < nrows; ++r) {
    const T* gr = gy + r * C;
    const T* hr = xhat + r * C;
    const T* mr = Masked ? relu_y + r * C : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const double g = double(gate<Masked>(gr[j], mr, j));
      sg[j] += g;
      sgx[j] += g * double(hr[j]);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    s[j] = sg[j];
    s[kMaxCB + j] = sgx[j];
  }
}

template <typename T, bool Masked>
IMAML_JOB void bwd_write_job(const T* __restrict gy, const T* __restrict xhat,
                             const T* __restrict relu_y, T* __restrict gx, int64_t nrows,
                             int64_t C, int64_t n, const T* __restrict mg_,
                             const T* __restrict mgx_, const T* __restrict coef_) {
  T mg[kMaxCB], mgx[kMaxCB], coef[kMaxCB];
  for (int64_t j = 0; j < n; ++j) {
    mg[j] = mg_[j];
    mgx[j] = mgx_[j];
    coef[j] = coef_[j];
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const T* gr = gy + r * C;
    const T* hr = xhat + r * C;
    const T* mr = Masked ? relu_y + r * C : nullptr;
    T* out = gx + r * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T g = gate<Masked>(gr[j], mr, j);
      out[j] = coef[j] * ((g - mg[j]) - hr[j] * mgx[j]);
    }
  }
}

template <typename T>
struct BwdState {
  T mg[kMaxCB], mgx[kMaxCB], coef[kMaxCB];
};

template <typename T, bool Masked>
void bn_bwd_impl(const T* gy, const T* xhat, const T* rstd, const T* gamma, const T* relu_y, T* gx,
                 T* ggamma, T* gbeta, int64_t nt, int64_t R, int64_t C) {
  const Plan p = make_plan(nt, R, C);
  const double inv_r = R > 0 ? 1.0 / double(R) : 0.0;
  auto at = [&](int64_t u, int64_t r0) { return p.t(u) * R * C + r0 * C + p.c0(u); };
  auto tc = [&](int64_t u) { return p.t(u) * C + p.c0(u); };
  auto mask = [&](int64_t u, int64_t r0) { return Masked ? relu_y + at(u, r0) : nullptr; };
  run_bn<2, 0, BwdState<T>>(
      p, R,
      [&](int64_t u, int64_t r0, int64_t r1, double* s) {
        bwd_sum_job<T, Masked>(gy + at(u, r0), xhat + at(u, r0), mask(u, r0), r1 - r0, C, p.n(u), s);
      },
      // gx = rstd gamma ((g - mean(g)) - xhat mean(g xhat)); ggamma = sum g xhat; gbeta = sum g
      [&](int64_t u, const double* s, BwdState<T>& st) {
        for (int64_t j = 0; j < p.n(u); ++j) {
          const int64_t k = tc(u) + j;
          ggamma[k] = T(s[kMaxCB + j]);
          gbeta[k] = T(s[j]);
          st.mg[j] = T(s[j] * inv_r);
          st.mgx[j] = T(s[kMaxCB + j] * inv_r);
          st.coef[j] = T(double(rstd[k]) * double(gamma[k]));
        }
      },
      NoStage(), NoStage(),
      [&](int64_t u, int64_t r0, int64_t r1, const BwdState<T>& st) {
        bwd_write_job<T, Masked>(gy + at(u, r0), xhat + at(u, r0), mask(u, r0), gx + at(u, r0),
                                 r1 - r0, C, p.n(u), st.mg, st.mgx, st.coef);
      });
}

// ----------------------------------------------------------------------------- bn_tfwd

template <typename T>
IMAML_JOB void tfwd_sum_job(const T* __restrict rx, const T* __restrict xhat, int64_t nrows,
                            int64_t C, int64_t n, double* __restrict s) {
  double srx[kMaxCB], sxrx[kMaxCB];
  for (int64_t j = 0; j < n; ++j) srx[j] = sxrx[j] = 0.0;
  for (int64_t r = 0; r < nrows; ++r) {
    const T* vr = rx + r * C;
    const T* hr = xhat + r * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const double v = double(vr[j]);
      srx[j] += v;
      sxrx[j] += v * double(hr[j]);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    s[j] = srx[j];
    s[kMaxCB + j] = sxrx[j];
  }
}

template <typename T>
struct TfwdState {
  T mrx[kMaxCB], a[kMaxCB], r[kMaxCB], g[kMaxCB], rg[kMaxCB], rb[kMaxCB];
};

template <typename T, bool Masked>
IMAML_JOB void tfwd_write_job(const T* __restrict rx, const T* __restrict xhat,
                              const T* __restrict relu_y, T* __restrict ry, T* __restrict rxhat,
                              int64_t nrows, int64_t C, int64_t n, const TfwdState<T>* __restrict st) {
  T mrx[kMaxCB], a[kMaxCB], r_[kMaxCB], g[kMaxCB], rg[kMaxCB], rb[kMaxCB];
  for (int64_t j = 0; j < n; ++j) {
    mrx[j] = st->mrx[j];
    a[j] = st->a[j];
    r_[j] = st->r[j];
    g[j] = st->g[j];
    rg[j] = st->rg[j];
    rb[j] = st->rb[j];
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const T* vr = rx + r * C;
    const T* hr = xhat + r * C;
    const T* mr = Masked ? relu_y + r * C : nullptr;
    T* rhr = rxhat + r * C;
    T* yr = ry + r * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T h = hr[j];
      const T rh = r_[j] * ((vr[j] - mrx[j]) - h * a[j]);
      rhr[j] = rh;
      yr[j] = gate<Masked>(rg[j] * h + g[j] * rh + rb[j], mr, j);
    }
  }
}

template <typename T, bool Masked>
void bn_tfwd_impl(const T* rx, const T* xhat, const T* rstd, const T* gamma, const T* rgamma,
                  const T* rbeta, const T* relu_y, T* ry, T* rxhat, T* a, int64_t nt, int64_t R,
                  int64_t C) {
  const Plan p = make_plan(nt, R, C);
  const double inv_r = R > 0 ? 1.0 / double(R) : 0.0;
  auto at = [&](int64_t u, int64_t r0) { return p.t(u) * R * C + r0 * C + p.c0(u); };
  auto tc = [&](int64_t u) { return p.t(u) * C + p.c0(u); };
  run_bn<2, 0, TfwdState<T>>(
      p, R,
      [&](int64_t u, int64_t r0, int64_t r1, double* s) {
        tfwd_sum_job<T>(rx + at(u, r0), xhat + at(u, r0), r1 - r0, C, p.n(u), s);
      },
      // a = mean(xhat rx); rxhat = rstd ((rx - mean(rx)) - xhat a);
      // ry = gate(rgamma xhat + gamma rxhat + rbeta)
      [&](int64_t u, const double* s, TfwdState<T>& st) {
        for (int64_t j = 0; j < p.n(u); ++j) {
          const int64_t k = tc(u) + j;
          const double aj = s[kMaxCB + j] * inv_r;
          a[k] = T(aj);
          st.a[j] = T(aj);
          st.mrx[j] = T(s[j] * inv_r);
          st.r[j] = rstd[k];
          st.g[j] = gamma[k];
          st.rg[j] = rgamma[k];
          st.rb[j] = rbeta[k];
        }
      },
      NoStage(), NoStage(),
      [&](int64_t u, int64_t r0, int64_t r1, const TfwdState<T>& st) {
        tfwd_write_job<T, Masked>(rx + at(u, r0), xhat + at(u, r0),
                                  Masked ? relu_y + at(u, r0) : nullptr, ry + at(u, r0),
                                  rxhat + at(u, r0), r1 - r0, C, p.n(u), &st);
      });
}

// ----------------------------------------------------------------------------- bn_tbwd

template <typename T, bool Masked>
IMAML_JOB void tbwd_sum_job(const T* __restrict gy, const T* __restrict rgy,
                            const T* __restrict xhat, const T* __restrict rxhat,
                            const T* __restrict relu_y, int64_t nrows, int64_t C, int64_t n,
                            double* __restrict s) {
  // Sums over the rows of g, g xhat, rg, rg xhat, g rxhat (g, rg: gated gy, rgy).
  double sg[kMaxCB], sgx[kMaxCB], srg[kMaxCB], srgx[kMaxCB], sgrx[kMaxCB];
  for (int64_t j = 0; j < n; ++j) sg[j] = sgx[j] = srg[j] = srgx[j] = sgrx[j] = 0.0;
  for (int64_t r = 0; r < nrows; ++r) {
    const T* gr = gy + r * C;
    const T* rgr = rgy + r * C;
    const T* hr = xhat + r * C;
    const T* rhr = rxhat + r * C;
    const T* mr = Masked ? relu_y + r * C : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const double g = double(gate<Masked>(gr[j], mr, j));
      const double rg = double(gate<Masked>(rgr[j], mr, j));
      const double h = double(hr[j]), rh = double(rhr[j]);
      sg[j] += g;
      sgx[j] += g * h;
      srg[j] += rg;
      srgx[j] += rg * h;
      sgrx[j] += g * rh;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    s[j] = sg[j];
    s[kMaxCB + j] = sgx[j];
    s[2 * kMaxCB + j] = srg[j];
    s[3 * kMaxCB + j] = srgx[j];
    s[4 * kMaxCB + j] = sgrx[j];
  }
}

template <typename T>
struct TbwdState {
  T mg[kMaxCB], mrg[kMaxCB], cg[kMaxCB], crg[kMaxCB], crh[kMaxCB], ch[kMaxCB];
};

template <typename T, bool Masked>
IMAML_JOB void tbwd_write_job(const T* __restrict gy, const T* __restrict rgy,
                              const T* __restrict xhat, const T* __restrict rxhat,
                              const T* __restrict relu_y, T* __restrict rgx, int64_t nrows,
                              int64_t C, int64_t n, const TbwdState<T>* __restrict st) {
  T mg[kMaxCB], mrg[kMaxCB], cg[kMaxCB], crg[kMaxCB], crh[kMaxCB], ch[kMaxCB];
  for (int64_t j = 0; j < n; ++j) {
    mg[j] = st->mg[j];
    mrg[j] = st->mrg[j];
    cg[j] = st->cg[j];
    crg[j] = st->crg[j];
    crh[j] = st->crh[j];
    ch[j] = st->ch[j];
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const T* gr = gy + r * C;
    const T* rgr = rgy + r * C;
    const T* hr = xhat + r * C;
    const T* rhr = rxhat + r * C;
    const T* mr = Masked ? relu_y + r * C : nullptr;
    T* out = rgx + r * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T g = gate<Masked>(gr[j], mr, j);
      const T rg = gate<Masked>(rgr[j], mr, j);
      out[j] = cg[j] * (g - mg[j]) + crg[j] * (rg - mrg[j]) + crh[j] * rhr[j] + ch[j] * hr[j];
    }
  }
}

template <typename T, bool Masked>
void bn_tbwd_impl(const T* gy, const T* rgy, const T* xhat, const T* rxhat, const T* rstd, const T* a,
                  const T* gamma, const T* rgamma, const T* relu_y, T* rgx, T* rggamma, T* rgbeta,
                  int64_t nt, int64_t R, int64_t C) {
  const Plan p = make_plan(nt, R, C);
  const double inv_r = R > 0 ? 1.0 / double(R) : 0.0;
  auto at = [&](int64_t u, int64_t r0) { return p.t(u) * R * C + r0 * C + p.c0(u); };
  auto tc = [&](int64_t u) { return p.t(u) * C + p.c0(u); };
  auto mask = [&](int64_t u, int64_t r0) { return Masked ? relu_y + at(u, r0) : nullptr; };
  run_bn<5, 0, TbwdState<T>>(
      p, R,
      [&](int64_t u, int64_t r0, int64_t r1, double* s) {
        tbwd_sum_job<T, Masked>(gy + at(u, r0), rgy + at(u, r0), xhat + at(u, r0), rxhat + at(u, r0),
                                mask(u, r0), r1 - r0, C, p.n(u), s);
      },
      // rgx = -r a gx + r [ rgxh - mean(rgxh) - rxhat m2 - xhat dm2 ], gx = r [ gam (g - mg) - xhat m2 ]:
      // rgx = r [ (rgam - r a gam)(g - mg) + gam (rg - mrg) - rxhat m2 + xhat (r a m2 - dm2) ] with
      // m2 = gam mean(g xhat), dm2 = gam mean(rg xhat) + rgam mean(g xhat) + gam mean(g rxhat).
      [&](int64_t u, const double* s, TbwdState<T>& st) {
        for (int64_t j = 0; j < p.n(u); ++j) {
          const int64_t k = tc(u) + j;
          const double sg = s[j], sgx = s[kMaxCB + j], srg = s[2 * kMaxCB + j];
          const double srgx = s[3 * kMaxCB + j], sgrx = s[4 * kMaxCB + j];
          const double r = double(rstd[k]), aj = double(a[k]);
          const double gam = double(gamma[k]), rgam = double(rgamma[k]);
          const double m2 = gam * sgx * inv_r;
          const double dm2 = (gam * (srgx + sgrx) + rgam * sgx) * inv_r;
          rggamma[k] = T(srgx + sgrx);
          rgbeta[k] = T(srg);
          st.mg[j] = T(sg * inv_r);
          st.mrg[j] = T(srg * inv_r);
          st.cg[j] = T(r * (rgam - r * aj * gam));
          st.crg[j] = T(r * gam);
          st.crh[j] = T(-r * m2);
          st.ch[j] = T(r * (r * aj * m2 - dm2));
        }
      },
      NoStage(), NoStage(),
      [&](int64_t u, int64_t r0, int64_t r1, const TbwdState<T>& st) {
        tbwd_write_job<T, Masked>(gy + at(u, r0), rgy + at(u, r0), xhat + at(u, r0),
                                  rxhat + at(u, r0), mask(u, r0), rgx + at(u, r0), r1 - r0, C,
                                  p.n(u), &st);
      });
}

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

template <typename T>
void prox_step_impl(T* phi, const T* grad, const T* theta, int64_t theta_stride, const T* lam,
                    double lr, int64_t nt, int64_t P) {
  constexpr int64_t kChunk = 16384;
  const int64_t nb = (P + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (nt * P >= kParallelMin)
  for (int64_t job = 0; job < nt * nb; ++job) {
    const int64_t t = job / nb, lo = (job % nb) * kChunk, n = std::min(P - lo, kChunk);
    prox_step_job<T>(phi + t * P + lo, grad + t * P + lo, theta + t * theta_stride + lo, lam[t],
                     T(lr), n);
  }
}

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

template <typename T>
const T* cp(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* mp(void* p) {
  return static_cast<T*>(p);
}

void check_sizes(const char* name, std::initializer_list<int64_t> sizes) {
  for (int64_t v : sizes)
    if (v < 0) throw std::invalid_argument(std::string(name) + ": negative size");
}

}  // namespace

// ----------------------------------------------------------------------------- entry points

#define IMAML_DISPATCH(dtype, ...)                 \
  do {                                             \
    if ((dtype) == DType::kFloat32) {              \
      using scalar_t = float;                      \
      __VA_ARGS__;                                 \
    } else {                                       \
      using scalar_t = double;                     \
      __VA_ARGS__;                                 \
    }                                              \
  } while (0)

void bn_fwd_cpu(DType dtype, const void* x, const void* gamma, const void* beta, void* y, void* xhat,
                void* rstd, int64_t T, int64_t R, int64_t C, double eps, bool relu) {
  check_sizes("bn_fwd_cpu", {T, R, C});
  IMAML_DISPATCH(dtype, {
    auto f = relu ? bn_fwd_impl<scalar_t, true> : bn_fwd_impl<scalar_t, false>;
    f(cp<scalar_t>(x), cp<scalar_t>(gamma), cp<scalar_t>(beta), mp<scalar_t>(y), mp<scalar_t>(xhat),
      mp<scalar_t>(rstd), T, R, C, eps);
  });
}

void bn_bwd_cpu(DType dtype, const void* gy, const void* xhat, const void* rstd, const void* gamma,
                const void* relu_y, void* gx, void* ggamma, void* gbeta, int64_t T, int64_t R,
                int64_t C) {
  check_sizes("bn_bwd_cpu", {T, R, C});
  IMAML_DISPATCH(dtype, {
    auto f = relu_y ? bn_bwd_impl<scalar_t, true> : bn_bwd_impl<scalar_t, false>;
    f(cp<scalar_t>(gy), cp<scalar_t>(xhat), cp<scalar_t>(rstd), cp<scalar_t>(gamma),
      cp<scalar_t>(relu_y), mp<scalar_t>(gx), mp<scalar_t>(ggamma), mp<scalar_t>(gbeta), T, R, C);
  });
}

void bn_tfwd_cpu(DType dtype, const void* rx, const void* xhat, const void* rstd, const void* gamma,
                 const void* rgamma, const void* rbeta, const void* relu_y, void* ry, void* rxhat,
                 void* a, int64_t T, int64_t R, int64_t C) {
  check_sizes("bn_tfwd_cpu", {T, R, C});
  IMAML_DISPATCH(dtype, {
    auto f = relu_y ? bn_tfwd_impl<scalar_t, true> : bn_tfwd_impl<scalar_t, false>;
    f(cp<scalar_t>(rx), cp<scalar_t>(xhat), cp<scalar_t>(rstd), cp<scalar_t>(gamma),
      cp<scalar_t>(rgamma), cp<scalar_t>(rbeta), cp<scalar_t>(relu_y), mp<scalar_t>(ry),
      mp<scalar_t>(rxhat), mp<scalar_t>(a), T, R, C);
  });
}

void bn_tbwd_cpu(DType dtype, const void* gy, const void* rgy, const void* xhat, const void* rxhat,
                 const void* rstd, const void* a, const void* gamma, const void* rgamma,
                 const void* relu_y, void* rgx, void* rggamma, void* rgbeta, int64_t T, int64_t R,
                 int64_t C) {
  check_sizes("bn_tbwd_cpu", {T, R, C});
  IMAML_DISPATCH(dtype, {
    auto f = relu_y ? bn_tbwd_impl<scalar_t, true> : bn_tbwd_impl<scalar_t, false>;
    f(cp<scalar_t>(gy), cp<scalar_t>(rgy), cp<scalar_t>(xhat), cp<scalar_t>(rxhat),
      cp<scalar_t>(rstd), cp<scalar_t>(a), cp<scalar_t>(gamma), cp<scalar_t>(rgamma),
      cp<scalar_t>(relu_y), mp<scalar_t>(rgx), mp<scalar_t>(rggamma), mp<scalar_t>(rgbeta), T, R, C);
  });
}

void prox_step_cpu(DType dtype, void* phi, const void* grad, const void* theta,
                   int64_t theta_task_stride, const void* lam, double lr, int64_t T, int64_t P) {
  check_sizes("prox_step_cpu", {T, P, theta_task_stride});
  IMAML_DISPATCH(dtype, prox_step_impl(mp<scalar_t>(phi), cp<scalar_t>(grad), cp<scalar_t>(theta),
                                       theta_task_stride, cp<scalar_t>(lam), lr, T, P));
}

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

void softmax_ce_cpu(DType dtype, const void* logits, const int64_t* y, void* loss, void* prob,
                    void* grad, int64_t T, int64_t N, int64_t K) {
  check_sizes("softmax_ce_cpu", {T, N, K});
  if (N == 0 || K == 0) throw std::invalid_argument("softmax_ce_cpu: N and K must be positive");
  IMAML_DISPATCH(dtype, softmax_ce_impl(cp<scalar_t>(logits), y, mp<scalar_t>(loss),
                                        mp<scalar_t>(prob), mp<scalar_t>(grad), T, N, K));
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
