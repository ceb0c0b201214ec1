// CPU kernels of the blob loss operators.
//
// Forward: one pass over the voxels. The voxels of a (b, c) plane are visited in blocks of 64;
// the activation of a block is computed in a loop the compiler vectorises, and because label
// maps are spatially coherent and mostly background, most blocks hold a single label: their
// sums go to that label's accumulator in one step. Mixed blocks fall back to run aggregation
// (flush on label change). With many planes each worker owns whole planes and sums into their
// rows of the output in place; a few large planes are split into a fixed number of parts with
// private double tables (bounded scratch), merged in part order. Results are the same bits run
// to run for a given number of threads.
//
// Backward: one pass, grad = grad_out * (a[l] + b[l] * dpow(p)) * act'(x), with the (a, b)
// table the finalisation computed from the forward sums (blob_loss_math.h).
//
// Registered for the CPU key at the bottom of this file: the public ops (dice, tversky,
// label_stats; their autograd is in ../autograd/blob_autograd.cpp) and the private forward and
// backward ops.
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
#include <limits>
#include <string>
#include <vector>

#include "../blob_ops.h"
#include "isa.h"

namespace blob {
namespace {

// The kernels, compiled for the baseline ISA ...
namespace base {
#include "kernels_impl.h"
}  // namespace base

#ifdef BLOB_CPU_MULTIVERSION
// ... and for AVX2 + FMA (8-wide exp polynomial and reductions), chosen at run time.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "kernels_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

// The AVX2 build when the CPU supports it, unless BLOBBENCH_CPU_ISA=baseline (cpu/isa.h).
bool use_avx2() { return cpu_use_avx2(); }

bool accumulate_cpu(const at::Tensor& input, const at::Tensor& labels, const LossParams& prm,
                    int64_t K, int64_t bound, at::Tensor& stats, const at::Tensor& /*invalid*/,
                    const char* /*op*/) {
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "blob_accumulate", [&] {
        using in_t = scalar_t;
        AT_DISPATCH_V2(
            labels.scalar_type(), "blob_accumulate_labels", AT_WRAP([&] {
#ifdef BLOB_CPU_MULTIVERSION
              if (use_avx2()) {
                ok = avx2::accumulate_typed<in_t, scalar_t>(input, labels, prm, K, bound, stats);
                return;
              }
#endif
              ok = base::accumulate_typed<in_t, scalar_t>(input, labels, prm, K, bound, stats);
            }),
            at::kByte, at::kShort, at::kInt, at::kLong);
      });
  return ok;
}

void finalize_cpu(const at::Tensor& stats, const at::Tensor& /*invalid*/, const LossParams& prm,
                  at::Tensor& loss, at::Tensor& coef, const char* /*op*/) {
  double value = 0.0;
  finalize_host(stats.data_ptr<double>(), stats.size(0), stats.size(1), stats.size(2), prm, &value,
                coef.data_ptr<double>());
  if (loss.scalar_type() == at::kDouble) {
    *loss.data_ptr<double>() = value;
  } else {
    *loss.data_ptr<float>() = static_cast<float>(value);
  }
}

bool backward_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& labels,
                  const at::Tensor& coef, const LossParams& prm, at::Tensor& grad_input,
                  const char* /*op*/) {
  const double go = grad_out.item<double>();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "blob_backward", [&] {
        using in_t = scalar_t;
        AT_DISPATCH_V2(
            labels.scalar_type(), "blob_backward_labels", AT_WRAP([&] {
#ifdef BLOB_CPU_MULTIVERSION
              if (use_avx2()) {
                ok = avx2::backward_typed<in_t, scalar_t>(go, input, labels, coef, prm, grad_input);
                return;
              }
#endif
              ok = base::backward_typed<in_t, scalar_t>(go, input, labels, coef, prm, grad_input);
            }),
            at::kByte, at::kShort, at::kInt, at::kLong);
      });
  return ok;
}

bool cpu_fuses_dice_ce() { return true; }

const DeviceKernels kCpuKernels{&accumulate_cpu, &finalize_cpu, &backward_cpu,
                                /*uses_invalid_flag=*/false, /*fused_ce=*/&cpu_fuses_dice_ce};

}  // namespace

TORCH_LIBRARY_IMPL(blob, CPU, m) {
  using Ops = DeviceOps<kCpuKernels>;
  m.impl("dice", &Ops::dice);
  m.impl("tversky", &Ops::tversky);
  m.impl("label_stats", &Ops::label_stats);
  m.impl("_dice_forward", &Ops::dice_forward);
  m.impl("_dice_backward", &Ops::dice_backward);
  m.impl("_tversky_forward", &Ops::tversky_forward);
  m.impl("_tversky_backward", &Ops::tversky_backward);
  m.impl("dice_ce", &Ops::dice_ce);
  m.impl("_dice_ce_forward", &Ops::dice_ce_forward);
  m.impl("_dice_ce_backward", &Ops::dice_ce_backward);
}

}  // namespace blob
