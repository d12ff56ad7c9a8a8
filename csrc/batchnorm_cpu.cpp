// CPU kernels of BatchNorm (batch statistics) + ReLU: forward, backward and their
// tangents (engine.h; formulas in imaml_kernels/reference/batchnorm.py).
//
// BatchNorm kernels: one OpenMP job per (task, block of <= 64 channels). A job walks the R
// rows of its block with the channel loop innermost (contiguous, vectorised), keeping
// float64 per-channel sums in local arrays, then makes one writing pass. With fewer than two
// such units per thread the rows are split among the threads instead (see run_bn). Splitting
// the channels finer was measured slower: strided partial rows waste cache lines and sets.

#include "cpu_common.h"

namespace imaml {
namespace {

constexpr int64_t kMaxCB = 64;  // channels per job at most (size of the local sum arrays)

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
                 int64_t R, int64_t C, int64_t ps, double eps) {
  const Plan p = make_plan(nt, R, C);
  const double inv_r = R > 0 ? 1.0 / double(R) : 0.0;
  auto at = [&](int64_t u, int64_t r0) { return p.t(u) * R * C + r0 * C + p.c0(u); };
  auto tc = [&](int64_t u) { return p.t(u) * C + p.c0(u); };   // rstd, a: [T, C]
  auto tp = [&](int64_t u) { return p.t(u) * ps + p.c0(u); };  // parameter-like: row stride ps
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
                               st.mu_t, st.r_t, gamma + tp(u), beta + tp(u));
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
                 T* ggamma, T* gbeta, int64_t nt, int64_t R, int64_t C, int64_t ps) {
  const Plan p = make_plan(nt, R, C);
  const double inv_r = R > 0 ? 1.0 / double(R) : 0.0;
  auto at = [&](int64_t u, int64_t r0) { return p.t(u) * R * C + r0 * C + p.c0(u); };
  auto tc = [&](int64_t u) { return p.t(u) * C + p.c0(u); };   // rstd, a: [T, C]
  auto tp = [&](int64_t u) { return p.t(u) * ps + p.c0(u); };  // parameter-like: row stride ps
  auto mask = [&](int64_t u, int64_t r0) { return Masked ? relu_y + at(u, r0) : nullptr; };
  run_bn<2, 0, BwdState<T>>(
      p, R,
      [&](int64_t u, int64_t r0, int64_t r1, double* s) {
        bwd_sum_job<T, Masked>(gy + at(u, r0), xhat + at(u, r0), mask(u, r0), r1 - r0, C, p.n(u), s);
      },
      // gx = rstd gamma ((g - mean(g)) - xhat mean(g xhat)); ggamma = sum g xhat; gbeta = sum g
      [&](int64_t u, const double* s, BwdState<T>& st) {
        for (int64_t j = 0; j < p.n(u); ++j) {
          const int64_t k = tc(u) + j, q = tp(u) + j;
          ggamma[q] = T(s[kMaxCB + j]);
          gbeta[q] = T(s[j]);
          st.mg[j] = T(s[j] * inv_r);
          st.mgx[j] = T(s[kMaxCB + j] * inv_r);
          st.coef[j] = T(double(rstd[k]) * double(gamma[q]));
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
                  int64_t C, int64_t ps) {
  const Plan p = make_plan(nt, R, C);
  const double inv_r = R > 0 ? 1.0 / double(R) : 0.0;
  auto at = [&](int64_t u, int64_t r0) { return p.t(u) * R * C + r0 * C + p.c0(u); };
  auto tc = [&](int64_t u) { return p.t(u) * C + p.c0(u); };   // rstd, a: [T, C]
  auto tp = [&](int64_t u) { return p.t(u) * ps + p.c0(u); };  // parameter-like: row stride ps
  run_bn<2, 0, TfwdState<T>>(
      p, R,
      [&](int64_t u, int64_t r0, int64_t r1, double* s) {
        tfwd_sum_job<T>(rx + at(u, r0), xhat + at(u, r0), r1 - r0, C, p.n(u), s);
      },
      // a = mean(xhat rx); rxhat = rstd ((rx - mean(rx)) - xhat a);
      // ry = gate(rgamma xhat + gamma rxhat + rbeta)
      [&](int64_t u, const double* s, TfwdState<T>& st) {
        for (int64_t j = 0; j < p.n(u); ++j) {
          const int64_t k = tc(u) + j, q = tp(u) + j;
          const double aj = s[kMaxCB + j] * inv_r;
          a[k] = T(aj);
          st.a[j] = T(aj);
          st.mrx[j] = T(s[j] * inv_r);
          st.r[j] = rstd[k];
          st.g[j] = gamma[q];
          st.rg[j] = rgamma[q];
          st.rb[j] = rbeta[q];
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
                  int64_t nt, int64_t R, int64_t C, int64_t ps) {
  const Plan p = make_plan(nt, R, C);
  const double inv_r = R > 0 ? 1.0 / double(R) : 0.0;
  auto at = [&](int64_t u, int64_t r0) { return p.t(u) * R * C + r0 * C + p.c0(u); };
  auto tc = [&](int64_t u) { return p.t(u) * C + p.c0(u); };   // rstd, a: [T, C]
  auto tp = [&](int64_t u) { return p.t(u) * ps + p.c0(u); };  // parameter-like: row stride ps
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
          const int64_t k = tc(u) + j, q = tp(u) + j;
          const double sg = s[j], sgx = s[kMaxCB + j], srg = s[2 * kMaxCB + j];
          const double srgx = s[3 * kMaxCB + j], sgrx = s[4 * kMaxCB + j];
          const double r = double(rstd[k]), aj = double(a[k]);
          const double gam = double(gamma[q]), rgam = double(rgamma[q]);
          const double m2 = gam * sgx * inv_r;
          const double dm2 = (gam * (srgx + sgrx) + rgam * sgx) * inv_r;
          rggamma[q] = T(srgx + sgrx);
          rgbeta[q] = T(srg);
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


void check_stride(const char* name, int64_t T, int64_t C, int64_t ps) {
  if (T > 1 && ps < C) throw std::invalid_argument(std::string(name) + ": parameter row stride below C");
}

}  // namespace

void bn_fwd_cpu(DType dtype, const void* x, const void* gamma, const void* beta, void* y, void* xhat,
                void* rstd, int64_t T, int64_t R, int64_t C, double eps, bool relu, int64_t ps) {
  check_sizes("bn_fwd_cpu", {T, R, C});
  check_stride("bn_fwd_cpu", T, C, ps);
  IMAML_DISPATCH(dtype, {
    auto f = relu ? bn_fwd_impl<scalar_t, true> : bn_fwd_impl<scalar_t, false>;
    f(cp<scalar_t>(x), cp<scalar_t>(gamma), cp<scalar_t>(beta), mp<scalar_t>(y), mp<scalar_t>(xhat),
      mp<scalar_t>(rstd), T, R, C, ps, eps);
  });
}

void bn_bwd_cpu(DType dtype, const void* gy, const void* xhat, const void* rstd, const void* gamma,
                const void* relu_y, void* gx, void* ggamma, void* gbeta, int64_t T, int64_t R,
                int64_t C, int64_t ps) {
  check_sizes("bn_bwd_cpu", {T, R, C});
  check_stride("bn_bwd_cpu", T, C, ps);
  IMAML_DISPATCH(dtype, {
    auto f = relu_y ? bn_bwd_impl<scalar_t, true> : bn_bwd_impl<scalar_t, false>;
    f(cp<scalar_t>(gy), cp<scalar_t>(xhat), cp<scalar_t>(rstd), cp<scalar_t>(gamma),
      cp<scalar_t>(relu_y), mp<scalar_t>(gx), mp<scalar_t>(ggamma), mp<scalar_t>(gbeta), T, R, C, ps);
  });
}

void bn_tfwd_cpu(DType dtype, const void* rx, const void* xhat, const void* rstd, const void* gamma,
                 const void* rgamma, const void* rbeta, const void* relu_y, void* ry, void* rxhat,
                 void* a, int64_t T, int64_t R, int64_t C, int64_t ps) {
  check_sizes("bn_tfwd_cpu", {T, R, C});
  check_stride("bn_tfwd_cpu", T, C, ps);
  IMAML_DISPATCH(dtype, {
    auto f = relu_y ? bn_tfwd_impl<scalar_t, true> : bn_tfwd_impl<scalar_t, false>;
    f(cp<scalar_t>(rx), cp<scalar_t>(xhat), cp<scalar_t>(rstd), cp<scalar_t>(gamma),
      cp<scalar_t>(rgamma), cp<scalar_t>(rbeta), cp<scalar_t>(relu_y), mp<scalar_t>(ry),
      mp<scalar_t>(rxhat), mp<scalar_t>(a), T, R, C, ps);
  });
}

void bn_tbwd_cpu(DType dtype, const void* gy, const void* rgy, const void* xhat, const void* rxhat,
                 const void* rstd, const void* a, const void* gamma, const void* rgamma,
                 const void* relu_y, void* rgx, void* rggamma, void* rgbeta, int64_t T, int64_t R,
                 int64_t C, int64_t ps) {
  check_sizes("bn_tbwd_cpu", {T, R, C});
  check_stride("bn_tbwd_cpu", T, C, ps);
  IMAML_DISPATCH(dtype, {
    auto f = relu_y ? bn_tbwd_impl<scalar_t, true> : bn_tbwd_impl<scalar_t, false>;
    f(cp<scalar_t>(gy), cp<scalar_t>(rgy), cp<scalar_t>(xhat), cp<scalar_t>(rxhat),
      cp<scalar_t>(rstd), cp<scalar_t>(a), cp<scalar_t>(gamma), cp<scalar_t>(rgamma),
      cp<scalar_t>(relu_y), mp<scalar_t>(rgx), mp<scalar_t>(rggamma), mp<scalar_t>(rgbeta), T, R, C, ps);
  });
}


}  // namespace imaml
