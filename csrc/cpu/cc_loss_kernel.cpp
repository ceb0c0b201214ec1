// CPU kernels of the component-wise (Voronoi) losses (ops/cc_ops.h): one accumulate pass (per
// region I, P, T, N[, E]) and one backward pass, on the blob kernels' activation, BCE, block and
// row drivers (kernels_impl.h), with the bodies in cc_kernels_impl.h. Both are compiled for the
// baseline ISA and for AVX2 + FMA, like the blob kernels; BLOBBENCH_CPU_ISA=baseline forces the
// first. Registered for the CPU key at the bottom; BLOBBENCH_CC=composite sends the calls to the
// ATen composite (ops/cc_composite.cpp) instead, for the tests.
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../ops/cc_ops.h"
#include "isa.h"

namespace blob {
namespace {

namespace base {
#include "kernels_impl.h"
#include "cc_kernels_impl.h"
}  // namespace base

#ifdef BLOB_CPU_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "kernels_impl.h"
#include "cc_kernels_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

// The AVX2 build when the CPU supports it, unless BLOBBENCH_CPU_ISA=baseline (cpu/isa.h).
bool use_avx2() { return cpu_use_avx2(); }

bool cc_accumulate_cpu(const at::Tensor& input, const at::Tensor& labels,
                       const at::Tensor& targets, const LossParams& prm, int64_t K, int64_t bound,
                       bool check_ids, at::Tensor& stats) {
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "cc_accumulate", [&] {
        using in_t = scalar_t;
        AT_DISPATCH_V2(
            labels.scalar_type(), "cc_accumulate_labels", AT_WRAP([&] {
#ifdef BLOB_CPU_MULTIVERSION
              if (use_avx2()) {
                ok = avx2::cc_accumulate_typed<in_t, scalar_t>(input, labels, targets, prm, K,
                                                               bound, check_ids, stats);
                return;
              }
#endif
              ok = base::cc_accumulate_typed<in_t, scalar_t>(input, labels, targets, prm, K, bound,
                                                             check_ids, stats);
            }),
            at::kByte, at::kShort, at::kInt, at::kLong);
      });
  return ok;
}

bool cc_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& labels,
                     const at::Tensor& targets, const at::Tensor& coef, const LossParams& prm,
                     at::Tensor& grad_input) {
  const double go = grad_out.item<double>();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "cc_backward", [&] {
        using in_t = scalar_t;
        AT_DISPATCH_V2(
            labels.scalar_type(), "cc_backward_labels", AT_WRAP([&] {
#ifdef BLOB_CPU_MULTIVERSION
              if (use_avx2()) {
                ok = avx2::cc_backward_typed<in_t, scalar_t>(go, input, labels, targets, coef, prm,
                                                             grad_input);
                return;
              }
#endif
              ok = base::cc_backward_typed<in_t, scalar_t>(go, input, labels, targets, coef, prm,
                                                           grad_input);
            }),
            at::kByte, at::kShort, at::kInt, at::kLong);
      });
  return ok;
}

}  // namespace

namespace cc {
const Kernels kCpuKernels{&cc_accumulate_cpu, &cc_backward_cpu};
}  // namespace cc

TORCH_LIBRARY_IMPL(blob, CPU, m) {
  using Ops = cc::DeviceOps<&cc::kCpuKernels>;
  m.impl("cc_dice", &Ops::dice);
  m.impl("_cc_dice_forward", &Ops::dice_forward);
  m.impl("_cc_dice_backward", &Ops::dice_backward);
  m.impl("cc_dice_ce", &Ops::dice_ce);
  m.impl("_cc_dice_ce_forward", &Ops::dice_ce_forward);
  m.impl("_cc_dice_ce_backward", &Ops::dice_ce_backward);
}

}  // namespace blob
