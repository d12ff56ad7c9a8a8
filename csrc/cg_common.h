// Per-task scalar logic of the fused conjugate-gradient iteration, shared by the CPU
// and CUDA kernels (and mirrored line by line in imaml_kernels/reference.py).
//
// One CG iteration for task t, given the dot products of the current r, p and Ap = A p:
//   rr = r.r, pAp = p.Ap, rAp = r.Ap, ApAp = Ap.Ap       (one fused reduction pass)
//   alpha = rr / pAp
//   rr_new = rr - 2 alpha rAp + alpha^2 ApAp             (= |r - alpha Ap|^2, no extra pass)
//   beta = rr_new / rr
//   x += alpha p;  r -= alpha Ap;  p = r + beta p         (one fused update pass)
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define IMAML_HD __host__ __device__ __forceinline__
#else
#define IMAML_HD inline
#endif

namespace imaml {

// Status codes kept per task between iterations (int32).
constexpr int32_t kCgActive = 0;
constexpr int32_t kCgConverged = 1;  // relative residual <= tol: the task stops updating
constexpr int32_t kCgBreakdown = 2;  // p.Ap <= 0 or a non-finite value: frozen at its last good iterate

// Number of doubles per (task, block) partial: rr, pAp, rAp, ApAp.
constexpr int kCgDots = 4;

struct CgStep {
  double alpha;
  double beta;
  int32_t status;
  bool update;
};

// Finite test without <cmath> so the same code compiles for host and device:
// inf - inf and NaN - NaN are NaN, which compares unequal to 0.
IMAML_HD bool cg_finite(double v) { return v - v == 0.0; }

IMAML_HD CgStep cg_step(double rr, double pAp, double rAp, double ApAp, double thresh,
                        int32_t status_in) {
  CgStep s{0.0, 0.0, status_in, false};
  if (status_in == kCgBreakdown) return s;  // sticky: a broken task never moves again
  const bool finite = cg_finite(rr) && cg_finite(pAp) && cg_finite(rAp) && cg_finite(ApAp);
  // rr == 0 counts as converged even for tol = 0, which also avoids alpha = 0/0.
  if (finite && rr <= thresh) {
    s.status = kCgConverged;
    return s;
  }
  // Guard against negative curvature (A not SPD for this task) and NaN/inf.
  if (!finite || !(pAp > 0.0)) {
    s.status = kCgBreakdown;
    return s;
  }
  const double alpha = rr / pAp;
  double rr_new = rr - 2.0 * alpha * rAp + alpha * alpha * ApAp;
  // Cancellation can make the estimate slightly negative near convergence: clamp it to 0, but
  // keep NaN (inf - inf when alpha is huge), so that beta is NaN and the task breaks down, as
  // in the reference (clamp_min) and the Triton kernel.
  rr_new = rr_new < 0.0 ? 0.0 : rr_new;
  const double beta = rr_new / rr;
  if (!cg_finite(alpha) || !cg_finite(beta)) {
    s.status = kCgBreakdown;
    return s;
  }
  s.alpha = alpha;
  s.beta = beta;
  s.status = kCgActive;
  s.update = true;
  return s;
}

}  // namespace imaml
