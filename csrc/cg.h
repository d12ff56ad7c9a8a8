// Fused multi-task conjugate-gradient kernels. All tensors are row-major [T, P]
// (one row per task), contiguous. `partials` is [T, NB, 4] float64 with
// NB = ceil(P / chunk): per-block dot products (rr, pAp, rAp, ApAp) reduced in a
// fixed order by the update kernel, so results are bit-for-bit deterministic.
#pragma once

#include <cstdint>

namespace imaml {

enum class DType : int { kFloat32 = 0, kFloat64 = 1 };

// CPU (OpenMP over (task, block) pairs).
void cg_dots_cpu(DType dtype, const void* r, const void* p, const void* Ap, double* partials,
                 int64_t ntasks, int64_t n, int64_t chunk);
void cg_update_cpu(DType dtype, void* x, void* r, void* p, const void* Ap, const double* partials,
                   const int32_t* status_in, int32_t* status_out, int32_t* iters, const double* thresh,
                   int64_t ntasks, int64_t n, int64_t chunk);

#if defined(IMAML_WITH_CUDA) || defined(__CUDACC__)
// CUDA: enqueue on `stream` (a cudaStream_t passed as an integer); never synchronises.
// Throws std::runtime_error with the CUDA error string when the launch fails.
void cg_dots_cuda(DType dtype, const void* r, const void* p, const void* Ap, double* partials,
                  int64_t ntasks, int64_t n, int64_t chunk, uintptr_t stream);
void cg_update_cuda(DType dtype, void* x, void* r, void* p, const void* Ap, const double* partials,
                    const int32_t* status_in, int32_t* status_out, int32_t* iters, const double* thresh,
                    int64_t ntasks, int64_t n, int64_t chunk, uintptr_t stream);
int cuda_device_count();
// Elements per CUDA block: 256 threads x 16 elements.
constexpr int64_t kCudaCgChunk = 4096;
#endif

}  // namespace imaml
