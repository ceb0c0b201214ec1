// CPU kernels of the blob loss operators.
//
// Forward: one pass over the voxels. The voxels of a (b, c) plane are visited in blocks of 64;
// the activation of a block is computed in a loop the compiler vectorises, and because label
// maps are spatially coherent and mostly background, most blocks hold a single label: their
// sums go to that label's accumulator in one step. Mixed blocks fall back to run aggregation
// (flush on label change). Each worker owns a private table over the planes it touches, in
// double; the tables are merged in a fixed order, so results are the same bits run to run for
// a given number of threads.
//
// Backward: one pass, grad = grad_out * (a[l] + b[l] * dpow(p)) * act'(x), with the (a, b)
// table the finalisation computed from the forward sums (blob_loss_math.h).
//
// The bodies live in kernels_impl.h, compiled here twice: for the baseline ISA and, with GCC on
// x86-64, for AVX2 + FMA; use_avx2() picks one at run time.
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../blob_ops.h"

namespace blob {
namespace {

// The kernels, compiled for the baseline ISA ...
namespace base {
#include "kernels_impl.h"
}  // namespace base

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BLOB_CPU_MULTIVERSION 1
// ... and for AVX2 + FMA (8-wide exp polynomial and reductions), chosen at run time.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "kernels_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

// The AVX2 build when the CPU supports it, unless BLOBBENCH_CPU_ISA=baseline.
bool use_avx2() {
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

void accumulate_cpu(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                    int64_t K, at::Tensor& stats, at::Tensor& /*invalid*/) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "blob_accumulate", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_V2(labels.scalar_type(), "blob_accumulate_labels", AT_WRAP([&] {
#ifdef BLOB_CPU_MULTIVERSION
      if (use_avx2()) return avx2::accumulate_typed<in_t, scalar_t>(input, labels, prm, K, stats);
#endif
      base::accumulate_typed<in_t, scalar_t>(input, labels, prm, K, stats);
    }), at::kByte, at::kShort, at::kInt, at::kLong);
  });
}

void finalize_cpu(const at::Tensor& stats, const at::Tensor& /*invalid*/, const LossParams& prm,
                  at::Tensor& loss, at::Tensor& coef) {
  finalize_host(stats.data_ptr<double>(), stats.size(0), stats.size(1), stats.size(2), prm,
                loss.data_ptr<double>(), coef.data_ptr<double>());
}

void backward_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& labels,
                  const at::Tensor& coef, const LossParams& prm, at::Tensor& grad_input) {
  const double go = grad_out.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "blob_backward", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_V2(labels.scalar_type(), "blob_backward_labels", AT_WRAP([&] {
#ifdef BLOB_CPU_MULTIVERSION
      if (use_avx2()) return avx2::backward_typed<in_t, scalar_t>(go, input, labels, coef, prm, grad_input);
#endif
      base::backward_typed<in_t, scalar_t>(go, input, labels, coef, prm, grad_input);
    }), at::kByte, at::kShort, at::kInt, at::kLong);
  });
}

const DeviceKernels kCpuKernels{&accumulate_cpu, &finalize_cpu, &backward_cpu};

}  // namespace

BLOB_REGISTER_DEVICE(CPU, kCpuKernels)

}  // namespace blob
