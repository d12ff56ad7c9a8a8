// pybind11 module imaml_kernels._C: thin wrappers that turn integer addresses
// (tensor.data_ptr()) and sizes into kernel calls. No torch headers.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cg.h"
#include "engine.h"

namespace py = pybind11;
using imaml::DType;

namespace {

DType to_dtype(int code) {
  if (code != 0 && code != 1) throw py::value_error("dtype code must be 0 (float32) or 1 (float64)");
  return static_cast<DType>(code);
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "imaml_kernels native kernels (CPU C++ and, when built, CUDA)";

  m.def(
      "cg_dots_cpu",
      [](int dtype, uintptr_t r, uintptr_t p, uintptr_t Ap, uintptr_t partials, int64_t ntasks,
         int64_t n, int64_t chunk) {
        py::gil_scoped_release nogil;
        imaml::cg_dots_cpu(to_dtype(dtype), ptr<const void>(r), ptr<const void>(p),
                           ptr<const void>(Ap), ptr<double>(partials), ntasks, n, chunk);
      },
      "Per-block dot products (rr, pAp, rAp, ApAp) into partials [T, NB, 4] float64.");
  m.def(
      "cg_update_cpu",
      [](int dtype, uintptr_t x, uintptr_t r, uintptr_t p, uintptr_t Ap, uintptr_t partials,
         uintptr_t status_in, uintptr_t status_out, uintptr_t iters, uintptr_t thresh,
         int64_t ntasks, int64_t n, int64_t chunk) {
        py::gil_scoped_release nogil;
        imaml::cg_update_cpu(to_dtype(dtype), ptr<void>(x), ptr<void>(r), ptr<void>(p),
                             ptr<const void>(Ap), ptr<const double>(partials),
                             ptr<const int32_t>(status_in), ptr<int32_t>(status_out),
                             ptr<int32_t>(iters), ptr<const double>(thresh), ntasks, n, chunk);
      },
      "Fused x += a p; r -= a Ap; p = r + b p with per-task a, b from the partials.");

  // ---- the engine's fused elementwise stages (engine.h); relu_y = 0 means no ReLU mask.
  m.def(
      "bn_fwd_cpu",
      [](int dtype, uintptr_t x, uintptr_t gamma, uintptr_t beta, uintptr_t y, uintptr_t xhat,
         uintptr_t rstd, int64_t T, int64_t R, int64_t C, double eps, bool relu, int64_t ps) {
        py::gil_scoped_release nogil;
        imaml::bn_fwd_cpu(to_dtype(dtype), ptr<const void>(x), ptr<const void>(gamma),
                          ptr<const void>(beta), ptr<void>(y), ptr<void>(xhat), ptr<void>(rstd), T,
                          R, C, eps, relu, ps ? ps : C);
      },
      py::arg("dtype"), py::arg("x"), py::arg("gamma"), py::arg("beta"), py::arg("y"),
      py::arg("xhat"), py::arg("rstd"), py::arg("T"), py::arg("R"), py::arg("C"), py::arg("eps"),
      py::arg("relu"), py::arg("ps") = 0,
      "BatchNorm forward over x [T,R,C]: y, xhat [T,R,C], rstd [T,C] (batch statistics).");
  m.def(
      "bn_bwd_cpu",
      [](int dtype, uintptr_t gy, uintptr_t xhat, uintptr_t rstd, uintptr_t gamma, uintptr_t relu_y,
         uintptr_t gx, uintptr_t ggamma, uintptr_t gbeta, int64_t T, int64_t R, int64_t C,
         int64_t ps) {
        py::gil_scoped_release nogil;
        imaml::bn_bwd_cpu(to_dtype(dtype), ptr<const void>(gy), ptr<const void>(xhat),
                          ptr<const void>(rstd), ptr<const void>(gamma), ptr<const void>(relu_y),
                          ptr<void>(gx), ptr<void>(ggamma), ptr<void>(gbeta), T, R, C, ps ? ps : C);
      },
      py::arg("dtype"), py::arg("gy"), py::arg("xhat"), py::arg("rstd"), py::arg("gamma"),
      py::arg("relu_y"), py::arg("gx"), py::arg("ggamma"), py::arg("gbeta"), py::arg("T"),
      py::arg("R"), py::arg("C"), py::arg("ps") = 0, "BatchNorm backward: gx [T,R,C], ggamma, gbeta [T,C].");
  m.def(
      "bn_tfwd_cpu",
      [](int dtype, uintptr_t rx, uintptr_t xhat, uintptr_t rstd, uintptr_t gamma, uintptr_t rgamma,
         uintptr_t rbeta, uintptr_t relu_y, uintptr_t ry, uintptr_t rxhat, uintptr_t a, int64_t T,
         int64_t R, int64_t C, int64_t ps) {
        py::gil_scoped_release nogil;
        imaml::bn_tfwd_cpu(to_dtype(dtype), ptr<const void>(rx), ptr<const void>(xhat),
                           ptr<const void>(rstd), ptr<const void>(gamma), ptr<const void>(rgamma),
                           ptr<const void>(rbeta), ptr<const void>(relu_y), ptr<void>(ry),
                           ptr<void>(rxhat), ptr<void>(a), T, R, C, ps ? ps : C);
      },
      py::arg("dtype"), py::arg("rx"), py::arg("xhat"), py::arg("rstd"), py::arg("gamma"),
      py::arg("rgamma"), py::arg("rbeta"), py::arg("relu_y"), py::arg("ry"), py::arg("rxhat"),
      py::arg("a"), py::arg("T"), py::arg("R"), py::arg("C"), py::arg("ps") = 0,
      "BatchNorm tangent: ry, rxhat [T,R,C], a = mean(xhat rx) [T,C].");
  m.def(
      "bn_tbwd_cpu",
      [](int dtype, uintptr_t gy, uintptr_t rgy, uintptr_t xhat, uintptr_t rxhat, uintptr_t rstd,
         uintptr_t a, uintptr_t gamma, uintptr_t rgamma, uintptr_t relu_y, uintptr_t rgx,
         uintptr_t rggamma, uintptr_t rgbeta, int64_t T, int64_t R, int64_t C, int64_t ps) {
        py::gil_scoped_release nogil;
        imaml::bn_tbwd_cpu(to_dtype(dtype), ptr<const void>(gy), ptr<const void>(rgy),
                           ptr<const void>(xhat), ptr<const void>(rxhat), ptr<const void>(rstd),
                           ptr<const void>(a), ptr<const void>(gamma), ptr<const void>(rgamma),
                           ptr<const void>(relu_y), ptr<void>(rgx), ptr<void>(rggamma),
                           ptr<void>(rgbeta), T, R, C, ps ? ps : C);
      },
      py::arg("dtype"), py::arg("gy"), py::arg("rgy"), py::arg("xhat"), py::arg("rxhat"),
      py::arg("rstd"), py::arg("a"), py::arg("gamma"), py::arg("rgamma"), py::arg("relu_y"),
      py::arg("rgx"), py::arg("rggamma"), py::arg("rgbeta"), py::arg("T"), py::arg("R"),
      py::arg("C"), py::arg("ps") = 0, "Tangent of the BatchNorm backward: rgx [T,R,C], rggamma, rgbeta [T,C].");
  m.def(
      "prox_step_cpu",
      [](int dtype, uintptr_t phi, uintptr_t grad, uintptr_t theta, int64_t theta_task_stride,
         uintptr_t lam, int64_t lam_task_stride, bool lam_per_coord, double lr, int64_t T,
         int64_t P) {
        py::gil_scoped_release nogil;
        imaml::prox_step_cpu(to_dtype(dtype), ptr<void>(phi), ptr<const void>(grad),
                             ptr<const void>(theta), theta_task_stride, ptr<const void>(lam),
                             lam_task_stride, lam_per_coord, lr, T, P);
      },
      py::arg("dtype"), py::arg("phi"), py::arg("grad"), py::arg("theta"),
      py::arg("theta_task_stride"), py::arg("lam"), py::arg("lam_task_stride"),
      py::arg("lam_per_coord"), py::arg("lr"), py::arg("T"), py::arg("P"),
      "In place phi -= lr (grad + lam (phi - theta)); theta stride 0 (shared) or P; lam per "
      "task (stride 1) or, with lam_per_coord, per coordinate (row stride 0 or P).");
  m.def(
      "maxpool_fwd_cpu",
      [](int dtype, uintptr_t x, uintptr_t y, uintptr_t idx, int64_t T, int64_t N, int64_t H,
         int64_t W, int64_t C) {
        py::gil_scoped_release nogil;
        imaml::maxpool_fwd_cpu(to_dtype(dtype), ptr<const void>(x), ptr<void>(y), ptr<uint8_t>(idx),
                               T, N, H, W, C);
      },
      "2x2 max-pool: x [T,N,H,W,C] -> y [T,N,H/2,W/2,C], idx uint8 (2*di + dj).");
  m.def(
      "maxpool_gather_cpu",
      [](int dtype, uintptr_t x, uintptr_t idx, uintptr_t y, int64_t T, int64_t N, int64_t H,
         int64_t W, int64_t C) {
        py::gil_scoped_release nogil;
        imaml::maxpool_gather_cpu(to_dtype(dtype), ptr<const void>(x), ptr<const uint8_t>(idx),
                                  ptr<void>(y), T, N, H, W, C);
      },
      "The max-pool's tangent: y = x at the forward's argmax.");
  m.def(
      "maxpool_scatter_cpu",
      [](int dtype, uintptr_t gy, uintptr_t idx, uintptr_t gx, int64_t T, int64_t N, int64_t H,
         int64_t W, int64_t C) {
        py::gil_scoped_release nogil;
        imaml::maxpool_scatter_cpu(to_dtype(dtype), ptr<const void>(gy), ptr<const uint8_t>(idx),
                                   ptr<void>(gx), T, N, H, W, C);
      },
      "The max-pool's adjoint: gx [T,N,H,W,C] = gy at the argmax, 0 elsewhere.");
  m.def(
      "im2col_cpu",
      [](int dtype, uintptr_t x, uintptr_t cols, int64_t T, int64_t N, int64_t H, int64_t W,
         int64_t C, int64_t Ho, int64_t Wo, int64_t k, int64_t s, int64_t ph, int64_t pw) {
        py::gil_scoped_release nogil;
        imaml::im2col_cpu(to_dtype(dtype), ptr<const void>(x), ptr<void>(cols), T, N, H, W, C, Ho,
                          Wo, k, s, ph, pw);
      },
      py::arg("dtype"), py::arg("x"), py::arg("cols"), py::arg("T"), py::arg("N"), py::arg("H"),
      py::arg("W"), py::arg("C"), py::arg("Ho"), py::arg("Wo"), py::arg("k"), py::arg("s"),
      py::arg("ph"), py::arg("pw"),
      "Conv patches with fused zero padding: x [T,N,H,W,C] -> cols [T,N,Ho,Wo,k,k,C].");
  m.def(
      "col2im_cpu",
      [](int dtype, uintptr_t gcols, uintptr_t gx, int64_t T, int64_t N, int64_t H, int64_t W,
         int64_t C, int64_t Ho, int64_t Wo, int64_t k, int64_t s, int64_t ph, int64_t pw) {
        py::gil_scoped_release nogil;
        imaml::col2im_cpu(to_dtype(dtype), ptr<const void>(gcols), ptr<void>(gx), T, N, H, W, C, Ho,
                          Wo, k, s, ph, pw);
      },
      py::arg("dtype"), py::arg("gcols"), py::arg("gx"), py::arg("T"), py::arg("N"), py::arg("H"),
      py::arg("W"), py::arg("C"), py::arg("Ho"), py::arg("Wo"), py::arg("k"), py::arg("s"),
      py::arg("ph"), py::arg("pw"),
      "Adjoint of im2col: gcols [T,N,Ho,Wo,k,k,C] -> gx [T,N,H,W,C] (fully written).");
  m.def(
      "softmax_ce_cpu",
      [](int dtype, uintptr_t logits, uintptr_t y, uintptr_t loss, uintptr_t prob, uintptr_t grad,
         int64_t T, int64_t N, int64_t K, uintptr_t gbias, int64_t gs) {
        py::gil_scoped_release nogil;
        imaml::softmax_ce_cpu(to_dtype(dtype), ptr<const void>(logits), ptr<const int64_t>(y),
                              ptr<void>(loss), ptr<void>(prob), ptr<void>(grad), T, N, K,
                              ptr<void>(gbias), gs);
      },
      py::arg("dtype"), py::arg("logits"), py::arg("y"), py::arg("loss"), py::arg("prob"),
      py::arg("grad"), py::arg("T"), py::arg("N"), py::arg("K"), py::arg("gbias") = 0,
      py::arg("gs") = 0,
      "Cross-entropy: loss [T], softmax prob and (prob - onehot(y))/N [T,N,K]; y int64 [T,N].");
  m.def(
      "softmax_ce_tangent_cpu",
      [](int dtype, uintptr_t prob, uintptr_t rlogits, uintptr_t rg, int64_t T, int64_t N,
         int64_t K) {
        py::gil_scoped_release nogil;
        imaml::softmax_ce_tangent_cpu(to_dtype(dtype), ptr<const void>(prob),
                                      ptr<const void>(rlogits), ptr<void>(rg), T, N, K);
      },
      py::arg("dtype"), py::arg("prob"), py::arg("rlogits"), py::arg("rg"), py::arg("T"),
      py::arg("N"), py::arg("K"), "Tangent of the cross-entropy gradient: prob (r - <prob, r>) / N.");

#ifdef IMAML_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("cuda_device_count", &imaml::cuda_device_count);
  m.def("cg_dots_cuda",
        [](int dtype, uintptr_t r, uintptr_t p, uintptr_t Ap, uintptr_t partials, int64_t ntasks,
           int64_t n, int64_t chunk, uintptr_t stream) {
          imaml::cg_dots_cuda(to_dtype(dtype), ptr<const void>(r), ptr<const void>(p),
                              ptr<const void>(Ap), ptr<double>(partials), ntasks, n, chunk, stream);
        });
  m.def("cg_update_cuda",
        [](int dtype, uintptr_t x, uintptr_t r, uintptr_t p, uintptr_t Ap, uintptr_t partials,
           uintptr_t status_in, uintptr_t status_out, uintptr_t iters, uintptr_t thresh,
           int64_t ntasks, int64_t n, int64_t chunk, uintptr_t stream) {
          imaml::cg_update_cuda(to_dtype(dtype), ptr<void>(x), ptr<void>(r), ptr<void>(p),
                                ptr<const void>(Ap), ptr<const double>(partials),
                                ptr<const int32_t>(status_in), ptr<int32_t>(status_out),
                                ptr<int32_t>(iters), ptr<const double>(thresh), ntasks, n, chunk,
                                stream);
        });
#else
  m.attr("has_cuda") = false;
#endif
}
