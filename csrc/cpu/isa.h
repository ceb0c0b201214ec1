// Which build of the CPU code runs: the CPU kernels (blob_loss_kernel.cpp, cc_loss_kernel.cpp)
// and the id-range read (common/glue.cpp) are compiled for the baseline x86-64 ISA and, with GCC
// on x86-64, for AVX2 + FMA as well (BLOB_CPU_MULTIVERSION); cpu_use_avx2() picks the AVX2 build
// when the CPU supports it, unless BLOBBENCH_CPU_ISA=baseline.
#pragma once

#include <cstdlib>
#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BLOB_CPU_MULTIVERSION 1
#endif

namespace blob {

inline bool cpu_use_avx2() {
#ifdef BLOB_CPU_MULTIVERSION
  static const bool v = [] {
    const char* env = std::getenv("BLOBBENCH_CPU_ISA");
    if (env != nullptr && std::string(env) == "baseline") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return v;
#else
  return false;
#endif
}

}  // namespace blob
