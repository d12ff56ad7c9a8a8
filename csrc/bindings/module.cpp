// pybind11 module imaml_kernels._C: thin wrappers that turn integer addresses
// (tensor.data_ptr()) and sizes into kernel calls. No torch headers.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cg.h"

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

#ifdef IMAML_WITH_CUDA
  m.attr("has_cuda") = true;
  m.attr("cuda_cg_chunk") = imaml::kCudaCgChunk;
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
