// CUDA kernels of the fused CG iteration. Only CUDA headers: raw pointers, sizes
// and a stream come from the Python layer. Both kernels use a [NB, T] grid; every
// reduction is a fixed-shape tree, so the same input gives bit-identical output.
// No allocation and no host synchronisation: the loop is CUDA-graph capturable.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cg.h"
#include "cg_common.h"

namespace imaml {
namespace {

constexpr int kThreads = 256;
static_assert(kCudaCgChunk % kThreads == 0, "chunk must be a multiple of the block size");

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("imaml_kernels CUDA: ") + what + ": " +
                             cudaGetErrorString(err));
}

template <typename T>
__global__ void cg_dots_kernel(const T* __restrict__ r, const T* __restrict__ p,
                               const T* __restrict__ Ap, double* __restrict__ partials, int64_t n,
                               int64_t chunk) {
  const int64_t t = blockIdx.y, b = blockIdx.x, nb = gridDim.x;
  const int64_t lo = b * chunk;
  const int64_t hi = lo + chunk < n ? lo + chunk : n;
  const T* rt = r + t * n;
  const T* pt = p + t * n;
  const T* at = Ap + t * n;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const double ri = rt[i], pi = pt[i], ai = at[i];
    s0 += ri * ri;
    s1 += pi * ai;
    s2 += ri * ai;
    s3 += ai * ai;
  }
  __shared__ double sh[kCgDots][kThreads];
  sh[0][threadIdx.x] = s0;
  sh[1][threadIdx.x] = s1;
  sh[2][threadIdx.x] = s2;
  sh[3][threadIdx.x] = s3;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride)
      for (int k = 0; k < kCgDots; ++k) sh[k][threadIdx.x] += sh[k][threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x < kCgDots) partials[(t * nb + b) * kCgDots + threadIdx.x] = sh[threadIdx.x][0];
}

template <typename T>
__global__ void cg_update_kernel(T* __restrict__ x, T* __restrict__ r, T* __restrict__ p,
                                 const T* __restrict__ Ap, const double* __restrict__ partials,
                                 const int32_t* __restrict__ status_in, int32_t* __restrict__ status_out,
                                 int32_t* __restrict__ iters, const double* __restrict__ thresh,
                                 int64_t n, int64_t chunk) {
  const int64_t t = blockIdx.y, b = blockIdx.x, nb = gridDim.x;
  __shared__ double sums[kCgDots];
  // Every block re-reduces its task's NB partials in the same order (NB is small):
  // cheaper than a third kernel launch and still deterministic.
  if (threadIdx.x < kCgDots) {
    double s = 0.0;
    for (int64_t j = 0; j < nb; ++j) s += partials[(t * nb + j) * kCgDots + threadIdx.x];
    sums[threadIdx.x] = s;
  }
  __syncthreads();
  const CgStep st = cg_step(sums[0], sums[1], sums[2], sums[3], thresh[t], status_in[t]);
  if (b == 0 && threadIdx.x == 0) {
    status_out[t] = st.status;
    iters[t] += st.update ? 1 : 0;
  }
  if (!st.update) return;
  const T alpha = static_cast<T>(st.alpha), beta = static_cast<T>(st.beta);
  const int64_t lo = b * chunk;
  const int64_t hi = lo + chunk < n ? lo + chunk : n;
  T* xt = x + t * n;
  T* rt = r + t * n;
  T* pt = p + t * n;
  const T* at = Ap + t * n;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const T pi = pt[i];
    const T ri = rt[i] - alpha * at[i];
    xt[i] = xt[i] + alpha * pi;
    rt[i] = ri;
    pt[i] = ri + beta * pi;
  }
}

dim3 grid_for(int64_t ntasks, int64_t n, int64_t chunk) {
  if (chunk != kCudaCgChunk) throw std::invalid_argument("CUDA CG kernels need chunk == 4096");
  if (ntasks > 65535) throw std::invalid_argument("CUDA CG kernels support at most 65535 tasks");
  // At least one block per task, as the partials [T, max(1, ceil(n / chunk)), 4] have: at
  // n = 0 a grid of 0 blocks is an invalid configuration, and that one block writes the
  // task's zero partials (its range is empty) and reads them back.
  const int64_t nb = n > 0 ? (n + chunk - 1) / chunk : 1;
  if (nb > 0x7fffffff) throw std::invalid_argument("CUDA CG kernels: too many blocks per task");
  return dim3(static_cast<unsigned>(nb), static_cast<unsigned>(ntasks));
}

}  // namespace

void cg_dots_cuda(DType dtype, const void* r, const void* p, const void* Ap, double* partials,
                  int64_t ntasks, int64_t n, int64_t chunk, uintptr_t stream) {
  const dim3 grid = grid_for(ntasks, n, chunk);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == DType::kFloat32)
    cg_dots_kernel<float><<<grid, kThreads, 0, s>>>(static_cast<const float*>(r),
                                                   static_cast<const float*>(p),
                                                   static_cast<const float*>(Ap), partials, n, chunk);
  else
    cg_dots_kernel<double><<<grid, kThreads, 0, s>>>(static_cast<const double*>(r),
                                                    static_cast<const double*>(p),
                                                    static_cast<const double*>(Ap), partials, n, chunk);
  check(cudaGetLastError(), "cg_dots launch");
}

void cg_update_cuda(DType dtype, void* x, void* r, void* p, const void* Ap, const double* partials,
                    const int32_t* status_in, int32_t* status_out, int32_t* iters, const double* thresh,
                    int64_t ntasks, int64_t n, int64_t chunk, uintptr_t stream) {
  const dim3 grid = grid_for(ntasks, n, chunk);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == DType::kFloat32)
    cg_update_kernel<float><<<grid, kThreads, 0, s>>>(
        static_cast<float*>(x), static_cast<float*>(r), static_cast<float*>(p),
        static_cast<const float*>(Ap), partials, status_in, status_out, iters, thresh, n, chunk);
  else
    cg_update_kernel<double><<<grid, kThreads, 0, s>>>(
        static_cast<double*>(x), static_cast<double*>(r), static_cast<double*>(p),
        static_cast<const double*>(Ap), partials, status_in, status_out, iters, thresh, n, chunk);
  check(cudaGetLastError(), "cg_update launch");
}

int cuda_device_count() {
  int count = 0;
  // No driver or no device: report 0 instead of failing, so Python can explain.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace imaml
