// Helpers shared by the CPU kernels of the engine's op families (one .cpp per family,
// mirroring imaml_kernels/ops/): the x86-64-v3 job attribute, the parallel threshold, the
// thread count, pointer casts, size checks and the float32/float64 dispatch.
//
// Each job is a separate (not inlined) function with __restrict pointer arguments: inside
// an OpenMP-outlined loop body the compiler loses the no-alias facts of the enclosing
// function and falls back to scalar code. On x86-64 with GCC the job functions are also
// cloned for x86-64-v3 (AVX2 + FMA), picked at load time by the CPU (the baseline build
// targets plain x86-64), so one binary runs anywhere.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// Below this many elements a kernel runs on the calling thread: waking the team would cost
// more than the work (and much more on an oversubscribed machine).
constexpr int64_t kParallelMin = int64_t(1) << 15;

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}


template <typename T>
const T* cp(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* mp(void* p) {
  return static_cast<T*>(p);
}

inline void check_sizes(const char* name, std::initializer_list<int64_t> sizes) {
  for (int64_t v : sizes)
    if (v < 0) throw std::invalid_argument(std::string(name) + ": negative size");
}

}  // namespace
}  // namespace imaml

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

